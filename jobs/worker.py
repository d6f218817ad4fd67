"""Run rq workers for the gateway: ``python -m jobs.worker [build mail poll]``.

The app is built once, before the worker starts (not once per task): rq forks
a child for every task, and the child inherits the app and its pushed context.
It must not inherit the parent's database connections, though: two processes
on one socket corrupt each other's conversation, so the child drops its
inherited pool (without closing the parent's connections) and opens its own.

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
from rq import Worker

from gateway import create_app, queue
from gateway.extensions import db

log = logging.getLogger(__name__)
RESTART_AFTER = 5  # seconds


class GatewayWorker(Worker):
    stopping = False

    def main_work_horse(self, *args, **kwargs):
        db.engine.dispose(close=False)
        return super().main_work_horse(*args, **kwargs)

    def request_stop(self, signum, frame):
        self.stopping = True
        return super().request_stop(signum, frame)


def main(names: list[str]) -> None:
    app = create_app()
    with app.app_context():
        while True:
            worker = None
            try:
                redis = queue.connection()
                queues = [queue.queue(name, redis) for name in names or queue.NAMES]
                worker = GatewayWorker(queues, connection=redis, serializer=queue.SERIALIZER)
                worker.work(with_scheduler=True)
            except RedisConnectionError:  # its teardown could not reach Redis either
                log.exception("the worker lost Redis")
            if worker is not None and worker.stopping:
                return
            log.warning("the worker quit without being asked to (Redis lost mid-task?); starting again in %s s",
                        RESTART_AFTER)
            time.sleep(RESTART_AFTER)


if __name__ == "__main__":
    main(sys.argv[1:])
