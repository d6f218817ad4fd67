"""What the admins must hear about: submissions that stopped moving.

Run from the poller's sweep (jobs.poller). Two rules, both decided from the
database alone:

- a submission with no state change for longer than its status allows
  (STUCK_AFTER) raises one ``stuck`` alert: one row per episode (the status and
  the moment it was entered), one email to each admin, and a flag on the admin
  pages until it moves;
- a prepare that fails for a reason other than Slurm (Slurm's own refusals are
  rq's retries, jobs.tasks) is recorded here; the sweep tries it again after
  PREPARE_BACKOFF seconds, doubled each time, and after PREPARE_ATTEMPTS
  failures the submission fails with the last error, and the admins get a
  ``prepare_failed`` alert. Nothing is retried silently forever.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from flask import current_app
from sqlalchemy import and_, select, update
from sqlalchemy.exc import IntegrityError

from m2d.contract.states import Status

from .. import queue
from ..config import ConfigError
from ..extensions import db
from .lifecycle import advance
from .models import Alert, Email, Submission, User, utcnow

log = logging.getLogger(__name__)

MAX_BACKOFF = timedelta(hours=1)


def thresholds(cfg: Mapping[str, Any]) -> dict[Status, timedelta]:
    """STUCK_AFTER as statuses and durations; ConfigError names a bad entry."""
    limits = {}
    for name, seconds in cfg["STUCK_AFTER"].items():
        try:
            status = Status(name)
            limit = timedelta(seconds=int(seconds))
        except ValueError:
            raise ConfigError(f"M2D_STUCK_AFTER has {name}={seconds}: expected a status "
                              f"({', '.join(s.value for s in Status if not s.terminal)}) and whole seconds "
                              "(see docs/configuration.md)") from None
        if status.terminal:
            raise ConfigError(f"M2D_STUCK_AFTER names {name}, a final status: a submission there never moves again")
        limits[status] = limit
    return limits


def is_stuck(status: Status, updated_at: datetime, now: datetime, limits: Mapping[Status, timedelta]) -> bool:
    """No state change for longer than ``status`` allows."""
    limit = limits.get(status)
    return limit is not None and now - updated_at > limit


def backoff(failures: int, base: int) -> timedelta:
    """The pause after the ``failures``-th failed prepare: base, 2 base, 4 base... at most MAX_BACKOFF."""
    return min(timedelta(seconds=base * 2 ** max(failures - 1, 0)), MAX_BACKOFF)


def failures_now(submission: Submission) -> int:
    """Failed prepares in its present status (those of an earlier status do not count)."""
    if submission.prepare_failed_at is None or submission.prepare_failed_at < submission.updated_at:
        return 0
    return submission.prepare_failures


def prepare_due(submission: Submission, now: datetime, base: int) -> bool:
    """Whether the sweep may hand its prepare on again: never failed in this
    status, or its pause after the last failure is over."""
    failures = failures_now(submission)
    return failures == 0 or now - submission.prepare_failed_at >= backoff(failures, base)


# ------------------------------------------------------------------ stuck

def raise_stuck(now: datetime | None = None) -> int:
    """One alert for every submission stuck past its status's limit that has
    none for this episode yet; returns how many were raised."""
    now = now or utcnow()
    raised = 0
    for status, limit in thresholds(current_app.config).items():
        episode = and_(Alert.submission_id == Submission.id, Alert.kind == "stuck", Alert.since == Submission.updated_at)
        stuck = db.session.execute(
            select(Submission.id, Submission.updated_at, Submission.reason).outerjoin(Alert, episode)
            .where(Submission.status == status.value, Submission.updated_at < now - limit, Alert.id.is_(None))
            .order_by(Submission.id)).all()
        for submission_id, since, reason in stuck:
            minutes = (now - since).total_seconds() / 60
            detail = (f"no change for {minutes:.0f} minutes in {status} (limit: {limit.total_seconds() / 60:.0f} "
                      f"minutes, M2D_STUCK_AFTER)")
            if reason and status in (Status.QUEUED, Status.DRY_RUN_QUEUED):
                detail += f"; Slurm: {reason}"  # a job held at its researcher's limit is waiting, not lost
            raised += _raise(submission_id, "stuck", status, since, detail)
    return raised


def open_alerts(limit: int = 100) -> list[Alert]:
    """Alerts whose submission has not moved since (the admin pages' list)."""
    return (Alert.query.join(Submission)
            .filter(Submission.status == Alert.status, Submission.updated_at == Alert.since)
            .order_by(Alert.raised_at.desc()).limit(limit).all())


def _raise(submission_id: int, kind: str, status: Status, since: datetime, detail: str) -> bool:
    """The alert and an email to each admin, in one transaction; False if
    this episode has its alert already (a racing poller wrote it)."""
    alert = Alert(submission_id=submission_id, kind=kind, status=status.value, since=since, detail=detail)
    db.session.add(alert)
    try:
        db.session.flush()
    except IntegrityError:
        db.session.rollback()
        return False
    admins = User.query.filter(User.is_admin.is_(True), User.disabled_at.is_(None)).order_by(User.id).all()
    for admin in admins:
        db.session.add(Email(submission_id=submission_id, kind=kind, recipient=admin.email,
                             ref=f"alert-{alert.id}", alert_id=alert.id))
    db.session.commit()
    log.warning("alert: submission %s %s: %s", submission_id, kind, detail)
    if admins:
        queue.enqueue_mail(submission_id)
    else:
        log.warning("no admin account to email the alert to; it shows on /admin/submissions")
    return True


# ------------------------------------------------------------------ prepare

def prepare_failed(submission_id: int, error: BaseException) -> bool:
    """Record a prepare that failed for a reason other than Slurm; after
    PREPARE_ATTEMPTS of them in one status the submission fails. True if it did."""
    cfg = current_app.config
    db.session.rollback()  # whatever the failed step left half-done
    submission = db.session.get(Submission, submission_id)
    if submission is None or submission.state.terminal:
        return False
    failures = failures_now(submission) + 1
    text = f"{type(error).__name__}: {error}"[:2000]
    status, since = submission.state, submission.updated_at
    # conditional on the status, so a move that raced this one is not overwritten
    db.session.execute(update(Submission)
                       .where(Submission.id == submission_id, Submission.status == status.value)
                       .values(prepare_failures=failures, prepare_failed_at=utcnow(), prepare_error=text)
                       .execution_options(synchronize_session=False))
    db.session.commit()
    log.warning("submission %s: prepare failed (%s of %s): %s", submission_id, failures, cfg["PREPARE_ATTEMPTS"], text)
    if failures < cfg["PREPARE_ATTEMPTS"]:
        return False
    if not advance(submission_id, status, Status.FAILED, reason="the gateway could not prepare the job",
                   error=f"Preparing the job failed {failures} times; the last error was: {text}"):
        return False
    _raise(submission_id, "prepare_failed", status, since,
           f"prepare failed {failures} times in {status}; the last error: {text}")
    return True
