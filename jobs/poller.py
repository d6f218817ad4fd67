"""The poll cycle: one sacct call for every active job, then the state moves.

``poll_once`` is the periodic rq task's body; ``python -m jobs.poller`` is the
small clock process that enqueues it every POLL_INTERVAL seconds. Two polls
running at once are harmless: each move is conditional on the old status.
"""
import json
import logging
import sys
import time
from datetime import timedelta, timezone

from flask import current_app
from sqlalchemy import and_, func, or_, update

from gateway import metrics, queue
from gateway.adapters.mlflow import MlflowAdmin, MlflowError
from gateway.adapters.slurm import JobInfo, Scheduler, SlurmError
from gateway.adapters.slurm.reasons import explain
from gateway.config import ConfigError
from gateway.core import accounts, airlock, alerts, disclosure, disclosure_job, jobfiles, provenance, scheduling
from gateway.core.jobscript import EXPORT_FULL_EXIT, TIME_UP_EXIT, log_name, size_text
from gateway.core.lifecycle import advance
from gateway.core.models import AccountEmail, Email, Submission, User, utcnow
from gateway.extensions import db
from m2d.contract.states import Status

log = logging.getLogger(__name__)

ACTIVE = (Status.QUEUED.value, Status.RUNNING.value)
DRY_RUN_ACTIVE = (Status.DRY_RUN_QUEUED.value, Status.DRY_RUN_RUNNING.value)
PURGE_INTERVAL = 3600  # seconds between airlock retention and image gc runs (airlock.purge, images.collect)


def poll_once(scheduler: Scheduler | None = None) -> int:
    """Move every active submission (real job or dry run) to what Slurm says;
    returns how many moved."""
    started = time.monotonic()
    active = Submission.query.filter(or_(
        and_(Submission.status.in_(ACTIVE), Submission.slurm_job_id.isnot(None)),
        and_(Submission.status.in_(DRY_RUN_ACTIVE), Submission.dry_run_job_id.isnot(None)))).all()
    moved = 0
    if active:
        scheduler = scheduler or scheduling.scheduler()
        try:
            infos = scheduler.statuses([_job_id(s) for s in active])
        except SlurmError as e:
            # slurmdbd (sacct) down: wait; a job Slurm says nothing about is
            # never taken for lost, and the sweep and alerts go on
            log.warning("Slurm's accounting did not answer; no job moves this cycle: %s", e)
            infos = {}
        for submission in active:
            info = infos.get(_job_id(submission))
            try:
                if info is not None and _apply(submission, info):
                    moved += 1
            except Exception:  # noqa: BLE001 - one submission never stops the cycle for the others
                db.session.rollback()
                log.exception("submission %s: its job's end could not be recorded; next cycle again", submission.id)
        waiting = [s for s in active if s.status in WAITING
                   and not ((info := infos.get(_job_id(s))) and (info.started or info.finished))]
        if waiting:
            _explain_waits(scheduler, waiting)
    disclosure_job.poll()
    _sweep()
    metrics.POLL_SECONDS.observe(time.monotonic() - started)
    metrics.POLL_JOBS.observe(len(active))
    return moved


WAITING = (Status.QUEUED.value, Status.DRY_RUN_QUEUED.value)
RUNNING = (Status.RUNNING.value, Status.DRY_RUN_RUNNING.value)
# ids per UPDATE ... IN (...): well under SQLite's and PostgreSQL's bound-parameter limits
REASON_BATCH = 500


