"""The queues on the testbed's Redis: a password, and JSON, never pickle, so
that writing to Redis cannot run code in the workers."""
import json
import uuid
import zlib
from pathlib import Path

import pytest
from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError
from redis.retry import Retry
from rq import Queue
from rq.job import Job
from rq.serializers import PickleSerializer

from gateway import create_app, queue

from .helpers.stack import wait_for


@pytest.fixture
def queues(testbed, tmp_path):
    """An app on the testbed's Redis with a namespace of its own, so no
    running worker takes what these tests enqueue."""
    app = create_app({"TESTING": True, "DATA_DIR": str(tmp_path / "data"),
                      "REDIS_URL": testbed["env"]["M2D_REDIS_URL"],
                      "QUEUE_NAMESPACE": f"m2d-test-queue-{uuid.uuid4().hex[:8]}"})
    with app.app_context():
        yield app
        for name in queue.NAMES:
            q = queue.queue(name)
            for job_id in q.job_ids:
                q.connection.delete(Job.key_for(job_id))
            q.delete(delete_jobs=True)


def test_the_testbeds_redis_refuses_a_connection_without_the_password(testbed):
    url = Redis.from_url(testbed["env"]["M2D_REDIS_URL"]).connection_pool.connection_kwargs
    assert url["password"], "M2D_REDIS_URL carries no password"
    once = Retry(NoBackoff(), 0)  # redis-py retries auth errors like lost connections
    with pytest.raises(AuthenticationError, match="Authentication required"):  # the server's NOAUTH
        Redis(host=url["host"], port=url["port"], retry=once).ping()
    with pytest.raises(AuthenticationError):
        Redis(host=url["host"], port=url["port"], password="not-the-password", retry=once).ping()
    assert Redis.from_url(testbed["env"]["M2D_REDIS_URL"]).ping()


def test_a_queued_message_is_stored_as_json_naming_the_task_and_the_id(queues):
    queue.enqueue_mail(42)
    q = queue.queue("mail")
    [job_id] = q.job_ids
    stored = q.connection.hgetall(Job.key_for(job_id))
    data = zlib.decompress(stored[b"data"])
    assert not data.startswith(b"\x80")  # pickle's protocol marker
    assert json.loads(data) == ["jobs.tasks.send_mail", None, [42], {}]
    # the dedup check reads it back with the same serializer
    queue.enqueue_mail(42)
    assert q.job_ids == [job_id]


def test_a_pickled_job_put_into_redis_is_not_unpickled_by_the_workers(stack, tmp_path):
    """What an attacker with the Redis password would try: a job whose data
    runs a function when unpickled. The stack's worker fails the job instead."""
    marker = Path("/tmp") / f"m2d-unpickled-{uuid.uuid4().hex}"

    class Payload:
        def __reduce__(self):
            return (Path.mkdir, (marker,))

    redis = Redis.from_url(stack.env["M2D_REDIS_URL"])
    hostile = Queue(f"{stack.env['M2D_QUEUE_NAMESPACE']}-mail", connection=redis, serializer=PickleSerializer)
    job = hostile.enqueue("jobs.tasks.send_mail", Payload())
    status = wait_for(lambda: (s := job.get_status(refresh=True)) in ("failed", "finished") and s, 60,
                      "a worker to take the pickled job")
    assert status == "failed"
    assert not marker.exists()
    job.delete()


def test_a_message_lost_to_a_dead_worker_is_queued_again_not_vetoed_by_its_hash(queues):
    # kill -9 of a worker blocked on the queue: its orphaned child keeps the
    # connection, Redis hands it the message, and nobody ever reads it. The
    # job's hash still says "queued"; the list no longer holds it.
    queue.enqueue_mail(7)
    q = queue.queue("mail")
    [job_id] = q.job_ids
    q.connection.lrem(q.key, 0, job_id)  # what the dead BLPOP took
    assert Job.fetch(job_id, connection=q.connection, serializer=queue.SERIALIZER).get_status() == "queued"

    queue.enqueue_mail(7)  # the sweep: the database says an email is owed
    assert q.job_ids == [job_id]


def test_a_message_that_really_waits_is_not_queued_twice(queues):
    queue.enqueue_mail(8)
    queue.enqueue_mail(8)
    assert len(queue.queue("mail").job_ids) == 1
