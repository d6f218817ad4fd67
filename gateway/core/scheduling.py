"""The gateway's Slurm: every caller (pages, API, commands, workers, the poller)
gets its scheduler and its accounts here, built by the adapter's ``from_config``
with the gateway's counter of failed Slurm commands passed in.

Squeue's view for a submission's page (its job's state, reason and place in
the queue) is one ``squeue`` per QUEUE_VIEW_SECONDS per process, not one per
page view: a page polled live by many researchers would otherwise run squeue
for each of them every few seconds.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from flask import current_app

from .. import metrics
from ..adapters import slurm
from ..adapters.slurm import QueueEntry, Scheduler
from ..adapters.slurm.accounting import SlurmAccounts
from ..adapters.slurm.limits import AccountLimits

QUEUE_VIEW_SECONDS = 10.0

_queue_lock = threading.Lock()


def count_error(command: str) -> None:
    metrics.SLURM_ERRORS.inc(command=command)


def scheduler(cfg: Mapping[str, Any] | None = None) -> Scheduler:
    """The configured scheduler (SLURM_ADAPTER: cli or pyslurm)."""
    return slurm.from_config(current_app.config if cfg is None else cfg, on_error=count_error)


def accounts(cfg: Mapping[str, Any] | None = None) -> SlurmAccounts:
    """The researchers' accounts in Slurm's accounting (sacctmgr, sshare, sreport)."""
    return SlurmAccounts.from_config(current_app.config if cfg is None else cfg, on_error=count_error)


def limits(cfg: Mapping[str, Any] | None = None) -> AccountLimits:
    """Each researcher's limits, as configured (SLURM_MAX_RUNNING...)."""
    return AccountLimits.from_config(current_app.config if cfg is None else cfg)


def queue_view() -> list[QueueEntry]:
    """Every job slurmctld holds, at most QUEUE_VIEW_SECONDS old; a SlurmError
    when squeue fails (not kept: the next view asks again)."""
    with _queue_lock:  # one squeue at a time: the threads of a worker share its answer
        taken = current_app.extensions.get("m2d_queue_view")
        if taken is None or time.monotonic() - taken[0] > QUEUE_VIEW_SECONDS:
            taken = current_app.extensions["m2d_queue_view"] = (time.monotonic(), scheduler().queue())
        return taken[1]