def _explain_waits(scheduler: Scheduler, waiting: list[Submission]) -> None:
    """Why Slurm holds each waiting job (squeue's reason code), in the
    researcher's words, kept in the submission's reason while it waits."""
    try:
        codes = scheduler.pending_reasons([_job_id(s) for s in waiting])
    except SlurmError:  # the reasons are a courtesy: the moves above are done
        log.exception("squeue did not say why jobs wait")
        return
    limits = scheduling.limits()
    users = {s.user_id for s in waiting}
    running = dict(db.session.query(Submission.user_id, func.count()).filter(
        Submission.user_id.in_(users), Submission.status.in_(RUNNING)).group_by(Submission.user_id))
    disabled = {user_id for (user_id,) in db.session.query(User.id).filter(
        User.id.in_(users), User.disabled_at.isnot(None))}
    changed: dict[tuple[str, str | None], list[int]] = {}
    for submission in waiting:
        code = codes.get(_job_id(submission))
        if code is None:
            continue  # not pending (any more), or not known to slurmctld yet
        words = explain(code, limits, running.get(submission.user_id, 0), submission.user_id in disabled)
        words = words[:255] if words else None
        if words != submission.reason:
            changed.setdefault((submission.status, words), []).append(submission.id)
    # one UPDATE per reason, not per job: a first cycle over 20,000 waiting jobs
    # wrote 20,000 rows one statement at a time (6.6 s, bench.scale --real)
    for (status, words), ids in changed.items():
        for start in range(0, len(ids), REASON_BATCH):
            # no move, no event: only while it still waits in the same state
            db.session.execute(update(Submission).where(
                Submission.id.in_(ids[start:start + REASON_BATCH]), Submission.status == status)
                .values(reason=words).execution_options(synchronize_session=False))
    db.session.commit()


def _job_id(submission: Submission) -> str:
    """The job Slurm runs for it now: the dry run's, then the real one."""
    return submission.dry_run_job_id if submission.status in DRY_RUN_ACTIVE else submission.slurm_job_id


def _apply(submission: Submission, info: JobInfo, later: list | None = None) -> bool:
    """Follow Slurm's view of one job; True if the submission moved. With
    ``later``, the records of a job's end (MLflow's runs, the export's
    manifest: seconds when MLflow is slow) are left there to run after the
    other jobs' moves, so their e-mails do not wait (jobs.events)."""
    if submission.status not in ACTIVE + DRY_RUN_ACTIVE:
        return False  # moved on since it was loaded: a pushed event's check, or a poll beside this one
    if submission.status in DRY_RUN_ACTIVE:
        return _apply_dry_run(submission, info, later)
    moved = False
    status = submission.state
    if status == Status.QUEUED and info.started:
        # also when it already ended: "started" is owed before "finished"
        moved |= advance(submission.id, Status.QUEUED, Status.RUNNING, at=_naive(info.start),
                         detail=f"Slurm job {info.job_id} on the node", reason=None)
        status = Status.RUNNING
    if info.finished:
        new, fields = _outcome(submission, info)
        ended = advance(submission.id, status, new, at=_naive(info.end), detail=fields["reason"], **fields)
        if ended:
            def record():
                count_relay_refusals(submission.id, info.job_id, dry_run=False)
                _record_job(submission, info, new)
                airlock.manifest(db.session.get(Submission, submission.id))
                owed = disclosure.owe(submission)  # the report job of its export
                db.session.commit()
                if owed:
                    queue.enqueue_disclosure(submission.id)
            _now_or_later(record, later)
        moved |= ended
    return moved


def _record_job(submission: Submission, info: JobInfo, outcome: Status, dry_run: bool = False) -> None:
    """The job's links of the provenance chain: what sacct says of it (id, node,
    times, exit), then the MLflow runs it created, found by the tag its relay put
    on each. MLflow being down leaves the error in the record, not a gap. A dry
    run's links (``dry_run_job``, ``dry_run_mlflow``) name the twin it read and
    its runs in the dry-run experiment."""
    prefix = "dry_run_" if dry_run else ""
    provenance.record(submission.id, f"{prefix}job", slurm_job_id=info.job_id, node=info.node, state=info.state,
                      start=info.start, end=info.end, exit_code=info.exit_code, signal=info.signal,
                      outcome=outcome.value, dataset_version=submission.dataset_version,
                      **({"dataset": "synthetic twin"} if dry_run else {}))
    user = submission.user
    experiment_id = user.mlflow_dry_run_experiment_id if dry_run else user.mlflow_experiment_id
    runs = {"experiment_id": experiment_id, "run_ids": []}
    if info.started and experiment_id:  # else it made none: it never ran, or its owner has no MLflow account
        try:
            if not current_app.config["MLFLOW_ADMIN_PASSWORD"]:
                raise MlflowError(None, "the gateway has no MLflow admin password (M2D_MLFLOW_ADMIN_PASSWORD)")
            runs["run_ids"] = MlflowAdmin.from_config(current_app.config).runs_of_job(experiment_id, info.job_id)
        except MlflowError as e:
            log.warning("submission %s: its MLflow runs are unknown: %s", submission.id, e)
            runs.update(run_ids=None, error=str(e))
    provenance.record(submission.id, f"{prefix}mlflow", **runs)


