"""The Slurm adapter: the only code in the gateway that talks to Slurm.

Everything that runs ``sbatch``, ``sacct``, ``squeue`` or ``scancel`` lives in
:class:`Batch` (one command in, the finished process out, :class:`SlurmError`
carrying stderr on failure), as in Open OnDemand's ood_core Slurm adapter.  Above it,
:class:`Scheduler` works with values: job ids and :class:`JobInfo`.

Slurm 22.05 facts this module is built around (see shared/testbed/NOTES.md):

* ``sacct --json`` reports every normal exit as 0 in 22.05, so statuses come
  from ``sacct -X -n -P -o JobIDRaw,State,ExitCode,Start,End -j ids``.
* sacct prints times in the local time of *its own* process, without a zone,
  and obeys ``SLURM_TIME_FORMAT``.  We run it with ``TZ=UTC`` and
  ``SLURM_TIME_FORMAT=standard``, so what we parse is UTC whatever the
  gateway host's zone or its operators' shell settings.
* ``import pyslurm`` without a readable slurm.conf kills the process after
  about 60 s, with no Python exception: pyslurm is imported only by
  :class:`PyslurmScheduler`, and only after checking for slurm.conf.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from pathlib import Path

__all__ = [
    "ACTIVE_STATES",
    "Batch",
    "CliScheduler",
    "JobInfo",
    "PyslurmScheduler",
    "Scheduler",
    "SlurmError",
    "TERMINAL_STATES",
    "make_scheduler",
    "parse_sacct",
]

# Base job states as sacct prints them.  A job in a terminal state never
# changes again; every other state may still move on.
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY",
    "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE", "REVOKED",
})
ACTIVE_STATES = frozenset({
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
    "RESIZING", "SUSPENDED", "SPECIAL_EXIT", "STOPPED", "SIGNALING",
    "STAGE_OUT",
})

SACCT_FIELDS = ("JobIDRaw", "State", "ExitCode", "Start", "End")
SACCT_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"
_NO_TIME = {"", "unknown", "none", "n/a"}
_JOB_ID = re.compile(r"[0-9]+")
_JOB_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,200}")
_SCANCEL_GONE = re.compile(r"Invalid job id specified|already completing or completed",
                           re.IGNORECASE)


class SlurmError(Exception):
    """A Slurm command failed, timed out, or said something we cannot read."""

    def __init__(self, message: str, *, cmd: Sequence[str] = (),
                 returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True)
class JobInfo:
    """What the accounting database knows about one job.

    ``exit_code`` and ``signal`` come from sacct's ``ExitCode`` (``exit:signal``)
    and are None until the job is finished: sacct shows ``0:0`` for pending
    and running jobs, which would read as success.  Times are aware UTC, or
    None while Slurm says ``Unknown``/``None``.
    """

    job_id: str
    state: str
    exit_code: int | None = None
    signal: int | None = None
    start: datetime | None = None
    end: datetime | None = None

    @property
    def started(self) -> bool:
        return self.start is not None

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES


# ---------------------------------------------------------------- parsing

def _base_state(raw: str) -> str:
    # "CANCELLED by 0" -> "CANCELLED"; fixed-width output would add "+"
    token = raw.split()[0] if raw.split() else ""
    return token.rstrip("+").upper()


def _parse_time(raw: str, tz: tzinfo) -> datetime | None:
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


def parse_sacct(text: str, tz: tzinfo | None = None) -> dict[str, JobInfo]:
    """Parse ``sacct -X -n -P -o JobIDRaw,State,ExitCode,Start,End`` output.

    ``tz`` is the zone sacct printed its times in: this process's local zone
    when None (sacct's default), UTC for :class:`CliScheduler`, which runs
    sacct with ``TZ=UTC``.  Job-step lines (``123.batch``, ``123.0``), which
    appear when ``-X`` is missing, are skipped; blank lines too.  A line that
    does not have the five fields raises ValueError: silently dropping it
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
        job_id, raw_state, raw_exit, raw_start, raw_end = fields
        if not _JOB_ID.fullmatch(job_id):
            continue  # a job step, or a heterogeneous-job component
        state = _base_state(raw_state)
        exit_code, signal = _parse_exit_code(raw_exit)
        if state not in TERMINAL_STATES:
            exit_code = signal = None
        jobs[job_id] = JobInfo(
            job_id=job_id, state=state, exit_code=exit_code, signal=signal,
            start=_parse_time(raw_start, tz), end=_parse_time(raw_end, tz))
    return jobs


def _parse_sbatch(stdout: str) -> str:
    # --parsable prints "id" or "id;cluster"; warnings go to stderr
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip()]
    job_id = lines[-1].split(";", 1)[0] if lines else ""
    if not _JOB_ID.fullmatch(job_id):
        raise ValueError(f"unexpected sbatch --parsable output {stdout!r}")
    return job_id


