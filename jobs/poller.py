"""The poll cycle: one sacct call for every active job, then the state moves.

``poll_once`` is the periodic rq task's body; ``python -m jobs.poller`` is the
small clock process that enqueues it every POLL_INTERVAL seconds. Two polls
running at once are harmless: each move is conditional on the old status.
"""
import logging
import sys
import time
from datetime import timedelta, timezone

from flask import current_app

from gateway import accounts, queue
from gateway.adapters import slurm
from gateway.adapters.slurm import JobInfo, Scheduler
from gateway.extensions import db
from gateway.lifecycle import advance
from gateway.models import AccountEmail, Email, Submission, utcnow
from gateway.states import Status
from gateway.storage import SubmissionFiles

log = logging.getLogger(__name__)

ACTIVE = (Status.QUEUED.value, Status.RUNNING.value)
# work that should have been handed on by now (Redis was down, a worker died)
SWEEP_AFTER = timedelta(seconds=60)


def poll_once(scheduler: Scheduler | None = None) -> int:
    """Move every active submission to what Slurm says; returns how many moved."""
    active = Submission.query.filter(Submission.status.in_(ACTIVE),
                                     Submission.slurm_job_id.isnot(None)).all()
    moved = 0
    if active:
        scheduler = scheduler or slurm.from_config(current_app.config)
        infos = scheduler.statuses([s.slurm_job_id for s in active])
        for submission in active:
            info = infos.get(submission.slurm_job_id)
            if info is not None and _apply(submission, info):
                moved += 1
    _sweep()
    return moved


def _apply(submission: Submission, info: JobInfo) -> bool:
    """Follow Slurm's view of one job; True if the submission moved."""
    moved = False
    status = submission.state
    if status == Status.QUEUED and info.started:
        # also when it already ended: "started" is owed before "finished"
        moved |= advance(submission.id, Status.QUEUED, Status.RUNNING, at=_naive(info.start),
                         detail=f"Slurm job {info.job_id} on the node")
        status = Status.RUNNING
    if info.finished:
        new, fields = _outcome(submission, info)
        moved |= advance(submission.id, status, new, at=_naive(info.end), detail=fields["reason"],
                         **fields)
    return moved


# Slurm's words, then ours: what a researcher can do about it.
EXPLAINED = {
    "OUT_OF_MEMORY": "OUT_OF_MEMORY: the job ran out of memory; its limit is {SLURM_MEM}. "
                     "Use smaller batches or images, or ask the admins for more",
    "TIMEOUT": "TIMEOUT: the job ran past its time limit of {SLURM_TIME}",
}


def _outcome(submission: Submission, info: JobInfo) -> tuple[Status, dict]:
    if info.state == "COMPLETED" and info.exit_code == 0:
        return Status.COMPLETED, {"exit_code": 0, "reason": "COMPLETED"}
    if info.state == "CANCELLED":
        return Status.CANCELLED, {"exit_code": info.exit_code, "reason": "CANCELLED"}
    if info.state == "FAILED":
        reason = f"FAILED with exit code {info.exit_code}"
    else:
        reason = EXPLAINED.get(info.state, info.state).format_map(current_app.config)
    if info.signal:
        reason += f" (signal {info.signal})"
    return Status.FAILED, {"exit_code": info.exit_code, "reason": reason,
                           "error": stderr_tail(submission)}


def stderr_tail(submission: Submission) -> str:
    """The last lines the job wrote to stderr, capped for an email."""
    cfg = current_app.config
    path = SubmissionFiles(submission.id).logs / f"slurm-{submission.slurm_job_id}.err"
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - cfg["STDERR_TAIL_BYTES"]))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no stderr was written)"
    lines = text.splitlines()[-cfg["STDERR_TAIL_LINES"]:]
    return "\n".join(lines)


def _sweep():
    """Hand on again what was recorded but whose queue message got lost."""
    cutoff = utcnow() - SWEEP_AFTER
    # a prepare that died with its worker is started again; one still running
    # holds the submission's lock, so a second one returns at once
    for (submission_id,) in db.session.query(Submission.id).filter(
            Submission.status.in_((Status.RECEIVED.value, Status.BUILDING.value)),
            Submission.updated_at < cutoff):
        queue.enqueue_prepare(submission_id)
    for (submission_id,) in db.session.query(Email.submission_id).filter(
            Email.sent_at.is_(None), Email.created_at < cutoff).distinct():
        queue.enqueue_mail(submission_id)
    for (email_id,) in db.session.query(AccountEmail.id).filter(
            AccountEmail.sent_at.is_(None), AccountEmail.created_at < cutoff):
        accounts.enqueue(email_id)


def _naive(moment):
    return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment else None


def main():
    from gateway import create_app
    app = create_app()
    with app.app_context():
        interval = app.config["POLL_INTERVAL"]
        log.info("enqueueing a poll every %s s", interval)
        while True:
            try:
                queue.enqueue_poll()
            except Exception:  # noqa: BLE001 - Redis may come back
                log.exception("could not enqueue the poll")
            time.sleep(interval)


if __name__ == "__main__":
    sys.exit(main())