def _now_or_later(record, later: list | None) -> None:
    if later is None:
        record()
    else:
        later.append(record)


def _apply_dry_run(submission: Submission, info: JobInfo, later: list | None = None) -> bool:
    """The dry run's job: passed (exit 0) hands the real job to prepare."""
    moved = False
    status = submission.state
    if status == Status.DRY_RUN_QUEUED and info.started:
        moved |= advance(submission.id, Status.DRY_RUN_QUEUED, Status.DRY_RUN_RUNNING,
                         at=_naive(info.start), detail=f"dry run: Slurm job {info.job_id} on the node",
                         reason=None)
        status = Status.DRY_RUN_RUNNING
    if info.finished:
        new, fields = _dry_run_outcome(submission, info)
        if advance(submission.id, status, new, at=_naive(info.end), detail=f"dry run: {fields['dry_run_reason']}",
                   **fields):
            moved = True

            def record():
                count_relay_refusals(submission.id, info.job_id, dry_run=True)
                _record_job(submission, info, new, dry_run=True)
                db.session.commit()
                if new == Status.DRY_RUN_PASSED:
                    queue.enqueue_prepare(submission.id)  # the real job; the sweep if this is lost
            _now_or_later(record, later)
    return moved


def count_relay_refusals(submission_id: int, job_id: str, dry_run: bool) -> None:
    """Add what the job's relay refused (its stats file, written as it stopped)
    to m2d_relay_refusals_total, and record the runs it flagged as logging
    metrics per training case in the provenance (reviewers read them); once, by
    the poll that recorded the job's end."""
    found = jobfiles.read_tail(submission_id, jobfiles.LOGS, log_name(job_id, "relay.json", dry_run=dry_run),
                               RELAY_STATS_BYTES)
    try:
        data, size = found
        if size > RELAY_STATS_BYTES:
            return
        stats = json.loads(data)
        refused, flags = int(stats["refused"]), stats.get("flags") or {}
    except (TypeError, ValueError, KeyError, AttributeError):
        return  # no relay ran (a job that never started), or it was killed before writing
    if refused > 0:
        metrics.RELAY_REFUSALS.inc(refused, kind="dry_run" if dry_run else "real")
    if flags and isinstance(flags, dict) and not dry_run:
        provenance.record(submission_id, "mlflow_flagged", runs={str(run)[:64]: str(why)[:300]
                                                                 for run, why in list(flags.items())[:100]})


# Slurm's words, then ours: what a researcher can do about it.
EXPLAINED = {
    "OUT_OF_MEMORY": "OUT_OF_MEMORY: the job ran out of memory; its limit is {SLURM_MEM}. "
                     "Use smaller batches or images, or ask the admins for more",
    "TIMEOUT": "TIMEOUT: the job ran past its time limit of {SLURM_TIME}",
    # (reason is 255 characters at most)
    "NODE_FAIL": "NODE_FAIL: the compute node running the job failed. This is not a problem with your code: "
                 "upload it again",
}


def _filled_its_export(info: JobInfo) -> bool:
    """The batch script's own verdict: /mnt/export reached its limit. It names the
    cause, so it comes before the gateway's reading of what the full image held
    (the image keeps a few dozen inodes over EXPORT_MAX_FILES)."""
    return info.state == "FAILED" and info.exit_code == EXPORT_FULL_EXIT


def _outcome(submission: Submission, info: JobInfo) -> tuple[Status, dict]:
    if info.state != "CANCELLED" and not _filled_its_export(info) and (over := airlock.over_cap(submission.id)):
        return Status.FAILED, {"exit_code": info.exit_code, "reason": over, "error": stderr_tail(submission)}
    if info.state == "COMPLETED" and info.exit_code == 0:
        return Status.COMPLETED, {"exit_code": 0, "reason": "COMPLETED"}
    if info.state == "CANCELLED":
        return Status.CANCELLED, {"exit_code": info.exit_code, "reason": "CANCELLED"}
    return Status.FAILED, {"exit_code": info.exit_code, "reason": _failure_reason(info, EXPLAINED),
                           "error": stderr_tail(submission)}


