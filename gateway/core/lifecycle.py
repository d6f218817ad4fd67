"""Moving a submission through its states.

Each move is one transaction: a conditional UPDATE that only succeeds from the
expected old status, the event, and the email owed for it; after the commit
the move hands the email to the mail queue itself. Two workers or two pollers
racing on the same submission therefore cannot both move it, and an email is
owed at most once per kind (unique constraint as a second guard).
"""
from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import update

from m2d.contract.states import EMAIL_FOR, IllegalTransition, Status, check

from .. import queue
from ..extensions import db
from .models import Email, Event, Submission, User, utcnow

log = logging.getLogger(__name__)


def advance(submission_id: int, old: Status | str, new: Status | str, *,
            at: datetime | None = None, detail: str | None = None, **fields: object) -> bool:
    """Move ``submission_id`` from ``old`` to ``new``; False if it was not in ``old``.

    ``fields`` are other Submission columns written in the same update.
    Commits, then queues the email the move owes.
    """
    new = check(old, new)
    now = utcnow()
    result = db.session.execute(
        update(Submission)
        .where(Submission.id == submission_id, Submission.status == Status(old).value)
        .values(status=new.value, updated_at=now, **fields)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        db.session.rollback()
        return False
    _record(submission_id, new, at=at or now, detail=detail)
    db.session.commit()
    log.info("submission %s: %s -> %s", submission_id, old, new)
    if new in EMAIL_FOR:
        queue.enqueue_mail(submission_id)
    return True


def cancel(submission: Submission, by: str = "the researcher") -> Status:
    """The researcher's (or an admin's) cancel: at once before Slurm has the
    job, else through scancel (the poller records the outcome). Returns the
    status it leaves."""
    status = submission.state
    if status.terminal:
        raise IllegalTransition(f"submission {submission.id} has already ended: {status}")
    if status in (Status.RECEIVED, Status.BUILDING):
        if advance(submission.id, status, Status.CANCELLED, detail=f"cancelled by {by}"):
            if status == Status.BUILDING:
                # a prepare that died between sbatch and recording the job
                # left a job only its name leads to: the worker looks for it
                queue.enqueue_cancel(submission.id)
            return Status.CANCELLED
        db.session.refresh(submission)  # it moved on meanwhile: cancel from there
        return cancel(submission, by)
    queue.enqueue_cancel(submission.id)
    return status


def create(user: User, filename: str) -> Submission:
    """A new submission in ``received``, with its event and email owed.

    Not committed: the caller commits once the files are in place, then calls
    :func:`hand_on`."""
    submission = Submission(user=user, filename=filename, status=Status.RECEIVED.value)
    db.session.add(submission)
    db.session.flush()
    _record(submission.id, Status.RECEIVED, at=submission.created_at)
    return submission


def hand_on(submission: Submission) -> None:
    """After a new submission's commit: queue its build and its first email."""
    queue.enqueue_prepare(submission.id)
    queue.enqueue_mail(submission.id)


def _record(submission_id: int, status: Status, *, at: datetime, detail: str | None = None) -> None:
    event = Event(submission_id=submission_id, status=status.value, at=at, detail=detail)
    db.session.add(event)
    db.session.flush()
    kind = EMAIL_FOR.get(status)
    if kind:
        db.session.add(Email(submission_id=submission_id, event_id=event.id, kind=kind))
