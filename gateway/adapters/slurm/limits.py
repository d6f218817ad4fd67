"""A researcher's limits in Slurm, in the gateway's words: what sacctmgr sets on
their account (:mod:`.accounting`) and what :mod:`.reasons` quotes back when a
job waits or is refused for one."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

GPU = "gres/gpu"


@dataclass(frozen=True)
class AccountLimits:
    """An account's limits, in the gateway's words; None (or 0 from the
    configuration) is "no limit"."""
    max_running: int | None = None  # MaxJobs
    max_queued: int | None = None  # MaxSubmitJobs: running and waiting together
    gpu_minutes: int | None = None  # GrpTRESMins=gres/gpu=N, per usage period
    max_wall: str | None = None  # MaxWall, Slurm's time notation

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> AccountLimits:
        return cls(max_running=cfg["SLURM_MAX_RUNNING"] or None, max_queued=cfg["SLURM_MAX_QUEUED"] or None,
                   gpu_minutes=cfg["SLURM_GPU_MINUTES"] or None, max_wall=cfg["SLURM_MAX_WALL"] or None)

    def settings(self) -> list[str]:
        """sacctmgr's ``set`` words; -1 clears a limit Slurm holds."""
        def value(v):
            return -1 if v is None else v
        return [f"MaxJobs={value(self.max_running)}", f"MaxSubmitJobs={value(self.max_queued)}",
                f"GrpTRESMins={GPU}={value(self.gpu_minutes)}", f"MaxWall={value(self.max_wall)}"]

    def settings_for_add(self) -> list[str]:
        """The limits a new account starts with (none given: none held)."""
        return [word for word, v in zip(self.settings(), (self.max_running, self.max_queued, self.gpu_minutes,
                                                          self.max_wall)) if v is not None]