def _failure_reason(info: JobInfo, explained: dict[str, str]) -> str:
    """Slurm's state in words a researcher can act on."""
    if _filled_its_export(info):
        cfg = current_app.config
        return (f"EXPORT_FULL: /mnt/export is over its limit of {size_text(cfg['EXPORT_MAX_BYTES'])} / "
                f"{cfg['EXPORT_MAX_FILES']:,} files (exit code {EXPORT_FULL_EXIT}). Export only what you want "
                "released (a model, metrics), never data")
    if info.state == "FAILED" and info.exit_code == TIME_UP_EXIT:  # stopped by its batch script to keep the export
        return explained["TIMEOUT"].format_map(current_app.config)
    if info.state in explained:
        # no signal: Slurm's 0:125 for OUT_OF_MEMORY is its marker, not a signal the code got
        return explained[info.state].format_map(current_app.config)
    reason = f"FAILED with exit code {info.exit_code}" if info.state == "FAILED" else info.state
    return reason + (f" (signal {info.signal})" if info.signal else "")


def stderr_tail(submission: Submission) -> str:
    """The last lines the job wrote to stderr, capped for an email."""
    cfg = current_app.config
    found = jobfiles.read_tail(submission.id, jobfiles.LOGS, log_name(submission.slurm_job_id, "err"),
                               cfg["STDERR_TAIL_BYTES"])
    if found is None:
        return "(no stderr was written)"
    text = jobfiles.text_of(found[0])
    lines = text.splitlines()[-cfg["STDERR_TAIL_LINES"]:]
    return "\n".join(lines)


# The dry run's words: its limits are its own.
DRY_RUN_EXPLAINED = EXPLAINED | {
    "TIMEOUT": "TIMEOUT: the dry run ran past its time limit of {DRY_RUN_TIME}; "
               "shorten it where M2D_DRY_RUN=1 is set (fewer epochs or batches)",
}


def _dry_run_outcome(submission: Submission, info: JobInfo) -> tuple[Status, dict]:
    log_text = dry_run_log(submission.id, info.job_id)
    files, unreadable = dry_run_files(submission.id)
    kept = {"dry_run_log": log_text, "dry_run_files": json.dumps(files)}
    if info.state == "CANCELLED":
        return Status.CANCELLED, {"dry_run_exit_code": info.exit_code, "dry_run_reason": "CANCELLED",
                                  "reason": "CANCELLED during the dry run", **kept}
    if info.state == "COMPLETED" and info.exit_code == 0 and not unreadable:
        return Status.DRY_RUN_PASSED, {"dry_run_exit_code": 0, "dry_run_reason": "COMPLETED", **kept}
    # the real job would leave the same export: it fails here, on the twin
    refused = unreadable and not _filled_its_export(info)
    reason = f"EXPORT_REFUSED: {unreadable}" if refused else _failure_reason(info, DRY_RUN_EXPLAINED)
    # No real data was involved: the whole log goes to the researcher.
    return Status.DRY_RUN_FAILED, {"dry_run_exit_code": info.exit_code, "dry_run_reason": reason[:255],
                                   "exit_code": info.exit_code, "reason": f"dry run {reason}"[:255],
                                   "error": log_text, **kept}


# what the page and the API show of the dry run's export (it ran on the twin: all of it)
DRY_RUN_PREVIEW_BYTES = 64 * 1024  # the text of each file up to this size
DRY_RUN_PREVIEW_TOTAL = 1024 * 1024  # and of all of them together
RELAY_STATS_BYTES = 64 * 1024


