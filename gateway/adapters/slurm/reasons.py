"""Why Slurm holds a job, in a researcher's words.

squeue's ``%r`` (a pending job's reason) and sbatch's refusals name Slurm's
reason codes (``AssocMaxJobsLimit``, ``AssocGrpGRESMinutes``, ``Priority``...).
:func:`explain` turns one into a sentence that says what is going on and,
where the limit is the gateway's own configuration, its number; the code
stays at the end in parentheses, for whoever asks an admin.
"""
from __future__ import annotations

import re

from .limits import AccountLimits

__all__ = ["explain", "refusal", "refusal_code"]


def _count(n: int | None, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}" if n is not None else many


def _limit(n: int | None, unit: str = "") -> str:
    return f"the limit is {n}{unit}" if n is not None else "that is your limit"


def _running(limits: AccountLimits, running: int | None) -> str:
    return f"waiting: you have {_count(running, 'job', 'jobs')} running, {_limit(limits.max_running)}"


def _queued(limits: AccountLimits, running: int | None) -> str:
    return (f"you have {_count(limits.max_queued, 'job', 'jobs') if limits.max_queued else 'as many jobs as you may'}"
            f" running or waiting, {_limit(limits.max_queued)}")


def _gpu_minutes(limits: AccountLimits, running: int | None) -> str:
    budget = f" of {limits.gpu_minutes} GPU minutes" if limits.gpu_minutes is not None else ""
    return (f"waiting: you have used your budget{budget} for this period; it starts when the budget is "
            "renewed or an admin raises it")


def _gpu_run_minutes(limits: AccountLimits, running: int | None) -> str:
    budget = f" of {limits.gpu_minutes} GPU minutes" if limits.gpu_minutes is not None else ""
    return (f"waiting: your running jobs, with this one, could use more than your budget{budget} for this "
            "period; it starts when one of them ends")


def _wall(limits: AccountLimits, running: int | None) -> str:
    most = f" ({limits.max_wall})" if limits.max_wall else ""
    return (f"waiting: its time limit is longer than a job of yours may run{most}; it will not start: cancel it "
            "and ask an admin")


_WORDS = {
    "Priority": lambda limits, running: "waiting: jobs with a higher priority go first (fair share: researchers "
                                         "who used less recently start first)",
    "Resources": lambda limits, running: "waiting for the GPUs, CPUs or memory it asked for to become free",
    "AssocMaxJobsLimit": _running,
    "AssocMaxSubmitJobLimit": lambda limits, running: "waiting: " + _queued(limits, running),
    "AssocGrpGRESMinutes": _gpu_minutes,
    "AssocGrpGRESRunMinutes": _gpu_run_minutes,
    "AssocGrpTRESMinutes": _gpu_minutes,
    "AssocGrpTRESRunMinutes": _gpu_run_minutes,
    "AssocMaxWallDurationPerJobLimit": _wall,
    "AssocGrpGRES": lambda limits, running: "waiting: your jobs already use as many GPUs at once as you may",
    "QOSMaxJobsPerAccount": lambda limits, running: f"waiting: you have {_count(running, 'job', 'jobs')} running, "
                                                    "as many as your QOS allows",
    "QOSMaxSubmitJobPerAccount": lambda limits, running: "waiting: you have as many jobs running or waiting as "
                                                         "your QOS allows",
    "QOSMaxGRESMinutesPerAccount": _gpu_minutes,
    "QOSMaxTRESMinutesPerAccount": _gpu_minutes,
    "QOSGrpGRESMinutes": lambda limits, running: "waiting: all researchers together have used the GPU minutes "
                                                 "of this period",
    "QOSMaxWallDurationPerJobLimit": _wall,
    "QOSMaxGRESPerAccount": lambda limits, running: "waiting: your jobs already use as many GPUs at once as "
                                                    "your QOS allows",
    "JobHeldAdmin": lambda limits, running: "held by an admin: it starts when they release it",
    "JobHeldUser": lambda limits, running: "held: it starts when it is released",
    "BeginTime": lambda limits, running: "waiting for its start time",
    "Dependency": lambda limits, running: "waiting for another job to end",
    "ReqNodeNotAvail": lambda limits, running: "waiting: the nodes it needs are not available (maintenance?)",
    "PartitionDown": lambda limits, running: "waiting: its partition is down",
    "PartitionTimeLimit": lambda limits, running: "waiting: its time limit is longer than its partition allows",
    "InvalidAccount": lambda limits, running: "waiting: Slurm does not know your account; an admin must "
                                              "re-approve you",
    "InvalidQOS": lambda limits, running: "waiting: Slurm does not know your QOS; ask an admin",
    "AccountNotAllowed": lambda limits, running: "waiting: your account may not use its partition; ask an admin",
}
_DISABLED = {"AssocMaxJobsLimit", "AssocMaxSubmitJobLimit"}


def explain(code: str | None, limits: AccountLimits | None = None, running: int | None = None,
            disabled: bool = False) -> str | None:
    """A pending job's reason code in words; None when Slurm gives none.

    ``limits``: the account's (the configured ones); ``running``: how many
    of the researcher's jobs run now; ``disabled``: the account is disabled,
    which Slurm shows as a limit of 0."""
    limits = limits or AccountLimits()
    code = (code or "").strip().strip("()")
    if code in ("", "None"):
        return None
    if disabled and code in _DISABLED:
        return f"waiting: your account is disabled; no job of yours starts ({code})"
    words = _WORDS.get(code)
    if words is None:
        if code.startswith(("Assoc", "QOS")):
            return f"waiting: a limit of your account holds it ({code})"
        return f"waiting ({code})"
    return f"{words(limits, running)} ({code})"


# sbatch names the limit on a line of its own before the general refusal:
#   sbatch: error: AssocMaxSubmitJobLimit
#   sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (...)
_CODE_LINE = re.compile(r"error:\s*((?:Assoc|QOS)[A-Za-z]+)\s*$", re.MULTILINE)
_REFUSED = re.compile(r"Job violates accounting/QOS policy|Invalid account|Invalid qos", re.IGNORECASE)


def refusal_code(stderr: str) -> str | None:
    """The reason code of an sbatch refused for a policy (a limit, an
    unknown account or QOS): "" when the refusal names no code, None when
    it is no policy refusal (Slurm down, a bad script...)."""
    if not _REFUSED.search(stderr or "") and not _CODE_LINE.search(stderr or ""):
        return None
    found = _CODE_LINE.search(stderr)
    if found:
        return found.group(1)
    if re.search(r"Invalid account", stderr, re.IGNORECASE):
        return "InvalidAccount"
    if re.search(r"Invalid qos", stderr, re.IGNORECASE):
        return "InvalidQOS"
    return ""


def refusal(stderr: str, limits: AccountLimits | None = None) -> str:
    """What a researcher reads when sbatch refused their job for a policy."""
    limits = limits or AccountLimits()
    code = refusal_code(stderr) or ""
    if code == "AssocMaxSubmitJobLimit":
        return f"Slurm refused the job: {_queued(limits, None)} ({code})"
    words = explain(code, limits) if code else None
    if words:
        return "Slurm refused the job: " + words.removeprefix("waiting: ")
    return "Slurm refused the job: it breaks a limit of your account"
