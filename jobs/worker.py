"""Run rq workers for the gateway: ``python -m jobs.worker [build mail poll]``.

The app is built once, before the worker starts (not once per task): rq forks
a child for every task, and the child inherits the app and its pushed context.
It must not inherit the parent's database connections, though: two processes
on one socket corrupt each other's conversation, so the child drops its
inherited pool (without closing the parent's connections) and opens its own.
"""
import sys

from rq import Worker

from gateway import create_app, queue
from gateway.extensions import db


class GatewayWorker(Worker):
    def main_work_horse(self, *args, **kwargs):
        db.engine.dispose(close=False)
        return super().main_work_horse(*args, **kwargs)


def main(names: list[str]) -> None:
    app = create_app()
    with app.app_context():
        redis = queue.connection()
        queues = [queue.queue(name, redis) for name in names or queue.NAMES]
        GatewayWorker(queues, connection=redis, serializer=queue.SERIALIZER).work(with_scheduler=True)


if __name__ == "__main__":
    main(sys.argv[1:])
