"""The Slurm adapter: the only code in the gateway that talks to Slurm.

Two halves behind one interface, as Open OnDemand's ood_core splits its
adapters: :mod:`.cli_scheduler` runs Slurm's command-line tools (the default)
and :mod:`.pyslurm_scheduler` uses pyslurm's API.  Above them, everything works
with values: job ids, :class:`JobInfo`, :class:`QueueEntry`,
:class:`AccountingRecord`; every failure is a :class:`SlurmError` carrying the
command and its stderr.  :func:`from_config` builds the configured one, and is
the only way callers get one.  :mod:`.accounting` (sacctmgr, sshare, sreport)
serves both halves; :mod:`.reasons` puts Slurm's reason codes into words.

The package imports only the standard library (pyslurm in its own half): what
the gateway counts, it passes in (``on_error``, called with the name of each
command that failed).

Slurm 22.05 facts this package is built around (deploy/testbed/README.md):

* ``sacct --json`` reports every normal exit as 0 in 22.05, so statuses come
  from ``sacct -X -n -P -o JobIDRaw,State,ExitCode,Start,End,NodeList -j ids``.
* sacct prints times in the local time of *its own* process, without a zone,
  and obeys ``SLURM_TIME_FORMAT``.  The CLI half runs it with ``TZ=UTC`` and
  ``SLURM_TIME_FORMAT=standard``, so what we parse is UTC whatever the
  gateway host's zone or its operators' shell settings.
* ``import pyslurm`` without a readable slurm.conf kills the process after
  about 60 s, with no Python exception: pyslurm is imported only by the
  library half, and only after checking for slurm.conf.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from pathlib import Path
from typing import Any

__all__ = ["AccountingRecord", "JobInfo", "QueueEntry", "Scheduler", "SlurmError", "SlurmRefused", "TERMINAL_STATES",
           "from_config", "parse_sacct", "queue_position"]

# Base job states as sacct prints them.  A job in a terminal state never
# changes again; every other state may still move on.
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY",
    "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE", "REVOKED",
})

SACCT_FIELDS = ("JobIDRaw", "State", "ExitCode", "Start", "End", "NodeList")
SACCT_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"
_NO_TIME = {"", "unknown", "none", "n/a"}
_NO_NODE = {"", "none assigned", "none", "(null)"}  # sacct's NodeList of a job that never ran
JOB_ID = re.compile(r"[0-9]+")
_JOB_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,200}")
# Slurm keeps account names in lower case; keep ours to what every tool reads.
_ACCOUNT = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")

class SlurmError(Exception):
    """A Slurm command failed, timed out, or said something we cannot read."""

    def __init__(self, message: str, *, cmd: Sequence[str] = (),
                 returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr = stderr


class SlurmRefused(SlurmError):
    """sbatch refused the job for a policy: a limit of the account
    (``code``, e.g. AssocMaxSubmitJobLimit), an unknown account or QOS.
    Trying again does not help until the researcher's jobs end or an admin
    acts, so the submission ends failed with Slurm's message."""

    def __init__(self, message: str, *, code: str = "", **evidence: Any) -> None:
        super().__init__(message, **evidence)
        self.code = code


@dataclass(frozen=True)
class JobInfo:
    """What the accounting database knows about one job.

    ``exit_code`` and ``signal`` come from sacct's ``ExitCode`` (``exit:signal``)
    and are None until the job is finished: sacct shows ``0:0`` for pending
    and running jobs, which would read as success.  Times are aware UTC, or
    None while Slurm says ``Unknown``/``None``.  ``node`` is sacct's ``NodeList``
    (the node, or nodes in Slurm's compressed form), None before one is assigned.
    """

    job_id: str
    state: str
    exit_code: int | None = None
    signal: int | None = None
    start: datetime | None = None
    end: datetime | None = None
    node: str | None = None

    @property
    def started(self) -> bool:
        return self.start is not None

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class QueueEntry:
    """A job slurmctld holds, as squeue shows it (the admins' cluster view,
    a submission's place in the queue)."""
    job_id: str
    name: str
    state: str
    reason: str
    elapsed: str
    nodelist: str
    priority: int = 0


