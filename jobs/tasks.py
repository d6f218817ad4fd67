"""rq tasks: each takes an id, calls the core (gateway.core.workflow, the
poller, the mail sender, the airlock's and the images' upkeep) and lets rq
retry what raises; none loads or decides anything itself. The worker
(jobs.worker) runs them inside the gateway app it built once. Queued messages
name them by these dotted paths ("jobs.tasks.prepare", gateway/queue.py), so
the names stay."""
from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import TypeVar

from flask import has_app_context
from rq import get_current_job

from gateway import create_app
from gateway.core import airlock, disclosure_job, workflow
from gateway.core import images as image_store
from gateway.extensions import db

from . import mail, poller

T = TypeVar("T")


def in_app(task: Callable[..., T]) -> Callable[..., T]:
    """Run the task inside the gateway app.

    The worker pushed its app's context once (jobs/worker.py ends the
    session with each task or forked child); a task called elsewhere (a
    shell) gets an app of its own."""
    @wraps(task)
    def wrapped(*args, **kwargs):
        if has_app_context():
            return task(*args, **kwargs)
        with create_app().app_context():
            try:
                return task(*args, **kwargs)
            finally:
                db.session.remove()
    return wrapped


def _retries_left() -> bool:
    """Whether rq tries this task again if it raises (never outside rq)."""
    job = get_current_job()
    return bool(job is not None and job.retries_left)


@in_app
def prepare(submission_id: int) -> None:
    """Build or reuse the image, then the dry run or the real job: gateway.core.workflow.prepare."""
    workflow.prepare(submission_id, retries_left=_retries_left())


@in_app
def cancel(submission_id: int) -> None:
    """Cancel the submission's job: gateway.core.workflow.cancel (raises
    SubmissionBusy while a prepare holds it: rq tries again)."""
    workflow.cancel(submission_id)


@in_app
def send_mail(submission_id: int) -> int:
    return mail.send_owed(submission_id)


@in_app
def send_account_mail(email_id: int) -> bool:
    return mail.send_account(email_id)


@in_app
def poll() -> int:
    return poller.poll_once()


@in_app
def disclosure_report(submission_id: int) -> str | None:
    return disclosure_job.submit(submission_id)


@in_app
def purge_exports() -> dict:
    return airlock.purge()


@in_app
def collect_images() -> dict:
    return image_store.collect()
