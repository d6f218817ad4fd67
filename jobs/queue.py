"""The rq queues. Messages carry submission ids only; the database holds the state.

Enqueueing never fails a request: if Redis is down the submission is still
recorded, and the poller's sweep hands it on later.
"""
import logging

from flask import current_app
from redis import Redis
from rq import Queue, Retry

log = logging.getLogger(__name__)

NAMES = ("build", "mail", "poll")


def connection():
    return Redis.from_url(current_app.config["REDIS_URL"])


def queue(name, redis=None):
    namespace = current_app.config["QUEUE_NAMESPACE"]
    return Queue(f"{namespace}-{name}", connection=redis or connection())


def enqueue_prepare(submission_id):
    _enqueue("build", "jobs.tasks.prepare", submission_id,
             timeout=int(current_app.config["BUILD_TIMEOUT"]) + 600)


def enqueue_mail(submission_id):
    _enqueue("mail", "jobs.tasks.send_mail", submission_id,
             retry=Retry(max=5, interval=[5, 15, 60, 300, 900]))


def enqueue_poll():
    q = queue("poll")
    if q.count == 0:  # one poll waiting is enough
        q.enqueue("jobs.tasks.poll", job_timeout=300)


def _enqueue(name, func, submission_id, timeout=300, retry=None):
    try:
        queue(name).enqueue(func, submission_id, job_timeout=timeout, retry=retry)
    except Exception:  # noqa: BLE001 - the sweep recovers; the request must not fail
        log.exception("could not enqueue %s(%s); the poller's sweep will retry", func, submission_id)
