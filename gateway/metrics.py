"""The counters behind /metrics (served by gateway.web.ops), in Prometheus' text format.

The work is spread over processes: gunicorn's workers, the rq workers'
forked children (one per task, gone when it ends) and the poller. A counter
in one process's memory would hold a fraction of the count and die with the
child, so events are counted in Redis, in one hash per deployment
(``<QUEUE_NAMESPACE>-metrics``; HINCRBYFLOAT is atomic), and what the
database already knows (submissions by state) or rq knows (queue depths,
workers) is read when Prometheus scrapes. A scrape is one HGETALL, one
GROUP BY and a few rq calls.

Counting never fails the work it counts: with Redis down the count is lost
(logged) and the work goes on; Prometheus reads a counter that drops as a
restart.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass

from flask import current_app, has_app_context
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from redis import Redis, RedisError
from sqlalchemy import func

from m2d.contract.states import Status

from . import queue
from .core.models import Submission
from .extensions import db

log = logging.getLogger(__name__)
PREFIX = "m2d_"


def _store(redis: Redis | None = None) -> tuple[Redis, str]:
    """This deployment's Redis (one client per process, kept on the app; redis-py
    opens fresh connections in a forked child) and its metrics hash."""
    if redis is None:
        redis = current_app.extensions.get("m2d_metrics_redis")
        if redis is None:
            redis = current_app.extensions["m2d_metrics_redis"] = Redis.from_url(
                current_app.config["REDIS_URL"], socket_timeout=2, socket_connect_timeout=2)
    return redis, f"{current_app.config['QUEUE_NAMESPACE']}-metrics"


def _field(name: str, suffix: str, labels: dict[str, str]) -> str:
    return json.dumps([name, suffix, labels], sort_keys=True)


@dataclass(frozen=True)
class Counter:
    name: str
    help: str
    labels: tuple[str, ...] = ()

    def inc(self, amount: float = 1, **labels: str) -> None:
        _check_labels(self, labels)
        _write(lambda pipe, key: pipe.hincrbyfloat(key, _field(self.name, "", labels), amount))


@dataclass(frozen=True)
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...]
    labels: tuple[str, ...] = ()

    def observe(self, value: float, **labels: str) -> None:
        _check_labels(self, labels)

        def write(pipe, key):
            for bound in (*self.buckets, float("inf")):
                if value <= bound:  # cumulative, as Prometheus reads buckets
                    pipe.hincrbyfloat(key, _field(self.name, "_bucket", labels | {"le": _le(bound)}), 1)
            pipe.hincrbyfloat(key, _field(self.name, "_sum", labels), value)
            pipe.hincrbyfloat(key, _field(self.name, "_count", labels), 1)
        _write(write)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _check_labels(metric, labels: dict[str, str]) -> None:
    if set(labels) != set(metric.labels):
        raise ValueError(f"{metric.name} takes the labels {metric.labels}, not {tuple(labels)}")


def _write(commands) -> None:
    if not has_app_context():  # a library call outside the gateway (a test, a shell)
        return
    try:
        redis, key = _store()
        pipe = redis.pipeline(transaction=False)
        commands(pipe, key)
        pipe.execute()
    except RedisError as e:
        log.warning("a metric was not counted (Redis: %s)", e)


# ------------------------------------------------------------ the metrics

JOBS_SUBMITTED = Counter("jobs_submitted", "Jobs the gateway handed to Slurm (sbatch), by kind: dry_run or real.",
                         ("kind",))
SLURM_ERRORS = Counter("slurm_errors", "Slurm commands that failed (exit status) or timed out.",
                       ("command",))
EMAILS_SENT = Counter("emails_sent", "Emails the mail server accepted, by kind (received, queued, verify...).",
                      ("kind",))
EMAILS_FAILED = Counter("emails_failed", "Attempts to send an email that failed (each is retried).", ("kind",))
BUILDS = Counter("builds", "Environment images a submission needed: built, cached (an image with the same "
                 "requirements existed) or failed.", ("outcome",))
BUILD_SECONDS = Histogram("build_seconds", "Time to build one environment image.",
                          (30, 60, 120, 300, 600, 1200, 1800, 3600))
POLL_SECONDS = Histogram("poll_seconds", "Time of one poll cycle (one sacct call, the moves, the sweep).",
                         (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
POLL_JOBS = Histogram("poll_jobs", "Active jobs looked up in one poll cycle.", (0, 1, 10, 100, 1000, 10000))
EMAIL_LAG_SECONDS = Histogram("email_lag_seconds", "From a submission's change of state to its email's sending.",
                              (1, 5, 15, 60, 300, 900, 3600))
RELAY_REFUSALS = Counter("relay_refusals", "MLflow calls the relay beside a job refused (artifacts, other "
                         "experiments, over a cap or the rate), counted when the job ends.", ("kind",))
STORED = (RELAY_REFUSALS, JOBS_SUBMITTED, SLURM_ERRORS, EMAILS_SENT, EMAILS_FAILED, BUILDS, BUILD_SECONDS, POLL_SECONDS, POLL_JOBS,
          EMAIL_LAG_SECONDS)


class GatewayCollector:
    """Everything /metrics shows, read fresh at each scrape."""

    def __init__(self, redis: Redis, key: str) -> None:
        self.redis, self.key = redis, key

    def collect(self):
        yield self._submissions()
        try:
            stored = self.redis.hgetall(self.key)
            yield from self._stored(stored)
            yield from self._queues()
        except RedisError as e:  # the database's part still answers
            log.warning("/metrics without Redis' part: %s", e)

    def _submissions(self):
        family = GaugeMetricFamily(PREFIX + "submissions", "Submissions in each state, from the database.",
                                   labels=["state"])
        counts = dict(db.session.query(Submission.status, func.count()).group_by(Submission.status).all())
        for status in Status:
            family.add_metric([status.value], counts.get(status.value, 0))
        return family

    def _stored(self, stored: dict[bytes, bytes]):
        values: dict[str, dict[str, list[tuple[dict, float]]]] = defaultdict(lambda: defaultdict(list))
        for raw_field, raw_value in stored.items():
            name, suffix, labels = json.loads(raw_field)
            values[name][suffix].append((labels, float(raw_value)))
        for metric in STORED:
            seen = values.get(metric.name, {})
            if isinstance(metric, Counter):
                family = CounterMetricFamily(PREFIX + metric.name, metric.help, labels=list(metric.labels))
                for labels, value in seen.get("", []):
                    family.add_metric([labels[k] for k in metric.labels], value)
            else:
                family = HistogramMetricFamily(PREFIX + metric.name, metric.help, labels=list(metric.labels))
                for labels, total in seen.get("_sum", []):
                    key = [labels[k] for k in metric.labels]
                    buckets = {b["le"]: v for b, v in seen.get("_bucket", [])
                               if [b[k] for k in metric.labels] == key}
                    family.add_metric(key, [(_le(bound), buckets.get(_le(bound), 0))
                                            for bound in (*metric.buckets, float("inf"))], total)
            yield family

    def _queues(self):
        depth = GaugeMetricFamily(PREFIX + "queue_depth", "Tasks waiting in each rq queue.", labels=["queue"])
        failed = GaugeMetricFamily(PREFIX + "queue_failed", "Tasks in each queue's failed registry (out of "
                                   "retries).", labels=["queue"])
        workers = GaugeMetricFamily(PREFIX + "workers", "rq workers alive on each queue.", labels=["queue"])
        for name, q in queue.all_queues(self.redis).items():
            depth.add_metric([name], q.count)
            failed.add_metric([name], q.failed_job_registry.count)
            workers.add_metric([name], len(queue.workers(q)))
        yield from (depth, failed, workers)


def exposition() -> bytes:
    """Every counter and gauge, as one scrape of /metrics answers them."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(*_store()))
    return generate_latest(registry)
