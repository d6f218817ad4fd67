"""Researchers in Slurm's accounting: the only code that runs ``sacctmgr``,
``sshare`` and ``sreport``.

All jobs run as one OS user (JOB_USER), so in Slurm a researcher is an
*account*: ``m2d-<user>`` under a parent account (``m2d``), with the job user
associated to it.  Fairness and limits are Slurm's: the fair-share priority
plugin orders the queue by each account's usage, and the association's
limits (MaxJobs, MaxSubmitJobs, GrpTRESMins=gres/gpu=N, MaxWall) hold jobs
back, with reason codes that :mod:`.reasons` puts into words.

Both scheduler halves (CLI, pyslurm) share this: pyslurm has no API that
adds accounts, and ``sacctmgr`` is on every Slurm client host.  The gateway's
own OS account needs the right to add accounts under the parent: it is the
parent's coordinator (``sacctmgr add coordinator account=m2d names=m2d``).

Slurm 22.05 facts this module is built around:

* ``sacctmgr add`` of something that exists exits 1 saying "Nothing new
  added": :meth:`SlurmAccounts.ensure` asks first instead.
* ``sacctmgr modify account NAME set ...`` changes the account's association
  *and* its users' (here: the job user's) in one go.
* ``sshare -P`` indents account names by their depth; ``GrpTRESRaw`` is the
  TRES minutes used since the last usage reset (PriorityUsageResetPeriod),
  which is what ``GrpTRESMins`` is checked against.
* ``sreport`` reads slurmdbd's hourly rollups: a job shows there once the
  hour it ran in has been rolled up (on the hour), while ``sshare`` and
  ``sacct -A`` have it at once.
"""
from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from . import SACCT_TIME_FORMAT, ErrorCounter, SlurmError, check_account
from .cli_scheduler import Batch
from .limits import GPU, AccountLimits

log = logging.getLogger(__name__)

NOTHING_NEW = "Nothing new added"
# Every gateway process of a host (and every test stack of a machine) takes it.
WRITE_LOCK = "/run/lock/m2d-sacctmgr.lock"
NO_SUCH_ACCOUNT = "doesn't exist"
ACCOUNT_VISIBLE_WAITS = (0.5, 1, 2, 4, 8, None)  # seconds before each retry; None: give up
SSHARE_FIELDS = ("Account", "User", "RawShares", "NormShares", "RawUsage", "EffectvUsage", "FairShare",
                 "GrpTRESMins", "GrpTRESRaw")
ASSOC_FIELDS = ("Account", "User", "ParentName", "MaxJobs", "MaxSubmit", "GrpTRESMins", "MaxWall", "QOS")


# Disabling stops an account's jobs from starting and new ones from being
# queued, while its associations (and so its history) stay.
DISABLED = ("MaxJobs=0", "MaxSubmitJobs=0")


@dataclass(frozen=True)
class Association:
    """One row of ``sacctmgr show assoc``: an account's (user "") or a user's in it."""
    account: str
    user: str
    parent: str
    max_jobs: int | None
    max_submit: int | None
    grp_tres_mins: dict[str, int]
    max_wall: str
    qos: str

    @property
    def disabled(self) -> bool:
        return self.max_jobs == 0 and self.max_submit == 0


@dataclass(frozen=True)
class Share:
    """What ``sshare`` says of one account: usage since the last reset and
    the fair-share factor its jobs' priority gets (1: used least, 0: most)."""
    account: str
    raw_usage: int  # billing-seconds (CPU-seconds on the testbed)
    effective_usage: float
    fair_share: float | None  # from the job user's line in the account
    tres_minutes_limit: dict[str, int]
    tres_minutes_used: dict[str, int]

    @property
    def gpu_minutes_used(self) -> int:
        return self.tres_minutes_used.get(GPU, 0)

    @property
    def gpu_minutes_limit(self) -> int | None:
        return self.tres_minutes_limit.get(GPU)

    @property
    def cpu_minutes_used(self) -> int:
        return self.tres_minutes_used.get("cpu", 0)

    def to_dict(self) -> dict:
        return {"account": self.account, "raw_usage": self.raw_usage, "effective_usage": self.effective_usage,
                "fair_share": self.fair_share, "cpu_minutes_used": self.cpu_minutes_used,
                "gpu_minutes_used": self.gpu_minutes_used, "gpu_minutes_limit": self.gpu_minutes_limit}


@dataclass(frozen=True)
class ReportRow:
    """One row of ``sreport cluster AccountUtilizationByUser``: minutes of one TRES."""
    account: str
    user: str
    tres: str
    minutes: int


# ---------------------------------------------------------------- parsing

def parse_tres(raw: str) -> dict[str, int]:
    """``cpu=12,mem=384,gres/gpu=3`` -> {"cpu": 12, ...}; Slurm's -1 or an
    empty value means none."""
    found = {}
    for item in (raw or "").split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            continue
        try:
            number = int(float(value))
        except ValueError:
            raise ValueError(f"unexpected TRES value {item!r} in {raw!r}") from None
        if number >= 0:
            found[key] = number
    return found


