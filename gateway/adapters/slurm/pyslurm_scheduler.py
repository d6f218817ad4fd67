"""Slurm through pyslurm's library API (pyslurm >= 23.2), behind the same interface.

Optional: selected with ``M2D_SLURM_ADAPTER=pyslurm``, and pyslurm is imported
only here, only after checking that slurm.conf is readable.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from . import (
    SACCT_TIME_FORMAT,
    TERMINAL_STATES,
    AccountingRecord,
    ErrorCounter,
    JobInfo,
    QueueEntry,
    Scheduler,
    SlurmError,
    SlurmRefused,
    _uncounted,
    base_state,
    check_account,
    check_ids,
    check_name,
    settled_state,
    utc,
)
from .cli_scheduler import PASSED_ENV
from .reasons import refusal_code

PYSLURM_MISSING = ("pyslurm is not installed: pip install pyslurm==<version "
                   "matching your Slurm, e.g. 22.5.x for Slurm 22.05>, or set "
                   "M2D_SLURM_ADAPTER=cli")


def _import_pyslurm(slurm_conf: str | os.PathLike | None):
    mod = sys.modules.get("pyslurm")
    if mod is not None:
        return mod
    if "pyslurm" in sys.modules or importlib.util.find_spec("pyslurm") is None:
        raise SlurmError(PYSLURM_MISSING)
    # `import pyslurm` runs slurm_init(): without a readable slurm.conf the
    # whole process exits after about a minute, with no exception to catch.
    conf = Path(slurm_conf or os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf")
    if not os.access(conf, os.R_OK):
        raise SlurmError(f"not importing pyslurm: slurm.conf {conf} is not "
                         "readable (set SLURM_CONF); pyslurm would kill the "
                         "process instead of raising")
    if slurm_conf:
        os.environ["SLURM_CONF"] = str(conf)
    try:
        import pyslurm
    except ImportError as e:
        raise SlurmError(f"{PYSLURM_MISSING} ({e})") from None
    return pyslurm


def _from_epoch(value) -> datetime | None:
    if value is None or value in (0, "0"):
        return None
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return datetime.fromtimestamp(int(value), tz=timezone.utc)


def _elapsed(seconds) -> str:
    """Seconds as Slurm writes a duration: [D-]HH:MM:SS."""
    days, rest = divmod(int(seconds or 0), 86400)
    text = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{text}" if days else text


def _when(epoch) -> str:
    """An epoch time as sacct prints one (UTC, standard format), or Unknown."""
    moment = _from_epoch(epoch)
    return moment.strftime(SACCT_TIME_FORMAT) if moment else "Unknown"


def job_info_from_pyslurm(job) -> JobInfo:
    """Map a ``pyslurm.db.Job`` to a JobInfo (its times are epoch seconds)."""
    end = _from_epoch(job.end_time)
    state = settled_state(base_state(str(job.state or "")), end)
    finished = state in TERMINAL_STATES
    return JobInfo(
        job_id=str(job.id), state=state,
        exit_code=job.exit_code if finished else None,
        signal=(job.exit_code_signal or 0) if finished else None,
        start=_from_epoch(job.start_time), end=end,
        node=getattr(job, "nodelist", None) or None)


class PyslurmScheduler(Scheduler):
    """The same interface through pyslurm's library API (pyslurm >= 23.2).

    Constructing it imports pyslurm, so a worker that is configured for it
    but cannot use it fails at start, not at its first job.
    """

    def __init__(self, slurm_conf: str | os.PathLike | None = None,
                 env: Mapping[str, str] | None = None, job_user: str | None = None,
                 on_error: ErrorCounter | None = None) -> None:
        self.pyslurm = _import_pyslurm(slurm_conf)
        self.on_error = on_error or _uncounted
        job_env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        job_env.update(env or {})
        self.job_env = job_env
        # The library cannot sudo: submitting as the job account needs a
        # gateway running as root (Slurm's --uid), or the CLI adapter.
        self.job_user = job_user or None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], on_error: ErrorCounter | None = None) -> PyslurmScheduler:
        return cls(job_user=cfg.get("JOB_USER"), on_error=on_error)

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except self.pyslurm.RPCError as e:
            self.on_error(what)
            raise SlurmError(f"pyslurm {what} failed: {e}", cmd=[what],
                             stderr=str(e)) from None

    def submit(self, script: Path, job_name: str, account: str | None = None) -> str:
        check_name(job_name)
        script = Path(script).resolve()
        desc = self.pyslurm.JobSubmitDescription(
            name=job_name, script=str(script),
            working_directory=str(script.parent),
            environment=dict(self.job_env))
        if self.job_user:
            desc.user_id = self.job_user
        if account:
            desc.account = check_account(account)
        # the #SBATCH lines; values given above win
        desc.load_sbatch_options()
        try:
            return str(self._call("submit", desc.submit))
        except SlurmError as e:
            code = refusal_code(e.stderr)
            if code is None:
                raise
            raise SlurmRefused(str(e), code=code, cmd=e.cmd, stderr=e.stderr) from None

    def pending_reasons(self, job_ids: Iterable[str]) -> dict[str, str]:
        wanted = set(check_ids(job_ids))
        if not wanted:
            return {}
        live = self._call("Jobs.load", self.pyslurm.Jobs.load).values()
        return {str(j.id): str(j.state_reason or "") for j in live
                if str(j.id) in wanted and base_state(str(j.state or "")) == "PENDING"}

    def statuses(self, job_ids: Iterable[str]) -> dict[str, JobInfo]:
        ids = check_ids(job_ids)
        if not ids:
            return {}
        db = self.pyslurm.db
        jobs = self._call("db.Jobs.load", db.Jobs.load,
                          db.JobFilter(ids=[int(i) for i in ids]))
        wanted = set(ids)
        out = {}
        for job in jobs:
            info = job_info_from_pyslurm(job)
            if info.job_id in wanted:
                out[info.job_id] = info
        return out

    def find(self, job_name: str, since: datetime) -> str | None:
        check_name(job_name)
        # slurmctld and the database, for the reason given in CliScheduler.find
        since = utc(since).replace(microsecond=0)
        db = self.pyslurm.db
        live = self._call("Jobs.load", self.pyslurm.Jobs.load).values()
        recorded = self._call("db.Jobs.load", db.Jobs.load,
                              db.JobFilter(names=[job_name], start_time=since))
        matches = [j for j in [*live, *recorded] if j.name == job_name
                   and (j.submit_time or 0) >= since.timestamp()]
        if not matches:
            return None
        newest = max(matches, key=lambda j: (j.submit_time, int(j.id)))
        return str(newest.id)

    def queue(self, name_prefix: str | None = None) -> list[QueueEntry]:
        live = self._call("Jobs.load", self.pyslurm.Jobs.load).values()
        entries = [QueueEntry(job_id=str(j.id), name=str(j.name or ""), state=base_state(str(j.state or "")),
                              reason=str(getattr(j, "state_reason", None) or ""),
                              elapsed=_elapsed(getattr(j, "run_time", None)),
                              nodelist=str(getattr(j, "nodelist", None) or ""),
                              priority=int(getattr(j, "priority", None) or 0)) for j in live]
        return sorted((e for e in entries if not name_prefix or e.name.startswith(name_prefix)),
                      key=lambda e: int(e.job_id))

    def recent(self, name_prefix: str | None = None, hours: int = 24) -> list[AccountingRecord]:
        db = self.pyslurm.db
        since = datetime.now(timezone.utc) - timedelta(hours=hours)
        jobs = self._call("db.Jobs.load", db.Jobs.load, db.JobFilter(start_time=since))
        records = [AccountingRecord(
            job_id=str(j.id), name=str(j.name or ""), state=base_state(str(j.state or "")),
            exit_code=f"{j.exit_code or 0}:{j.exit_code_signal or 0}",
            elapsed=_elapsed(getattr(j, "elapsed_time", None)), start=_when(j.start_time), end=_when(j.end_time),
            nodelist=str(getattr(j, "nodelist", None) or "")) for j in jobs]
        return sorted((r for r in records if not name_prefix or r.name.startswith(name_prefix)),
                      key=lambda r: int(r.job_id), reverse=True)

    def cancel(self, job_id: str) -> None:
        (job_id,) = check_ids([job_id])
        self._call("cancel", self.pyslurm.Job(int(job_id)).cancel)

    def ping(self, timeout: float) -> str:
        # the library call has no timeout of its own: /healthz stops waiting for it
        partitions = self._call("Partitions.load", self.pyslurm.Partitions.load)
        return f"slurmctld answered ({len(partitions)} partitions)"
