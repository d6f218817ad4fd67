"""What each researcher used this period against their limits, and their
fair-share factor, as Slurm counts them (``sshare`` now, ``sreport`` for the
hours slurmdbd has rolled up).

Asking Slurm costs a command per page, so the answers are kept in Redis for
USAGE_CACHE_SECONDS; without Redis each page asks Slurm itself.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone

from flask import current_app

from .. import queue
from ..adapters.slurm import SlurmError
from . import scheduling
from .models import User

log = logging.getLogger(__name__)


def period_start(now: datetime | None = None) -> datetime:
    """The start of the usage period: the month, as the testbed's
    PriorityUsageResetPeriod=MONTHLY (docs/admin.md)."""
    now = now or datetime.now(timezone.utc)
    return now.astimezone(timezone.utc).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _cached(key: str, compute):
    """``compute()``'s JSON-able answer, from Redis while it is fresh."""
    return queue.cached(f"usage-{key}", current_app.config["USAGE_CACHE_SECONDS"], compute)


def shares() -> dict[str, dict]:
    """sshare's view of every researcher's account: {account: Share.to_dict()}."""
    slurm = scheduling.accounts()
    return _cached("shares", lambda: {name: share.to_dict() for name, share in slurm.shares().items()})


def report() -> dict[str, dict[str, int]]:
    """sreport's minutes per account and TRES this period (rolled-up hours)."""
    def compute():
        slurm = scheduling.accounts()
        found: dict[str, dict[str, int]] = {}
        for row in slurm.report(period_start()):
            if not row.user:  # the account's own row: the sum of its users
                found.setdefault(row.account, {})[row.tres] = row.minutes
        return found
    return _cached("report", compute)


def limits_dict() -> dict:
    limits = scheduling.limits()
    return {"max_running": limits.max_running, "max_queued": limits.max_queued,
            "gpu_minutes": limits.gpu_minutes, "max_wall": limits.max_wall}


def for_user(user: User) -> dict:
    """One researcher's account, usage and limits (the account page, the API)."""
    cfg = current_app.config
    if not cfg["SLURM_ACCOUNTS"] or not user.mlflow_username:
        return {"account": None, "limits": limits_dict(), "error": None, "usage": None}
    account = scheduling.accounts(cfg).name_for(user.mlflow_username)
    try:
        share = shares().get(account)
    except SlurmError as e:
        return {"account": account, "limits": limits_dict(), "error": str(e), "usage": None}
    return {"account": account, "limits": limits_dict(), "error": None, "usage": share,
            "period_start": period_start().isoformat()}


def overview() -> dict:
    """Every approved researcher's account, usage and fair-share factor (the
    admins' page and ``flask slurm usage``)."""
    cfg = current_app.config
    slurm = scheduling.accounts(cfg)
    error = None
    try:
        now, rolled = shares(), report()
    except SlurmError as e:
        now, rolled, error = {}, {}, str(e)
    rows = []
    for user in User.query.filter(User.approved_at.isnot(None), User.mlflow_username.isnot(None)).order_by(User.id):
        account = slurm.name_for(user.mlflow_username)
        rows.append({"user": user, "account": account, "share": now.get(account),
                     "report": rolled.get(account, {})})
    # most used first: the one an admin asks about
    rows.sort(key=lambda r: -(r["share"] or {}).get("raw_usage", 0))
    return {"rows": rows, "limits": limits_dict(), "error": error, "period_start": period_start()}