@dataclass(frozen=True)
class AccountingRecord:
    """A recent job, as sacct's accounting database records it."""
    job_id: str
    name: str
    state: str
    exit_code: str
    elapsed: str
    start: str
    end: str
    nodelist: str


def queue_position(entries: Sequence[QueueEntry], job_id: str) -> int | None:
    """Where ``job_id`` stands among the pending jobs (1: next to start), in
    the order Slurm starts them: highest priority first, then oldest."""
    pending = sorted((e for e in entries if e.state == "PENDING"),
                     key=lambda e: (-e.priority, int(e.job_id)))
    for position, entry in enumerate(pending, start=1):
        if entry.job_id == job_id:
            return position
    return None


# What the gateway counts of the adapter's work: called with the name of each
# Slurm command (or pyslurm call) that failed or timed out.
ErrorCounter = Callable[[str], None]


def _uncounted(command: str) -> None:
    pass


# ---------------------------------------------------------------- parsing

def base_state(raw: str) -> str:
    # "CANCELLED by 0" -> "CANCELLED"; fixed-width output would add "+"
    token = raw.split()[0] if raw.split() else ""
    return token.rstrip("+").upper()


def parse_time(raw: str, tz: tzinfo) -> datetime | None:
    raw = raw.strip()
    if raw.lower() in _NO_TIME:
        return None
    try:
        naive = datetime.strptime(raw, SACCT_TIME_FORMAT)
    except ValueError:
        raise ValueError(f"unexpected sacct time {raw!r} "
                         "(is SLURM_TIME_FORMAT set to something else?)") from None
    return naive.replace(tzinfo=tz).astimezone(timezone.utc)


def _local_tz() -> tzinfo:
    return datetime.now().astimezone().tzinfo or timezone.utc


def _parse_exit_code(raw: str) -> tuple[int | None, int | None]:
    raw = raw.strip()
    if not raw:
        return None, None
    code, _, sig = raw.partition(":")
    try:
        return int(code), int(sig or 0)
    except ValueError:
        raise ValueError(f"unexpected sacct ExitCode {raw!r}") from None


def settled_state(state: str, end: datetime | None) -> str:
    """The state of a job's accounting record, COMPLETING while its end is still
    being written. slurmdbd writes a job's start record (its state when sent,
    already the final one for a job that ended meanwhile; no End; exit code 0)
    apart from the completion's update (End and ExitCode together): a final
    state without End would pass a failed job's exit code as 0."""
    return "COMPLETING" if state in TERMINAL_STATES and end is None else state


def parse_sacct(text: str, tz: tzinfo | None = None) -> dict[str, JobInfo]:
    """Parse ``sacct -X -n -P -o JobIDRaw,State,ExitCode,Start,End,NodeList`` output.

    ``tz`` is the zone sacct printed its times in: this process's local zone
    when None (sacct's default), UTC for :class:`CliScheduler`, which runs
    sacct with ``TZ=UTC``.  Job-step lines (``123.batch``, ``123.0``), which
    appear when ``-X`` is missing, are skipped; blank lines too.  A line that
    does not have the six fields raises ValueError: silently dropping it
    would leave a job looking unknown forever.
    """
    tz = tz or _local_tz()
    jobs: dict[str, JobInfo] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("|")]
        if len(fields) != len(SACCT_FIELDS):
            raise ValueError(f"unexpected sacct line {line!r}: want "
                             f"{'|'.join(SACCT_FIELDS)}")
        job_id, raw_state, raw_exit, raw_start, raw_end, raw_node = fields
        if not JOB_ID.fullmatch(job_id):
            continue  # a job step, or a heterogeneous-job component
        end = parse_time(raw_end, tz)
        state = settled_state(base_state(raw_state), end)
        exit_code, signal = _parse_exit_code(raw_exit)
        if state not in TERMINAL_STATES:
            exit_code = signal = None
        jobs[job_id] = JobInfo(
            job_id=job_id, state=state, exit_code=exit_code, signal=signal,
            start=parse_time(raw_start, tz), end=end,
            node=None if raw_node.lower() in _NO_NODE else raw_node)
    return jobs


