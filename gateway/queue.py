"""The gateway's outbound port: work handed to the rq workers.

Messages carry submission ids only and name their tasks as dotted strings
("jobs.tasks.prepare"), so the gateway never imports the workers' code: the
dependency runs one way, jobs -> gateway. The database holds the state.

Everything in Redis is JSON (rq's JSONSerializer), never pickle: rq would
unpickle job data in the workers, so anyone able to write to Redis would run
code as the gateway. Whoever opens these queues (the worker too) passes
SERIALIZER.

Enqueueing never fails a request: if Redis is down the submission is still
recorded, and the poller's sweep hands it on later.
"""
from __future__ import annotations

import json
import logging

from flask import current_app
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Retry, Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

log = logging.getLogger(__name__)

NAMES = ("build", "mail", "poll")
SERIALIZER = JSONSerializer


def connection() -> Redis:
    return Redis.from_url(current_app.config["REDIS_URL"])


def cached(key: str, seconds: int, compute):
    """``compute()``'s JSON-able answer, from Redis while it is younger than
    ``seconds``: for pages whose figures cost another service a call. Without
    Redis (or with ``seconds`` 0) every caller computes its own."""
    name = f"{current_app.config['QUEUE_NAMESPACE']}-cache-{key}"
    try:
        redis = connection()
        hit = redis.get(name)
        if hit is not None:
            return json.loads(hit)
    except RedisError:
        redis = None
    value = compute()
    if redis is not None and seconds > 0:
        try:
            redis.set(name, json.dumps(value), ex=seconds)
        except RedisError:
            pass
    return value


def queue(name: str, redis: Redis | None = None) -> Queue:
    namespace = current_app.config["QUEUE_NAMESPACE"]
    return Queue(f"{namespace}-{name}", connection=redis or connection(), serializer=SERIALIZER)


def all_queues(redis: Redis | None = None) -> dict[str, Queue]:
    """Every queue of this deployment, by its short name (build, mail, poll)."""
    redis = redis or connection()
    return {name: queue(name, redis) for name in NAMES}


def workers(q: Queue) -> list[Worker]:
    """rq workers alive on ``q`` (a worker's key lapses when its heartbeat stops)."""
    return Worker.all(queue=q, serializer=SERIALIZER)


# A message already waiting (or, for prepare, running) makes another one
# pointless: the sweep and duplicate requests then add nothing to the queue.
PENDING = ("queued", "scheduled", "deferred")


def enqueue_prepare(submission_id: int) -> None:
    _enqueue("build", "jobs.tasks.prepare", submission_id,
             timeout=current_app.config["BUILD_TIMEOUT"] + 600,
             retry=_retry(current_app.config["PREPARE_RETRY_SECONDS"]), skip_if=PENDING + ("started",))


def enqueue_disclosure(submission_id: int) -> None:
    """The report job of an ended submission's export (its image may be built first)."""
    _enqueue("build", "jobs.tasks.disclosure_report", submission_id,
             timeout=current_app.config["BUILD_TIMEOUT"] + 600,
             retry=_retry(current_app.config["PREPARE_RETRY_SECONDS"]), skip_if=PENDING + ("started",))


def enqueue_mail(submission_id: int) -> None:
    # a running sender may have listed the owed emails before this one: queue anyway
    _enqueue("mail", "jobs.tasks.send_mail", submission_id,
             retry=_retry(current_app.config["MAIL_RETRY_SECONDS"]), skip_if=PENDING)


def _retry(intervals: tuple[int, ...]) -> Retry | None:
    return Retry(max=len(intervals), interval=list(intervals)) if intervals else None


def enqueue_cancel(submission_id: int) -> None:
    _enqueue("mail", "jobs.tasks.cancel", submission_id, skip_if=PENDING,
             retry=Retry(max=3, interval=[5, 30, 120]))


def enqueue_poll() -> None:
    q = queue("poll")
    if q.count == 0:  # one poll waiting is enough
        q.enqueue("jobs.tasks.poll", job_timeout=300)


def _enqueue(name, func, submission_id, *, skip_if, timeout=300, retry=None):
    try:
        q = queue(name)
        job_id = f"{q.name}-{func.rsplit('.', 1)[-1]}-{submission_id}"
        if _waiting(q, job_id, skip_if):
            return
        q.enqueue(func, submission_id, job_id=job_id, job_timeout=timeout, retry=retry)
    except Exception:  # noqa: BLE001 - the sweep recovers; the request must not fail
        log.exception("could not enqueue %s(%s); the poller's sweep will retry", func, submission_id)


def _waiting(q: Queue, job_id: str, statuses: tuple[str, ...]) -> bool:
    """Whether a message for ``job_id`` really waits (or runs) in one of ``statuses``.

    The job's hash alone is not proof: a worker killed with -9 while blocked
    on the queue leaves a child holding its connection, Redis hands that dead
    wait the next message, and the hash says "queued" for a message nobody
    reads. So the message must also be where its status says, or the
    database's word (this is owed) wins and it is queued again.
    """
    try:
        status = Job.fetch(job_id, connection=q.connection, serializer=SERIALIZER).get_status()
    except NoSuchJobError:
        return False
    if status not in statuses:
        return False
    where = {
        "queued": lambda: q.connection.lpos(q.key, job_id) is not None,
        "scheduled": lambda: job_id in q.scheduled_job_registry,
        "deferred": lambda: job_id in q.deferred_job_registry,
        "started": lambda: job_id in q.started_job_registry,
    }
    return where[status]() if status in where else True


# ------------------------------------------------------- pushed job events
# Slurm's hook posts a job id (gateway.web.events); the poller's process takes the
# ids (jobs.events). A Redis list of ids, never states: what moves a
# submission is what sacct then says about the job.
EVENTS_BACKLOG = 100_000  # ids kept at most: a flood of pushes cannot fill Redis (the poll finds what is cut)
EVENTS_BATCH = 1000  # ids taken at once


def _events_key() -> str:
    return f"{current_app.config['QUEUE_NAMESPACE']}-slurm-events"


def push_job_event(job_id: str) -> None:
    """Note that Slurm says job ``job_id`` changed (raises RedisError: the hook's post fails, the poll finds it)."""
    pipe = connection().pipeline(transaction=False)
    pipe.rpush(_events_key(), job_id)
    pipe.ltrim(_events_key(), -EVENTS_BACKLOG, -1)
    pipe.execute()


def pushed_job_events(redis: Redis, wait: float) -> list[str]:
    """The job ids pushed since the last call, waiting up to ``wait`` seconds for the first."""
    key = _events_key()
    if wait > 0:
        first = redis.blpop([key], timeout=max(wait, 0.01))  # 0 would wait for ever
        if first is None:
            return []
        ids = [first[1]]
    else:
        ids = []
    ids += redis.lpop(key, EVENTS_BATCH) or []
    return [job_id.decode() if isinstance(job_id, bytes) else job_id for job_id in ids]
