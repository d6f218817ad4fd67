"""Moving a submission through its states.

Each move is one transaction: a conditional UPDATE that only succeeds from the
expected old status, the event, and the email owed for it. Two workers or two
pollers racing on the same submission therefore cannot both move it, and an
email is owed at most once per kind (unique constraint as a second guard).
"""
import logging

from sqlalchemy import update

from .extensions import db
from .models import Email, Event, Submission, utcnow
from .states import EMAIL_FOR, IllegalTransition, Status, check

log = logging.getLogger(__name__)


def advance(submission_id, old, new, *, at=None, detail=None, **fields):
    """Move ``submission_id`` from ``old`` to ``new``; False if it was not in ``old``.

    ``fields`` are other Submission columns written in the same update.
    Commits. The caller enqueues the email task after (see jobs.queue).
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
    return True


def cancel(submission):
    """The researcher's cancel: at once before Slurm has the job, else through
    scancel (the poller records the outcome). Returns the status it leaves."""
    status = submission.state
    if status.terminal:
        raise IllegalTransition(f"submission {submission.id} has already ended: {status}")
    from jobs import queue
    if status in (Status.RECEIVED, Status.BUILDING):
        if advance(submission.id, status, Status.CANCELLED, detail="cancelled by the researcher"):
            queue.enqueue_mail(submission.id)
            return Status.CANCELLED
        db.session.refresh(submission)  # it moved on meanwhile: cancel from there
        return cancel(submission)
    queue.enqueue_cancel(submission.id)
    return status


def create(user, filename):
    """A new submission in ``received``, with its event and email owed."""
    submission = Submission(user=user, filename=filename, status=Status.RECEIVED.value)
    db.session.add(submission)
    db.session.flush()
    _record(submission.id, Status.RECEIVED, at=submission.created_at)
    return submission


def _record(submission_id, status, *, at, detail=None):
    event = Event(submission_id=submission_id, status=status.value, at=at, detail=detail)
    db.session.add(event)
    db.session.flush()
    kind = EMAIL_FOR.get(status)
    if kind:
        db.session.add(Email(submission_id=submission_id, event_id=event.id, kind=kind))