def _check_ids(job_ids: Iterable[str]) -> list[str]:
    ids = []
    for job_id in job_ids:
        job_id = str(job_id).strip()
        if not _JOB_ID.fullmatch(job_id):
            raise ValueError(f"not a Slurm job id: {job_id!r}")
        if job_id not in ids:
            ids.append(job_id)
    return ids


def _check_name(job_name: str) -> None:
    # sacct/squeue --name take a comma-separated list
    if not _JOB_NAME.fullmatch(job_name):
        raise ValueError(f"job name {job_name!r}: use letters, digits and _ . + - only")


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("since must be timezone-aware")
    return moment.astimezone(timezone.utc)


# ---------------------------------------------------------------- interface

class Scheduler(ABC):
    """What the gateway needs from a batch scheduler, in values."""

    @abstractmethod
    def submit(self, script: Path, job_name: str) -> str:
        """Queue ``script`` under ``job_name``; return the job id."""

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


# ---------------------------------------------------------------- command line

# The environment the Slurm commands get.  Everything else in the gateway's
# environment (secret keys, database URLs, MLflow admin password) stays out:
# sbatch copies its own environment into the job (--export=ALL), and SBATCH_*
# or SACCT_* variables would silently change what the commands do.
_PASSED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL",
               "SLURM_CONF")


class Batch:
    """Runs one Slurm command; a non-zero exit, a timeout or a missing
    binary is a SlurmError carrying the command and its stderr."""

    def __init__(self, bin_dir: str | os.PathLike | None = None,
                 env: Mapping[str, str] | None = None,
                 timeout: float = 30.0) -> None:
        self.bin_dir = Path(bin_dir) if bin_dir else None
        self.timeout = timeout
        base = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
        base.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        base.update(env or {})
        base.update(TZ="UTC", SLURM_TIME_FORMAT="standard")
        self.env = base

    def command(self, name: str) -> str:
        return str(self.bin_dir / name) if self.bin_dir else name

    def run(self, name: str, args: Sequence[str]) -> subprocess.CompletedProcess:
        cmd = [self.command(name), *args]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=self.env,
                timeout=self.timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            raise SlurmError(f"{name} timed out after {self.timeout:g} s",
                             cmd=cmd, stderr=stderr) from None
        except OSError as e:
            raise SlurmError(f"cannot run {name}: {e}", cmd=cmd,
                             stderr=str(e)) from None
        if proc.returncode != 0:
            detail = proc.stderr.strip() or proc.stdout.strip()
            raise SlurmError(f"{name} failed (exit {proc.returncode}): {detail}",
                             cmd=cmd, returncode=proc.returncode,
                             stderr=proc.stderr)
        return proc


class CliScheduler(Scheduler):
    """The default scheduler: Slurm's own command-line tools.

    ``bin_dir``: folder holding sbatch/sacct/scancel (default: PATH).
    ``env``: extra environment for the commands, e.g. ``{"SLURM_CONF": ...}``.
    ``timeout``: seconds each command may take.  A timed-out sbatch may still
    have queued the job; :meth:`find` is how to tell.
    """

    def __init__(self, bin_dir: str | os.PathLike | None = None,
                 env: Mapping[str, str] | None = None, timeout: float = 30.0,
                 batch: Batch | None = None) -> None:
        self.batch = batch or Batch(bin_dir=bin_dir, env=env, timeout=timeout)

    def submit(self, script: Path, job_name: str) -> str:
        _check_name(job_name)
        script = Path(script).resolve()
        # The job starts in the script's folder (shared storage), not in
        # whatever folder the worker process happens to run in.
        out = self.batch.run("sbatch", [
            "--parsable", f"--job-name={job_name}", f"--chdir={script.parent}",
            str(script)]).stdout
        try:
            return _parse_sbatch(out)
        except ValueError as e:
            raise SlurmError(str(e), cmd=["sbatch"], stderr=out) from None

    def statuses(self, job_ids: Iterable[str]) -> dict[str, JobInfo]:
        """One sacct call for all ids.

        The accounting database trails slurmctld: for a second or two after
        sbatch a job is absent here, and a running job may still read
        PENDING.  Absent means "not known yet", never "lost".
        """
        ids = _check_ids(job_ids)
        if not ids:
            return {}
        out = self.batch.run("sacct", [
            "-X", "-n", "-P", "-o", ",".join(SACCT_FIELDS), "-j", ",".join(ids)]).stdout
        try:
            found = parse_sacct(out, tz=timezone.utc)
        except ValueError as e:
            raise SlurmError(str(e), cmd=["sacct"], stderr=out) from None
        return {k: v for k, v in found.items() if k in ids}

    def find(self, job_name: str, since: datetime) -> str | None:
        _check_name(job_name)
        # Two sources, because neither is enough alone: for the first few
        # seconds after sbatch the accounting record is named "allocation"
        # (or is missing), so sacct --name misses the job; slurmctld has the
        # name at once but forgets the job MinJobAge (300 s) after it ends.
        since = _utc(since).replace(microsecond=0)
        live = self.batch.run("squeue", [
            "-h", "-t", "all", f"--name={job_name}", "-o", "%i|%j|%V"]).stdout
        recorded = self.batch.run("sacct", [
            "-X", "-n", "-P", "-o", "JobIDRaw,JobName,Submit",
            # sacct refuses a window that starts after "now"
            f"--name={job_name}", "-S", min(since, datetime.now(timezone.utc))
            .strftime(SACCT_TIME_FORMAT), "-E", "now"]).stdout
        newest: tuple[datetime, int] | None = None
        for line in (live + "\n" + recorded).splitlines():
            fields = [f.strip() for f in line.split("|")]
            if len(fields) != 3 or not _JOB_ID.fullmatch(fields[0]):
                continue
            job_id, name, raw_submit = fields
            try:
                submitted = _parse_time(raw_submit, timezone.utc)
            except ValueError as e:
                raise SlurmError(str(e), cmd=["squeue/sacct"],
                                 stderr=live + recorded) from None
            # sacct's window also holds older jobs still running at `since`;
            # --name is exact already, the name check guards other versions
            if name != job_name or submitted is None or submitted < since:
                continue
            key = (submitted, int(job_id))
            if newest is None or key > newest:
                newest = key
        return str(newest[1]) if newest else None

    def cancel(self, job_id: str) -> None:
        (job_id,) = _check_ids([job_id])
        proc = self.batch.run("scancel", [job_id])
        # scancel (22.05) exits 0 even when it could not cancel the job: read
        # stderr.  A job that is over, or so long over that slurmctld has
        # forgotten it ("Invalid job id"), is not running: that is success.
        for line in proc.stderr.splitlines():
            if "error" in line.lower() and not _SCANCEL_GONE.search(line):
                raise SlurmError(f"scancel {job_id}: {line.strip()}",
                                 cmd=proc.args, returncode=proc.returncode,
                                 stderr=proc.stderr)