def dry_run_files(submission_id: int) -> tuple[list[dict], str | None]:
    """What the dry run left in export-dryrun/, read once now that it ended:
    [{path, size, text}], and why it could not be read within the bounds (None: it could)."""
    bounds = jobfiles.Bounds.from_config(current_app.config)
    try:
        listing = jobfiles.scan(submission_id, jobfiles.DRY_RUN_EXPORT, bounds, hashes=False,
                                previews=DRY_RUN_PREVIEW_BYTES, preview_total=DRY_RUN_PREVIEW_TOTAL)
    except jobfiles.Refused as e:
        return [], e.reason
    files = [{"path": f.path, "size": f.size, "text": f.text} for f in listing.files]
    files += [{"path": name, "size": None, "text": None, "skipped": why} for name, why in listing.skipped]
    return sorted(files, key=lambda f: f["path"]), None


def dry_run_log(submission_id: int, job_id: str) -> str:
    """The dry run's stdout, then its stderr: all of each up to DRY_RUN_LOG_BYTES
    (then its end). It ran on the synthetic twin, so nothing in it is hidden."""
    cap = current_app.config["DRY_RUN_LOG_BYTES"]
    parts = []
    for stream, name in (("out", "stdout"), ("err", "stderr")):
        file_name = log_name(job_id, stream, dry_run=True)
        found = jobfiles.read_tail(submission_id, jobfiles.LOGS, file_name, cap)
        if found is None:
            size, text = 0, f"(no {name} was written)"
        else:
            size, text = found[1], jobfiles.text_of(found[0])
        if size > cap:
            text = f"[... the first {size - cap} bytes left out ...]\n" + text
        parts.append(f"---- {name} ({file_name})\n{text.rstrip()}")
    return "\n".join(parts) + "\n"


def _sweep():
    """Hand on again what the database owes but no queue message carries
    (older than SWEEP_AFTER), then alert the admins about what is stuck."""
    cfg = current_app.config
    now = utcnow()
    cutoff = now - timedelta(seconds=cfg["SWEEP_AFTER"])
    # a prepare that died with its worker is started again (also the one that
    # submits the real job after a passed dry run); one still running holds
    # the submission's lock, so a second one returns at once; one that failed
    # waits out its backoff (gateway.core.alerts)
    for submission in Submission.query.filter(
            or_(Submission.status.in_((Status.RECEIVED.value, Status.BUILDING.value,
                                       Status.DRY_RUN_PASSED.value)),
                and_(Submission.status == Status.QUEUED.value, Submission.slurm_job_id.is_(None),
                     Submission.dry_run_job_id.isnot(None))),
            Submission.updated_at < cutoff):
        if alerts.prepare_due(submission, now, cfg["PREPARE_BACKOFF"]):
            queue.enqueue_prepare(submission.id)
    for (submission_id,) in db.session.query(Email.submission_id).filter(
            Email.sent_at.is_(None), Email.created_at < cutoff).distinct():
        queue.enqueue_mail(submission_id)
    for (email_id,) in db.session.query(AccountEmail.id).filter(
            AccountEmail.sent_at.is_(None), AccountEmail.created_at < cutoff):
        accounts.enqueue(email_id)
    disclosure_job.sweep(cutoff)
    alerts.raise_stuck(now)


def _naive(moment):
    return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment else None


def main():
    from gateway import create_app

    from . import events
    app = create_app()
    with app.app_context():
        alerts.thresholds(app.config)  # a bad M2D_STUCK_AFTER stops the poller at start
        # with Slurm's pushes the poll is the backstop, and the wait between polls checks what is pushed
        watcher = events.Watcher() if events.enabled(app.config) else None
        interval = app.config["PUSHED_POLL_INTERVAL" if watcher else "POLL_INTERVAL"]
        log.info("enqueueing a poll every %s s%s", interval, ", checking pushed job events between" if watcher else "")
        purged = 0.0
        while True:
            try:
                queue.enqueue_poll()
                if time.monotonic() - purged > PURGE_INTERVAL:  # the airlock's retention and image gc, hourly
                    queue.queue("poll").enqueue("jobs.tasks.purge_exports", job_timeout=1800)
                    queue.queue("poll").enqueue("jobs.tasks.collect_images", job_timeout=1800)
                    purged = time.monotonic()
            except Exception:  # noqa: BLE001 - Redis may come back
                log.exception("could not enqueue the poll")
            if watcher:
                watcher.watch(interval)
            else:
                time.sleep(interval)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as error:  # a bad setting: one line naming it, not a traceback
        sys.exit(f"jobs.poller: {error}")
