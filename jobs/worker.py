"""Run rq workers for the gateway: ``python -m jobs.worker [build mail poll]``."""
import sys

from rq import Worker

from gateway import create_app

from . import queue


def main(names):
    app = create_app()
    with app.app_context():
        redis = queue.connection()
        queues = [queue.queue(name, redis) for name in names or queue.NAMES]
    Worker(queues, connection=redis).work(with_scheduler=True)


if __name__ == "__main__":
    main(sys.argv[1:])
