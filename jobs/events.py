"""Pushed job events: a job Slurm says changed is checked at once.

slurmctld runs deploy/libexec/m2d-slurm-event when a job starts
(PrologSlurmctld) and ends (jobcomp/script); it posts the job id to the
gateway (gateway.web.events), which keeps it on a Redis list. The poller's own
process waits on that list between its polls (``Watcher.watch``) and checks
what arrives: one sacct call for the ids that are jobs of active submissions,
then the very moves a poll makes (jobs.poller.apply). The push says only
"look at job N"; what moves a submission is what sacct says.

sacct can trail slurmctld by a moment (its records go through slurmdbd, and
PrologSlurmctld runs before the job is RUNNING), so a job that did not move is
checked again, sooner then later (RECHECKS), before it is left to the poll.
A push lost anywhere (the hook, the network, Redis, this process dying with
ids in hand) costs time, never a state: the poll, every PUSHED_POLL_INTERVAL
seconds, reconciles every active job from sacct.
"""
from __future__ import annotations

import logging
import time

from flask import current_app
from redis.exceptions import RedisError
from sqlalchemy import and_, or_

from gateway import metrics, queue
from gateway.adapters import slurm
from gateway.adapters.slurm import Scheduler, SlurmError
from gateway.core.models import Submission
from gateway.extensions import db

from . import poller

log = logging.getLogger(__name__)

# seconds before each further check of a pushed job that has not moved yet (6.2 s in all)
RECHECKS = (0.2, 0.4, 0.8, 1.6, 3.2)
REDIS_RETRY = 1.0  # seconds before waiting on Redis again after it failed


def enabled(cfg) -> bool:
    return bool(cfg["SLURM_EVENTS_TOKEN"])


def check(job_ids: list[str], scheduler: Scheduler | None = None) -> set[str]:
    """Check these jobs now and move their submissions as sacct says; the ids
    that need no further check (moved, ended, or no active job of ours)."""
    db.session.expire_all()
    submissions = Submission.query.filter(or_(
        and_(Submission.status.in_(poller.ACTIVE), Submission.slurm_job_id.in_(job_ids)),
        and_(Submission.status.in_(poller.DRY_RUN_ACTIVE), Submission.dry_run_job_id.in_(job_ids)))).all()
    ours = {poller._job_id(s): s for s in submissions}  # the poll's own reading of a job
    settled = set(job_ids) - set(ours)
    if settled:
        metrics.SLURM_EVENTS.inc(len(settled), outcome="other")
    if not ours:
        return settled
    scheduler = scheduler or slurm.from_config(current_app.config)
    try:
        infos = scheduler.statuses(list(ours))
    except SlurmError as e:  # sacct down: checked again, then the poll's
        log.warning("sacct did not answer about pushed jobs %s: %s", sorted(ours), e)
        return settled
    later = []  # the records of jobs' ends, after every move (and its e-mail) of this round
    for job_id, submission in ours.items():
        info = infos.get(job_id)
        try:
            moved = info is not None and poller._apply(submission, info, later)
        except Exception:  # noqa: BLE001 - one job never stops the others; the poll tries again
            db.session.rollback()
            log.exception("submission %s: pushed job %s could not be recorded", submission.id, job_id)
            continue
        if moved or (info is not None and info.finished):
            settled.add(job_id)
            if moved:
                metrics.SLURM_EVENTS.inc(outcome="moved")
    for record in later:
        try:
            record()
        except Exception:  # noqa: BLE001 - as the poll's: logged, the end itself is recorded
            db.session.rollback()
            log.exception("the end of a pushed job could not be fully recorded")
    return settled


class Watcher:
    """The pushed ids and the rechecks owed; lives as long as the poller's process."""

    def __init__(self, scheduler: Scheduler | None = None, clock=time.monotonic) -> None:
        self.scheduler, self.clock = scheduler, clock
        self.due: dict[str, tuple[float, int]] = {}  # job id -> (monotonic time of its next check, checks made)

    def watch(self, seconds: float) -> None:
        """Take pushed ids and check them for ``seconds`` (the poller's wait between polls)."""
        deadline = self.clock() + seconds
        redis = None
        while (now := self.clock()) < deadline:
            soonest = min((at for at, _ in self.due.values()), default=deadline)
            try:
                redis = redis or queue.connection()
                pushed = queue.pushed_job_events(redis, min(deadline, soonest) - now)
            except RedisError as e:
                log.warning("could not take pushed job events (Redis: %s); the poll goes on", e)
                redis = None
                time.sleep(min(REDIS_RETRY, max(0.0, deadline - self.clock())))
                continue
            for job_id in pushed:
                if job_id.isdigit():
                    self.due[job_id] = (0.0, self.due.get(job_id, (0.0, 0))[1])
            self.check_due()

    def check_due(self) -> None:
        now = self.clock()
        ready = sorted(job_id for job_id, (at, _) in self.due.items() if at <= now)
        if not ready:
            return
        try:
            settled = check(ready, self.scheduler)
        except Exception:  # noqa: BLE001 - the database away: checked again, then the poll's
            log.exception("pushed jobs %s could not be checked", ready)
            settled = set()
        finally:
            db.session.remove()  # no snapshot held between checks (SQLite's WAL)
        for job_id in ready:
            checks = self.due[job_id][1]
            if job_id in settled or checks >= len(RECHECKS):
                del self.due[job_id]
                if job_id not in settled:
                    metrics.SLURM_EVENTS.inc(outcome="unchanged")
            else:
                self.due[job_id] = (self.clock() + RECHECKS[checks], checks + 1)