# ---------------------------------------------------------------- pyslurm

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


def job_info_from_pyslurm(job) -> JobInfo:
    """Map a ``pyslurm.db.Job`` to a JobInfo (its times are epoch seconds)."""
    state = _base_state(str(job.state or ""))
    finished = state in TERMINAL_STATES
    return JobInfo(
        job_id=str(job.id), state=state,
        exit_code=job.exit_code if finished else None,
        signal=(job.exit_code_signal or 0) if finished else None,
        start=_from_epoch(job.start_time), end=_from_epoch(job.end_time))


class PyslurmScheduler(Scheduler):
    """The same interface through pyslurm's library API (pyslurm >= 23.2).

    Constructing it imports pyslurm, so a worker that is configured for it
    but cannot use it fails at start, not at its first job.
    """

    def __init__(self, slurm_conf: str | os.PathLike | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.pyslurm = _import_pyslurm(slurm_conf)
        job_env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
        job_env.update(env or {})
        self.job_env = job_env

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except self.pyslurm.RPCError as e:
            raise SlurmError(f"pyslurm {what} failed: {e}", cmd=[what],
                             stderr=str(e)) from None

    def submit(self, script: Path, job_name: str) -> str:
        _check_name(job_name)
        script = Path(script).resolve()
        desc = self.pyslurm.JobSubmitDescription(
            name=job_name, script=str(script),
            working_directory=str(script.parent),
            environment=dict(self.job_env))
        # the #SBATCH lines; values given above win
        desc.load_sbatch_options()
        return str(self._call("submit", desc.submit))

    def statuses(self, job_ids: Iterable[str]) -> dict[str, JobInfo]:
        ids = _check_ids(job_ids)
        if not ids:
            return {}
        db = self.pyslurm.db
        jobs = self._call("db.Jobs.load", db.Jobs.load,
                          db.JobFilter(ids=[int(i) for i in ids]))
        out = {}
        for job in jobs:
            info = job_info_from_pyslurm(job)
            if info.job_id in ids:
                out[info.job_id] = info
        return out

    def find(self, job_name: str, since: datetime) -> str | None:
        _check_name(job_name)
        # slurmctld and the database, for the reason given in CliScheduler.find
        since = _utc(since).replace(microsecond=0)
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

    def cancel(self, job_id: str) -> None:
        (job_id,) = _check_ids([job_id])
        self._call("cancel", self.pyslurm.Job(int(job_id)).cancel)


# ---------------------------------------------------------------- factory

SCHEDULERS = {"cli": CliScheduler, "pyslurm": PyslurmScheduler}


def make_scheduler(name: str = "cli", **options) -> Scheduler:
    """Build the scheduler named in configuration ("cli" or "pyslurm")."""
    try:
        cls = SCHEDULERS[name]
    except KeyError:
        raise ValueError(f"unknown Slurm adapter {name!r}: choose one of "
                         f"{', '.join(sorted(SCHEDULERS))}") from None
    return cls(**options)