def check_ids(job_ids: Iterable[str]) -> list[str]:
    """The ids, each checked, once each, in their first order (a dict keeps it:
    a list's ``in`` made 5,000 ids cost seconds)."""
    ids: dict[str, None] = {}
    for job_id in job_ids:
        job_id = str(job_id).strip()
        if not JOB_ID.fullmatch(job_id):
            raise ValueError(f"not a Slurm job id: {job_id!r}")
        ids[job_id] = None
    return list(ids)


def check_name(job_name: str) -> None:
    # sacct/squeue --name take a comma-separated list
    if not _JOB_NAME.fullmatch(job_name):
        raise ValueError(f"job name {job_name!r}: use letters, digits and _ . + - only")


def check_account(name: str) -> str:
    if not _ACCOUNT.fullmatch(name or ""):
        raise ValueError(f"Slurm account {name!r}: use 1-64 lower-case letters, digits and _ . - "
                         "(starting with a letter or digit)")
    return name


def utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("since must be timezone-aware")
    return moment.astimezone(timezone.utc)


# ---------------------------------------------------------------- interface

class Scheduler(ABC):
    """What the gateway needs from a batch scheduler, in values."""

    @abstractmethod
    def submit(self, script: Path, job_name: str, account: str | None = None) -> str:
        """Queue ``script`` under ``job_name`` (charged to Slurm ``account``,
        else the job user's default); return the job id.  A refusal for a
        policy is a :class:`SlurmRefused`."""

    @abstractmethod
    def pending_reasons(self, job_ids: Iterable[str]) -> dict[str, str]:
        """Slurm's reason code (``Priority``, ``AssocMaxJobsLimit``...) for
        each of ``job_ids`` that is pending; the others are absent."""

    @abstractmethod
    def statuses(self, job_ids: Iterable[str]) -> dict[str, JobInfo]:
        """Look up all ``job_ids`` in one query.

        Ids the accounting database does not know (yet) are simply absent.
        """

    @abstractmethod
    def find(self, job_name: str, since: datetime) -> str | None:
        """Id of the newest job named exactly ``job_name`` submitted since ``since``.

        For recovery after a crash between submitting and recording the id:
        look before submitting again, so a retried submit never makes a
        second job.
        """

    @abstractmethod
    def cancel(self, job_id: str) -> None:
        """Cancel a job; cancelling a job that has already ended is not an error."""

    @abstractmethod
    def queue(self, name_prefix: str | None = None) -> list[QueueEntry]:
        """Every job slurmctld holds (pending, running, just ended), or those
        whose name starts with ``name_prefix``."""

    @abstractmethod
    def recent(self, name_prefix: str | None = None, hours: int = 24) -> list[AccountingRecord]:
        """The accounting database's records of the jobs of the last ``hours``
        (or those whose name starts with ``name_prefix``), newest first."""

    @abstractmethod
    def ping(self, timeout: float) -> str:
        """Whether slurmctld answers within ``timeout`` seconds: what it said,
        or SlurmError (the gateway's /healthz)."""


# ---------------------------------------------------------------- factory

def from_config(cfg: Mapping[str, Any], on_error: ErrorCounter | None = None) -> Scheduler:
    """The scheduler named by ``SLURM_ADAPTER`` ("cli" or "pyslurm"); ``on_error``
    counts each command that failed."""
    name = cfg["SLURM_ADAPTER"]
    if name == "cli":
        from .cli_scheduler import CliScheduler
        return CliScheduler.from_config(cfg, on_error)
    if name == "pyslurm":
        from .pyslurm_scheduler import PyslurmScheduler
        return PyslurmScheduler.from_config(cfg, on_error)
    raise ValueError(f"unknown Slurm adapter {name!r}: choose one of cli, pyslurm")
