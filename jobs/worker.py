"""Run rq workers for the gateway: ``python -m jobs.worker [build mail poll]``.

The app is built once, before the worker starts (not once per task). The poll
queue's tasks (one poll every POLL_INTERVAL, short, the gateway's own) run in
the worker's process: rq's fork per task cost more than the poll (0.16 CPU s a
fork: the copied pages of a 100 MB process and a new database connection; the
test stacks' polls took 60 % of two cores). Each task's database session ends
with it. The other queues' tasks keep rq's forked child: a build is long and
memory-hungry, and a send survives its worker killed mid-way (in the worker's
process its e-mail would stay claimed for MAIL_CLAIM_SECONDS). The child
inherits the app and its pushed context but not the parent's database
connections: two processes on one socket corrupt each other's conversation, so
the child drops its inherited pool (without closing the parent's connections)
and opens its own.

rq (2.12) rides out a Redis outage only while it waits for work: one that
comes while a task runs makes it log "found an unhandled exception, quitting"
and return as if stopped, exit status 0, which systemd's Restart=on-failure
takes for a clean stop. So unless a stop was asked for (SIGTERM, SIGINT), a
worker that quits is started again here.
"""
import logging
import sys
import time

from redis.exceptions import ConnectionError as RedisConnectionError
from rq import SimpleWorker, Worker

from gateway import create_app, queue
from gateway.config import ConfigError
from gateway.extensions import db

log = logging.getLogger(__name__)
RESTART_AFTER = 5  # seconds
IN_PROCESS_QUEUES = frozenset({"poll"})


class Stoppable:
    """Remembers that a stop was asked for (a quit without one is restarted)."""
    stopping = False

    def request_stop(self, signum, frame):
        self.stopping = True
        return super().request_stop(signum, frame)


class GatewayWorker(Stoppable, Worker):
    """A forked child per task."""

    def main_work_horse(self, *args, **kwargs):
        db.engine.dispose(close=False)
        return super().main_work_horse(*args, **kwargs)


class InProcessWorker(Stoppable, SimpleWorker):
    """Each task in the worker's own process."""

    def perform_job(self, job, queue):
        try:
            return super().perform_job(job, queue)
        finally:
            db.session.remove()  # the next task reads the database afresh


def worker_class(names: list[str]) -> type:
    return InProcessWorker if names and IN_PROCESS_QUEUES.issuperset(names) else GatewayWorker


def main(names: list[str]) -> None:
    app = create_app()
    with app.app_context():
        while True:
            worker = None
            try:
                redis = queue.connection()
                queues = [queue.queue(name, redis) for name in names or queue.NAMES]
                worker = worker_class(names)(queues, connection=redis, serializer=queue.SERIALIZER)
                worker.work(with_scheduler=True)
            except RedisConnectionError:  # its teardown could not reach Redis either
                log.exception("the worker lost Redis")
            if worker is not None and worker.stopping:
                return
            log.warning("the worker quit without being asked to (Redis lost mid-task?); starting again in %s s",
                        RESTART_AFTER)
            time.sleep(RESTART_AFTER)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as error:  # a bad setting: one line naming it, not a traceback
        sys.exit(f"jobs.worker: {error}")