def _int_or_none(raw: str) -> int | None:
    raw = raw.strip()
    return int(raw) if raw.lstrip("-").isdigit() and int(raw) >= 0 else None


def _fields(line: str, names: Sequence[str], what: str) -> list[str]:
    fields = [f.strip() for f in line.split("|")]
    if len(fields) != len(names):
        raise ValueError(f"unexpected {what} line {line!r}: want {'|'.join(names)}")
    return fields


def parse_associations(text: str) -> list[Association]:
    """``sacctmgr -n -P show assoc format=ASSOC_FIELDS``."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        account, user, parent, max_jobs, max_submit, grp, wall, qos = _fields(line, ASSOC_FIELDS, "sacctmgr")
        rows.append(Association(account, user, parent, _int_or_none(max_jobs), _int_or_none(max_submit),
                                parse_tres(grp), wall, qos))
    return rows


def _open_lock(path: str) -> int:
    """Read-only (flock needs no more), so a lock file another account made
    stays usable; made only if missing (protected_regular refuses O_CREAT on
    another user's file in a sticky directory such as /run/lock)."""
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        os.fchmod(fd, 0o644)
        return fd


def parse_sshare(text: str, job_user: str | None = None) -> dict[str, Share]:
    """``sshare -n -P -a -o SSHARE_FIELDS``, one Share per account: usage
    and limits from the account's own line, the fair-share factor from the
    job user's line in it (the factor its jobs get)."""
    accounts: dict[str, dict] = {}
    factors: dict[str, float] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        account, user, _raw_shares, _norm, raw_usage, effective, fair_share, grp_mins, grp_raw = _fields(
            line, SSHARE_FIELDS, "sshare")
        try:
            if user:
                if fair_share and (job_user is None or user == job_user):
                    factors[account] = float(fair_share)
                continue
            accounts[account] = {"raw_usage": int(raw_usage or 0),
                                 "effective_usage": float(effective or 0),
                                 "tres_minutes_limit": parse_tres(grp_mins),
                                 "tres_minutes_used": parse_tres(grp_raw)}
        except ValueError:
            raise ValueError(f"unexpected sshare line {line!r}") from None
    return {name: Share(account=name, fair_share=factors.get(name), **values) for name, values in accounts.items()}


def parse_sreport(text: str) -> list[ReportRow]:
    """``sreport -n -P cluster AccountUtilizationByUser -t minutes --tres=...``:
    Cluster|Account|Login|Proper Name|TRES Name|Used."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("|")]
        if len(fields) != 6 or not fields[5].isdigit():
            raise ValueError(f"unexpected sreport line {line!r}: want Cluster|Account|Login|Proper Name|"
                             "TRES Name|Used")
        _cluster, account, login, _name, tres, used = fields
        rows.append(ReportRow(account, login, tres, int(used)))
    return rows


# ---------------------------------------------------------------- commands

class SlurmAccounts:
    """The researchers' accounts in Slurm's accounting database.

    ``parent``: the account they live under; ``qos``: their QOS (empty: the
    parent's); ``job_user``: the OS user jobs run as, associated to each
    account; ``limits``: what a new (or re-approved, or enabled) account gets.
    """

    def __init__(self, batch: Batch | None = None, *, parent: str = "m2d", prefix: str = "m2d-",
                 qos: str = "", job_user: str | None = None, limits: AccountLimits = AccountLimits(),
                 cluster: str = "", lock_path: str = WRITE_LOCK) -> None:
        self.batch = batch or Batch()
        self.lock_path = lock_path
        self.parent, self.prefix, self.qos = check_account(parent), prefix, qos
        self.job_user, self.limits, self.cluster = job_user or None, limits, cluster

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], on_error: ErrorCounter | None = None) -> SlurmAccounts:
        return cls(Batch(on_error=on_error), parent=cfg["SLURM_PARENT_ACCOUNT"], prefix=cfg["SLURM_ACCOUNT_PREFIX"], qos=cfg["SLURM_QOS"],
                   job_user=cfg.get("JOB_USER"), limits=AccountLimits.from_config(cfg))

    def name_for(self, username: str) -> str:
        """The account of the gateway user ``username`` (``m2d-<user>``)."""
        return check_account(f"{self.prefix}{username}".lower())

    def _sacctmgr(self, *args: str) -> str:
        return self.batch.run("sacctmgr", ["-i", "-n", "-P", *args]).stdout

    def _where(self, account: str | None = None, user: str | None = None) -> list[str]:
        where = ["where"]
        if self.cluster:
            where.append(f"cluster={self.cluster}")
        if account:
            where.append(f"account={account}")
        if user:
            where.append(f"user={user}")
        return where if len(where) > 1 else []

    def associations(self, account: str | None = None) -> list[Association]:
        """The associations of ``account`` (the account's own and its users'),
        or of every account under the parent."""
        out = self._sacctmgr("show", "assoc", *self._where(account=account or None),
                             f"format={','.join(ASSOC_FIELDS)}")
        try:
            rows = parse_associations(out)
        except ValueError as e:
            raise SlurmError(str(e), cmd=["sacctmgr", "show", "assoc"], stderr=out) from None
        if account:
            return [r for r in rows if r.account == account]
        mine = {r.account for r in rows if not r.user and r.parent == self.parent}
        return [r for r in rows if r.account in mine]

    def ensure(self, account: str) -> bool:
        """The account under the parent, with the job user in it; True if
        anything was added.  One query when both exist (before every sbatch)."""
        check_account(account)
        if not any(self._missing(self.associations(account))):
            return False
        with self._one_writer():
            # Another process may have lost it half made, so look again: the
            # account missing for a moment or for good (see NO_SUCH_ACCOUNT)
            # is looked for and added anew.
            for wait in ACCOUNT_VISIBLE_WAITS:
                try:
                    return self._add_missing(account)
                except SlurmError as e:
                    if NO_SUCH_ACCOUNT not in (e.stderr + str(e)) or wait is None:
                        raise
                time.sleep(wait)
        raise AssertionError("unreachable: the last wait is None")

    def _missing(self, have: list[Association]) -> tuple[bool, bool]:
        """Whether the account's own association, and its job user's, are missing."""
        return (not any(not a.user for a in have),
                bool(self.job_user) and not any(a.user == self.job_user for a in have))

    def _add_missing(self, account: str) -> bool:
        account_missing, user_missing = self._missing(self.associations(account))
        if account_missing:
            args = ["add", "account", account, f"parent={self.parent}", f"Description=m2d {account}",
                    "Organization=m2d", *self.limits.settings_for_add()]
            if self.cluster:
                args.append(f"cluster={self.cluster}")
            if self.qos:
                args += [f"QOS={self.qos}", f"DefaultQOS={self.qos}"]
            self._add(*args)
        if user_missing:
            args = ["add", "user", self.job_user, f"account={account}"]
            if self.cluster:
                args.append(f"cluster={self.cluster}")
            self._add(*args)
        return account_missing or user_missing

    def _add(self, *args: str) -> None:
        try:
            self._sacctmgr(*args)
        except SlurmError as e:
            if NOTHING_NEW not in (e.stderr + str(e)):  # made meanwhile by another worker
                raise

    @contextmanager
    def _one_writer(self) -> Iterator[None]:
        """One sacctmgr write at a time from this host. slurmdbd 22.05 retries
        only the statement that hit a MariaDB deadlock, not the transaction
        the database rolled back, so concurrent ``add account`` calls under
        one parent each say "Adding Account(s)" and lose the account (or keep
        its association without the account, which sacctmgr cannot add or
        delete after; 3 of 4 concurrent adds on the testbed)."""
        try:
            fd = _open_lock(self.lock_path)
        except OSError as e:
            log.warning("sacctmgr writes unserialised: cannot open %s (%s)", self.lock_path, e)
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def set_limits(self, account: str, limits: AccountLimits | None = None) -> None:
        """The account's (and its job user's) limits: the configured ones,
        which also lifts a disable."""
        self._modify(account, (limits or self.limits).settings())

    def disable(self, account: str) -> None:
        """No job of ``account`` starts and none is queued; nothing is deleted."""
        self._modify(account, list(DISABLED))

    def _modify(self, account: str, settings: Sequence[str]) -> None:
        check_account(account)
        where = [f"name={account}"] + ([f"cluster={self.cluster}"] if self.cluster else [])
        try:
            with self._one_writer():
                self._sacctmgr("modify", "account", "where", *where, "set", *settings)
        except SlurmError as e:
            if "Nothing modified" not in (e.stderr + str(e)):  # already so
                raise

    def shares(self) -> dict[str, Share]:
        """Usage and fair-share factor of every researcher's account, from slurmctld."""
        # (sshare -A PARENT lists the parent alone, not the accounts under it)
        out = self.batch.run("sshare", ["-n", "-P", "-a", "-o", ",".join(SSHARE_FIELDS)]).stdout
        try:
            found = parse_sshare(out, self.job_user)
        except ValueError as e:
            raise SlurmError(str(e), cmd=["sshare"], stderr=out) from None
        return {name: share for name, share in found.items() if name.startswith(self.prefix)}

    def report(self, start: datetime, accounts: Iterable[str] = (),
               end: datetime | None = None) -> list[ReportRow]:
        """CPU and GPU minutes per account from slurmdbd's rollups (hours that
        have ended), from ``start`` to ``end`` (now)."""
        args = ["-n", "-P", "cluster", "AccountUtilizationByUser",
                f"start={start.astimezone(timezone.utc).strftime(SACCT_TIME_FORMAT)}",
                f"end={(end or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime(SACCT_TIME_FORMAT)}",
                "-t", "minutes", f"--tres=cpu,{GPU}"]
        names = [check_account(a) for a in accounts] or [self.parent]
        args.append(f"accounts={','.join(names)}")
        out = self.batch.run("sreport", args).stdout
        try:
            return parse_sreport(out)
        except ValueError as e:
            raise SlurmError(str(e), cmd=["sreport"], stderr=out) from None
