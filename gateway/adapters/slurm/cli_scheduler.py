"""Slurm through its command-line tools: ``sbatch``, ``sacct``, ``squeue``, ``scancel``.

Every invocation lives in :class:`Batch` (one command in, the finished process
out, :class:`SlurmError` carrying stderr on failure), as in ood_core's Slurm
adapter; :class:`CliScheduler` turns the outputs into values.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from . import (
    JOB_ID,
    SACCT_FIELDS,
    SACCT_TIME_FORMAT,
    AccountingRecord,
    ErrorCounter,
    JobInfo,
    QueueEntry,
    Scheduler,
    SlurmError,
    SlurmRefused,
    _uncounted,
    check_account,
    check_ids,
    check_name,
    parse_sacct,
    parse_time,
    utc,
)
from .reasons import refusal_code

_SCANCEL_GONE = re.compile(r"Invalid job id specified|already completing or completed",
                           re.IGNORECASE)


def _parse_sbatch(stdout: str) -> str:
    # --parsable prints "id" or "id;cluster"; warnings go to stderr
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip()]
    job_id = lines[-1].split(";", 1)[0] if lines else ""
    if not JOB_ID.fullmatch(job_id):
        raise ValueError(f"unexpected sbatch --parsable output {stdout!r}")
    return job_id


# Linux refuses one argument longer than 128 KiB (MAX_ARG_STRLEN) with E2BIG:
# sacct -j of 20,000 seven-digit job ids would be 160,000 characters, and the
# poller would stop seeing any job. Past this length the ids take more calls.
ID_LIST_CHARS = 100_000


def _id_lists(ids: Sequence[str], limit: int = ID_LIST_CHARS) -> list[str]:
    """``ids`` as comma-separated lists of at most ``limit`` characters each."""
    lists, current, length = [], [], 0
    for job_id in ids:
        if current and length + 1 + len(job_id) > limit:
            lists.append(",".join(current))
            current, length = [], 0
        length += len(job_id) + (1 if current else 0)
        current.append(job_id)
    return [*lists, ",".join(current)]


# What the admins' cluster view shows, in Slurm's own words: squeue's
# JobID, Name, State, Reason, Elapsed, NodeList (and the priority that orders
# the pending ones), and sacct's records of recent jobs.
SQUEUE_FORMAT = "%i|%j|%T|%r|%M|%N|%Q"
RECENT_FIELDS = ("JobIDRaw", "JobName", "State", "ExitCode", "Elapsed", "Start", "End", "NodeList")


def parse_squeue(stdout: str) -> list[QueueEntry]:
    """Rows of ``squeue -h -o SQUEUE_FORMAT``; a name may hold "|", so the
    fields are taken from both ends."""
    entries = []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        head, _, rest = line.partition("|")
        parts = rest.rsplit("|", 5)
        if len(parts) != 6 or not JOB_ID.fullmatch(head.strip()):
            raise ValueError(f"unexpected squeue line {line!r}")
        name, state, reason, elapsed, nodelist, priority = (p.strip() for p in parts)
        entries.append(QueueEntry(head.strip(), name, state, reason, elapsed, nodelist,
                                  int(priority) if priority.isdigit() else 0))
    return entries


def parse_sacct_records(stdout: str) -> list[AccountingRecord]:
    """Rows of ``sacct -X -n -P -o RECENT_FIELDS``, newest first."""
    records = []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        head, _, rest = line.partition("|")
        parts = rest.rsplit("|", len(RECENT_FIELDS) - 2)
        if len(parts) != len(RECENT_FIELDS) - 1 or not JOB_ID.fullmatch(head.strip()):
            raise ValueError(f"unexpected sacct line {line!r}")
        records.append(AccountingRecord(head.strip(), *(p.strip() for p in parts)))
    return sorted(records, key=lambda r: int(r.job_id), reverse=True)


# The environment the Slurm commands get.  Everything else in the gateway's
# environment (secret keys, database URLs, MLflow admin password) stays out:
# sbatch copies its own environment into the job (--export=ALL), and SBATCH_*
# or SACCT_* variables would silently change what the commands do.
PASSED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL",
               "SLURM_CONF")


# The root-owned wrapper that runs sbatch and scancel as the job account with
# fixed options (deploy/libexec/m2d-slurm): the gateway's sudo rule allows it
# and nothing else, so no sbatch of the gateway's choosing (--wrap) runs.
SLURM_WRAPPER = "/usr/local/libexec/m2d/m2d-slurm"
# the wrapper's action for each command that acts on a job as its owner
AS_JOB_OWNER = {"sbatch": "submit", "scancel": "cancel"}


class Batch:
    """Runs one Slurm command; a non-zero exit, a timeout or a missing
    binary is a SlurmError carrying the command and its stderr.

    ``job_user``: the account jobs run as; sbatch and scancel then go through
    ``sudo -n WRAPPER submit|cancel`` (:meth:`as_job_user`), never directly.
    ``on_error``: told the name of each command that failed (the gateway counts them)."""

    def __init__(self, bin_dir: str | os.PathLike | None = None,
                 env: Mapping[str, str] | None = None,
                 timeout: float = 30.0, job_user: str | None = None,
                 wrapper: str = SLURM_WRAPPER, on_error: ErrorCounter | None = None) -> None:
        self.bin_dir = Path(bin_dir) if bin_dir else None
        self.on_error = on_error or _uncounted
        self.timeout = timeout
        self.job_user = job_user or None
        self.wrapper = wrapper
        base = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        base.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        base.update(env or {})
        base.update(TZ="UTC", SLURM_TIME_FORMAT="standard")
        self.env = base

    def command(self, name: str) -> str:
        return str(self.bin_dir / name) if self.bin_dir else name

    def run(self, name: str, args: Sequence[str], timeout: float | None = None) -> subprocess.CompletedProcess:
        try:
            return self._run(name, args, timeout or self.timeout)
        except SlurmError:
            self.on_error(name)
            raise

    def as_job_user(self, name: str, args: Sequence[str]) -> subprocess.CompletedProcess:
        """``name`` (sbatch or scancel) as the job account, through the wrapper:
        ``args`` are the wrapper's (submit: script, job name[, account];
        cancel: job id), which checks them and picks the options itself."""
        try:
            return self._run(name, args, self.timeout, wrapped=True)
        except SlurmError:
            self.on_error(name)
            raise

    def _run(self, name: str, args: Sequence[str], timeout: float,
             wrapped: bool = False) -> subprocess.CompletedProcess:
        if wrapped:
            cmd = ["sudo", "-n", "--", self.wrapper, AS_JOB_OWNER[name], *args]
        elif self.job_user and name in AS_JOB_OWNER:
            raise SlurmError(f"{name} acts as the job account {self.job_user}: run it through the wrapper",
                             cmd=[name, *args], stderr="")
        else:
            cmd = [self.command(name), *args]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=self.env,
                timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            raise SlurmError(f"{name} timed out after {timeout:g} s",
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
                 batch: Batch | None = None, job_user: str | None = None,
                 wrapper: str = SLURM_WRAPPER, on_error: ErrorCounter | None = None) -> None:
        self.batch = batch or Batch(bin_dir=bin_dir, env=env, timeout=timeout, job_user=job_user,
                                    wrapper=wrapper, on_error=on_error)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], on_error: ErrorCounter | None = None) -> CliScheduler:
        return cls(job_user=cfg.get("JOB_USER"), wrapper=cfg.get("SLURM_WRAPPER") or SLURM_WRAPPER,
                   on_error=on_error)

    def submit(self, script: Path, job_name: str, account: str | None = None) -> str:
        check_name(job_name)
        script = Path(script).resolve()
        # The job starts in the script's folder (shared storage), not in
        # whatever folder the worker process happens to run in.
        args = ["--parsable", f"--job-name={job_name}", f"--chdir={script.parent}"]
        if account:
            args.append(f"--account={check_account(account)}")
        try:
            if self.batch.job_user:  # the wrapper's fixed options are the ones above
                out = self.batch.as_job_user("sbatch", [str(script), job_name, *([account] if account else [])]).stdout
            else:
                out = self.batch.run("sbatch", [*args, str(script)]).stdout
        except SlurmError as e:
            code = refusal_code(e.stderr)
            if code is None:
                raise
            raise SlurmRefused(str(e), code=code, cmd=e.cmd, returncode=e.returncode, stderr=e.stderr) from None
        try:
            return _parse_sbatch(out)
        except ValueError as e:
            raise SlurmError(str(e), cmd=["sbatch"], stderr=out) from None

    def statuses(self, job_ids: Iterable[str]) -> dict[str, JobInfo]:
        """One sacct call for all ids (one per ID_LIST_CHARS of them).

        The accounting database trails slurmctld: for a second or two after
        sbatch a job is absent here, and a running job may still read
        PENDING.  Absent means "not known yet", never "lost".
        """
        ids = check_ids(job_ids)
        if not ids:
            return {}
        out = "".join(self.batch.run("sacct", [
            "-X", "-n", "-P", "-o", ",".join(SACCT_FIELDS), "-j", id_list]).stdout
            for id_list in _id_lists(ids))
        try:
            found = parse_sacct(out, tz=timezone.utc)
        except ValueError as e:
            raise SlurmError(str(e), cmd=["sacct"], stderr=out) from None
        wanted = set(ids)
        return {k: v for k, v in found.items() if k in wanted}

    def find(self, job_name: str, since: datetime) -> str | None:
        check_name(job_name)
        # Two sources, because neither is enough alone: for the first few
        # seconds after sbatch the accounting record is named "allocation"
        # (or is missing), so sacct --name misses the job; slurmctld has the
        # name at once but forgets the job MinJobAge (300 s) after it ends.
        since = utc(since).replace(microsecond=0)
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
            if len(fields) != 3 or not JOB_ID.fullmatch(fields[0]):
                continue
            job_id, name, raw_submit = fields
            try:
                submitted = parse_time(raw_submit, timezone.utc)
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

    def pending_reasons(self, job_ids: Iterable[str]) -> dict[str, str]:
        """One squeue call for the job user's pending jobs (squeue -j fails
        outright when one id is one slurmctld has forgotten)."""
        wanted = set(check_ids(job_ids))
        if not wanted:
            return {}
        args = ["-h", "-t", "PD", "-o", "%i|%r"]
        if self.batch.job_user:
            args += ["-u", self.batch.job_user]
        out = self.batch.run("squeue", args).stdout
        reasons = {}
        for line in out.splitlines():
            job_id, sep, reason = line.strip().partition("|")
            if sep and job_id in wanted:
                reasons[job_id] = reason.strip()
        return reasons

    def queue(self, name_prefix: str | None = None) -> list[QueueEntry]:
        out = self.batch.run("squeue", ["-h", "-a", "-o", SQUEUE_FORMAT]).stdout
        try:
            entries = parse_squeue(out)
        except ValueError as e:
            raise SlurmError(str(e), cmd=["squeue"], stderr=out) from None
        return [e for e in entries if not name_prefix or e.name.startswith(name_prefix)]

    def recent(self, name_prefix: str | None = None, hours: int = 24) -> list[AccountingRecord]:
        since = (datetime.now(timezone.utc) - timedelta(hours=hours)).strftime(SACCT_TIME_FORMAT)
        out = self.batch.run("sacct", ["-X", "-n", "-P", "-a", "-o", ",".join(RECENT_FIELDS),
                                       "-S", since, "-E", "now"]).stdout
        try:
            records = parse_sacct_records(out)
        except ValueError as e:
            raise SlurmError(str(e), cmd=["sacct"], stderr=out) from None
        return [r for r in records if not name_prefix or r.name.startswith(name_prefix)]

    def cancel(self, job_id: str) -> None:
        (job_id,) = check_ids([job_id])
        proc = (self.batch.as_job_user("scancel", [job_id]) if self.batch.job_user
                else self.batch.run("scancel", [job_id]))
        # scancel (22.05) exits 0 even when it could not cancel the job: read
        # stderr.  A job that is over, or so long over that slurmctld has
        # forgotten it ("Invalid job id"), is not running: that is success.
        for line in proc.stderr.splitlines():
            if "error" in line.lower() and not _SCANCEL_GONE.search(line):
                raise SlurmError(f"scancel {job_id}: {line.strip()}",
                                 cmd=proc.args, returncode=proc.returncode,
                                 stderr=proc.stderr)

    def ping(self, timeout: float) -> str:
        # "Slurmctld(primary) at HOST is UP"; scontrol exits 1 when it is DOWN
        out = self.batch.run("scontrol", ["ping"], timeout=timeout).stdout.strip()
        if " is UP" not in out:
            raise SlurmError(f"scontrol ping: {out or 'no answer'}", cmd=["scontrol", "ping"], stderr=out)
        return out
