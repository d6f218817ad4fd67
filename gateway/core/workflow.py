"""A submission's way to Slurm: build (or reuse) its environment image, run its
dry run on the synthetic twin, hand the real job to Slurm, record each job it
made, and cancel. Plain Python in the gateway's app: the rq tasks
(jobs.tasks) load nothing and decide nothing, they call these with an id and
let rq retry what raises.

Each step can be repeated without repeating its effect: a file lock holds a
submission for one worker at a time, every move is a conditional update
(gateway.core.lifecycle), and sbatch is preceded by a lookup by the job's
name, so a retried prepare finds the job it made before a crash.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import pwd
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timezone
from pathlib import Path

from flask import current_app
from sqlalchemy import select, update

from m2d.contract import twin
from m2d.contract.states import DRY_RUN_ACTIVE, Status
from m2d.contract.validation import PYTHON_VERSION_FILE, Refusal, parse_python_version

from .. import metrics
from ..adapters.apptainer import BuildError, Image, ImageBuilder, NoSpace
from ..adapters.mlflow import MlflowAdmin, MlflowError, dry_run_experiment_name
from ..adapters.slurm import SlurmError, SlurmRefused
from ..adapters.slurm.reasons import refusal
from ..config import required
from ..extensions import db
from . import accounts, alerts, intake, jobfiles, provenance, scheduling
from .jobscript import RELAY_SOURCE, JobSpec, job_name, write_job_script
from .lifecycle import advance
from .models import Build, Submission, User, utcnow
from .storage import SubmissionFiles, job_gid, write_private

log = logging.getLogger(__name__)


def prepare(submission_id: int, retries_left: bool = False) -> None:
    """Build (or reuse) the submission's image and submit its dry run (or, with
    dry runs off, its real job); once the dry run passed (the poller enqueues
    this again), submit the real job.

    Slurm's and MLflow's errors are raised, for rq to retry while it has
    ``retries_left`` (``_hand_to_slurm``); any other failure (an unreadable
    file, a full disk) is recorded, and the sweep tries again with a growing
    pause, then fails it (gateway.core.alerts)."""
    try:
        _prepare(submission_id, retries_left)
    except (SlurmError, MlflowError):
        raise
    except Exception as e:  # noqa: BLE001 - recorded, retried with backoff, then the submission fails
        log.exception("prepare of submission %s failed", submission_id)
        alerts.prepare_failed(submission_id, e)


def _prepare(submission_id: int, retries_left: bool) -> None:
    files = SubmissionFiles(submission_id)
    with _exclusive(files) as mine:
        if not mine:
            log.info("submission %s is being prepared by another worker", submission_id)
            return
        submission = db.session.get(Submission, submission_id)
        if submission is None:
            return
        if submission.state == Status.DRY_RUN_PASSED or _real_job_claimed(submission):
            _after_dry_run(submission_id, files, retries_left)
            return
        if submission.state == Status.RECEIVED:
            if not advance(submission_id, Status.RECEIVED, Status.BUILDING):
                return  # cancelled meanwhile
        elif submission.state != Status.BUILDING:
            return  # done already: a retry or a duplicate message
        try:
            image = _build(submission_id, files)
        except NoSpace:
            raise  # a full disk is the platform's: retried, then failed (prepare)
        except BuildError as e:
            advance(submission_id, Status.BUILDING, Status.BUILD_FAILED,
                    reason="environment build failed", error=e.for_user)
            return
        if _status(submission_id) != Status.BUILDING:
            return  # cancelled while it built
        dry_run = dry_run_wanted(db.session.get(Submission, submission_id))
        _hand_to_slurm(submission_id, files, image, Status.BUILDING, dry_run, retries_left)


def _after_dry_run(submission_id: int, files: SubmissionFiles, retries_left: bool) -> None:
    """The dry run passed: the real job goes to Slurm, in the image it used.

    The move to queued is claimed *before* sbatch (conditional on
    dry_run_passed), so a cancel either wins that move (no real job is ever
    submitted) or finds the submission queued, and then the job id is recorded
    only while it is still queued; a cancel that came between makes this
    scancel the job it just made (``_record_real_job``)."""
    if _status(submission_id) == Status.DRY_RUN_PASSED and not advance(
            submission_id, Status.DRY_RUN_PASSED, Status.QUEUED,
            detail="the dry run passed: the real job goes to Slurm"):
        return  # cancelled meanwhile: no real job
    images = ImageBuilder.from_config(current_app.config)
    try:  # the image of the dry run, cached (rebuilt only if an admin removed it)
        image = images.ensure((files.code / "requirements.txt").read_text(), python_of(files))
    except NoSpace:
        raise
    except BuildError as e:
        advance(submission_id, Status.QUEUED, Status.FAILED,
                reason="environment build failed", error=e.for_user)
        return
    if _status(submission_id) != Status.QUEUED:
        return  # cancelled while the image was checked
    _hand_to_slurm(submission_id, files, image, Status.QUEUED, False, retries_left)


def _real_job_claimed(submission: Submission) -> bool:
    """Queued after its dry run, but its job id not recorded yet (a prepare
    died around sbatch): the retry finds the job by name or submits it."""
    return (submission.state == Status.QUEUED and submission.slurm_job_id is None
            and submission.dry_run_job_id is not None)


def _record_real_job(submission_id: int, job_id: str) -> bool:
    """The real job's id, only while the submission is still queued without one."""
    result = db.session.execute(
        update(Submission)
        .where(Submission.id == submission_id, Submission.status == Status.QUEUED.value,
               Submission.slurm_job_id.is_(None))
        .values(slurm_job_id=job_id, updated_at=utcnow())
        .execution_options(synchronize_session=False))
    db.session.commit()
    return result.rowcount == 1


def dry_run_wanted(submission: Submission) -> bool:
    """Dry runs are on (DRY_RUN) and the owner is not exempted."""
    return bool(current_app.config["DRY_RUN"]) and not submission.user.skip_dry_run


def _hand_to_slurm(submission_id: int, files: SubmissionFiles, image: Image, old: Status,
                   dry_run: bool, retries_left: bool) -> None:
    """sbatch the dry run or the real job, and record it (from ``old``).
    Slurm or MLflow down: raised while rq has ``retries_left``, else the
    submission fails saying which."""
    try:
        job_id = _submit(submission_id, files, image, dry_run=dry_run)
    except SlurmRefused as e:  # a limit of the researcher's account: trying again changes nothing
        advance(submission_id, old, Status.FAILED, reason=refusal(e.stderr, scheduling.limits())[:255],
                error=e.stderr or str(e))
        return
    except (SlurmError, MlflowError) as e:
        if retries_left:
            raise  # perhaps slurmctld or MLflow is restarting: rq tries again later
        if isinstance(e, SlurmError):  # the dry run is a job too: the event says which
            reason, error = "the job could not be submitted to Slurm", e.stderr or str(e)
        else:
            reason, error = "the dry run's MLflow experiment could not be made", str(e)
        advance(submission_id, old, Status.FAILED, reason=reason, error=error)
        return
    if dry_run:
        moved = advance(submission_id, old, Status.DRY_RUN_QUEUED, dry_run_job_id=job_id,
                        detail=f"dry run: Slurm job {job_id}")
    elif old == Status.QUEUED:  # after the dry run: queued was claimed before sbatch
        moved = _record_real_job(submission_id, job_id)
    else:
        moved = advance(submission_id, old, Status.QUEUED, slurm_job_id=job_id,
                        detail=f"Slurm job {job_id}")
    if not moved:  # cancelled between the build and sbatch: it must not run
        scheduling.scheduler().cancel(job_id)
        _record_cancelled_job(submission_id, "dry_run_job_id" if dry_run else "slurm_job_id", job_id)


class SubmissionBusy(RuntimeError):
    """A prepare holds the submission (building, or around sbatch): rq tries the task again later."""


def cancel(submission_id: int) -> None:
    """Ask Slurm to cancel the submission's job (the dry run's while it is
    Slurm's); the poller records the outcome. Between a passed dry run and
    the real job's sbatch there is no job: the submission ends here. Once it
    has ended cancelled, a job whose id was never recorded (its prepare died
    between sbatch and the record) is found by its name and scancelled."""
    for _ in range(3):  # again if it moved on meanwhile (dry run -> real job)
        db.session.expire_all()
        submission = db.session.get(Submission, submission_id)
        if submission is None:
            return
        status = submission.state
        if status == Status.CANCELLED:
            _cancel_unrecorded_jobs(submission)
            return
        if status.terminal:
            return
        if status in DRY_RUN_ACTIVE and submission.dry_run_job_id:
            scheduling.scheduler().cancel(submission.dry_run_job_id)
        elif status == Status.DRY_RUN_PASSED or _real_job_claimed(submission):
            # a prepare around the real job's sbatch finds it cancelled and
            # scancels what it made (_record_real_job); one that died there
            # left a job only its name leads to
            if advance(submission_id, status, Status.CANCELLED, detail="cancelled by the researcher"):
                _cancel_unrecorded_jobs(db.session.get(Submission, submission_id))
                return
        elif submission.slurm_job_id:
            scheduling.scheduler().cancel(submission.slurm_job_id)
        if _status(submission_id) == status:
            return


def _cancel_unrecorded_jobs(submission: Submission) -> None:
    """scancel the jobs of a cancelled submission that Slurm has under its
    names but the database has no id for, and record their ids.

    Only while no prepare holds the submission: a live one scancels what it
    makes itself once it sees the cancel (_hand_to_slurm), and after it let
    go (or died) every job it made is in Slurm, so the lookup is conclusive.
    """
    prefix = current_app.config["SLURM_JOB_PREFIX"]
    unrecorded = [(column, job_name(prefix, submission.id, dry_run=column == "dry_run_job_id"))
                  for column in ("dry_run_job_id", "slurm_job_id") if getattr(submission, column) is None]
    if not unrecorded:
        return
    with _exclusive(SubmissionFiles(submission.id)) as mine:
        if not mine:
            raise SubmissionBusy(f"submission {submission.id} is being prepared; its cancel is tried again later")
        since = submission.created_at.replace(tzinfo=timezone.utc)
        batch_system = scheduling.scheduler()
        for column, name in unrecorded:
            job_id = batch_system.find(name, since=since)
            if job_id is None:
                continue
            batch_system.cancel(job_id)
            log.warning("submission %s: cancelled Slurm job %s (%s), whose id its prepare never recorded",
                        submission.id, job_id, name)
            _record_cancelled_job(submission.id, column, job_id)


def _record_cancelled_job(submission_id: int, column: str, job_id: str) -> None:
    """The id of a job scancelled because its submission was cancelled, for the record."""
    db.session.execute(
        update(Submission).where(Submission.id == submission_id, Submission.status == Status.CANCELLED.value,
                                 getattr(Submission, column).is_(None))
        .values({column: job_id}).execution_options(synchronize_session=False))
    db.session.commit()


def _build(submission_id: int, files: SubmissionFiles) -> Image:
    requirements = (files.code / "requirements.txt").read_text()
    python = python_of(files)
    images = ImageBuilder.from_config(current_app.config)
    try:
        image = images.ensure(requirements, python)
    except BuildError as e:
        try:
            key = images.key_for(requirements, python)
        except BuildError:
            raise e from None  # no base image for that Python: there is no key to record
        _record_build(submission_id, key, succeeded=False, log=e.log)
        metrics.BUILDS.inc(outcome="failed")
        raise
    if image.built:
        _record_build(submission_id, image.key, succeeded=True, log=image.log,
                      digest=image.digest, seconds=image.seconds)
        metrics.BUILD_SECONDS.observe(image.seconds or 0)
    metrics.BUILDS.inc(outcome="built" if image.built else "cached")
    submission = db.session.get(Submission, submission_id)
    submission.env_key, submission.image_digest = image.key, image.digest
    provenance.record(submission_id, "environment", requirements_sha256=hashlib.sha256(requirements.encode()).hexdigest(),
                      python=python, env_key=image.key, image_digest=image.digest, built=image.built)
    db.session.commit()
    return image


def python_of(files: SubmissionFiles) -> str:
    """The Python the submission's .python-version asks for (checked at upload), else the default."""
    version_file = files.code / PYTHON_VERSION_FILE
    if not version_file.is_file():
        return current_app.config["DEFAULT_PYTHON"]
    try:
        return parse_python_version(version_file.read_text(errors="replace"), intake.limits())
    except Refusal as e:  # the supported set changed since the upload
        raise BuildError(e.message) from e


def _status(submission_id: int) -> Status:
    return Status(db.session.scalar(select(Submission.status).where(Submission.id == submission_id)))


def _record_build(submission_id: int, key: str, *, succeeded: bool, log: str,
                  digest: str | None = None, seconds: float | None = None) -> None:
    db.session.add(Build(env_key=key, submission_id=submission_id, succeeded=succeeded,
                         image_digest=digest, seconds=seconds, log=log))
    db.session.commit()


def _submit(submission_id: int, files: SubmissionFiles, image: Image, dry_run: bool = False) -> str:
    """sbatch once: a retry after a crash finds the job it already made (the
    dry run's name is <prefix>-<id>-dry, the real job's <prefix>-<id>)."""
    cfg = current_app.config
    submission = db.session.get(Submission, submission_id)
    user = submission.user
    version = _dataset_version(submission)
    if dry_run:
        dataset, export = _twin(version), _dry_run_export(files)
        experiment_id = _dry_run_experiment(user)
        experiment_name = dry_run_experiment_name(user.mlflow_username)
        partition = cfg["DRY_RUN_PARTITION"] or cfg["SLURM_PARTITION"]
        gpus, time = cfg["DRY_RUN_GPUS"], cfg["DRY_RUN_TIME"]
    else:
        dataset, export = Path(required(cfg, "DATASET_DIR")), files.export
        experiment_id, experiment_name = user.mlflow_experiment_id, user.mlflow_username
        partition, gpus, time = cfg["SLURM_PARTITION"], cfg["SLURM_GPUS"], cfg["SLURM_TIME"]
    spec = JobSpec(
        submission_id=submission_id,
        image=image.path,
        code_dir=files.code, dataset_dir=dataset,
        export_dir=export, log_dir=files.logs,
        relay=files.job / "relay.py", credentials=files.job / "mlflow.credentials",
        mlflow_upstream=cfg["MLFLOW_JOB_URL"], mlflow_url=cfg["MLFLOW_PUBLIC_URL"],
        experiment_id=experiment_id, experiment_name=experiment_name,
        models_dir=Path(cfg["MODELS_DIR"]) if cfg["MODELS_DIR"] else None,
        apptainer=cfg["APPTAINER"], python=cfg["RELAY_PYTHON"], partition=partition or None,
        gpus=gpus, cpus=cfg["SLURM_CPUS"], mem=cfg["SLURM_MEM"],
        time=time, nv=bool(cfg["APPTAINER_NV"] and gpus),
        job_prefix=cfg["SLURM_JOB_PREFIX"], dry_run=dry_run,
        experiment_alias=user.mlflow_username if dry_run else None,
        mlflow_text_budget=cfg["MLFLOW_TEXT_BUDGET"], mlflow_metric_budget=cfg["MLFLOW_METRIC_BUDGET"],
        mlflow_upstream_rate=cfg["MLFLOW_CALLS_PER_SECOND"] / max(1, cfg["MLFLOW_JOBS_AT_ONCE"]),
        export_max_bytes=cfg["EXPORT_MAX_BYTES"], export_max_files=cfg["EXPORT_MAX_FILES"],
        log_max_bytes=cfg["JOB_LOG_MAX_BYTES"],
        # the job asks the wrapper for the login, as this (the gateway's) account
        credential_user=pwd.getpwuid(os.geteuid()).pw_name if cfg["JOB_USER"] else None,
        slurm_wrapper=cfg["SLURM_WRAPPER"],
    )
    batch_system = scheduling.scheduler()
    existing = batch_system.find(spec.job_name, since=submission.created_at.replace(tzinfo=timezone.utc))
    if existing:
        log.info("submission %s already has Slurm job %s (%s)", submission_id, existing, spec.job_name)
        return existing
    # What the job account reads (group): the relay.  The owner's MLflow login
    # is the gateway's alone: the job gets it through the wrapper, which
    # hands each job its own (deploy/libexec/m2d-slurm credential).
    write_private(spec.relay, RELAY_SOURCE.read_text(), gid=job_gid())
    write_private(spec.credentials, f"{user.mlflow_username}\n{user.mlflow_password}\n")
    script = write_job_script(spec, files.job / ("dryrun.sbatch" if dry_run else "job.sbatch"))
    # the researcher's own Slurm account: their fair share, their limits
    job_id = batch_system.submit(script, spec.job_name, account=accounts.slurm_account(user))
    metrics.JOBS_SUBMITTED.inc(kind="dry_run" if dry_run else "real")
    return job_id


def _dataset_version(submission: Submission) -> str:
    """The dataset version its jobs run on: DATASET_VERSION when it first went
    to Slurm, kept for its real job (the real data is the admins' to keep at
    that version)."""
    current = current_app.config["DATASET_VERSION"]
    if submission.dataset_version is None:
        submission.dataset_version = current
        db.session.commit()
    elif submission.dataset_version != current:
        log.warning("submission %s: its dry run ran on the twin of dataset version %s, DATASET_VERSION is now %s",
                    submission.id, submission.dataset_version, current)
    return submission.dataset_version


def _twin(version: str) -> Path:
    """The synthetic twin of ``version``, made on first use in the shape of the
    real data (DATASET_DIR's CSV files: split, label and view counts)."""
    cfg = current_app.config
    root = cfg["TWIN_DIR"]
    if version == cfg["DATASET_VERSION"] and cfg["DATASET_DIR"]:
        try:
            return twin.ensure(root, version, dataset=cfg["DATASET_DIR"])
        except PermissionError as e:
            # where only the job account reads the dataset, the admins make its twin (docs/admin.md)
            log.info("dataset version %s: the gateway may not read its CSV files (%s); using the twin made for it",
                     version, e)
    # DATASET_DIR holds another version now (or is not ours to read): the twin stays as it was made
    if twin.is_made(root, version):
        return twin.path(root, version)
    log.warning("dataset version %s: no twin of it, and the gateway cannot read the counts of its data; making "
                "one in the published sample's proportions (docs/admin.md: make it from the real counts)", version)
    return twin.ensure(root, version)


def _dry_run_export(files: SubmissionFiles) -> Path:
    """export-dryrun/, beside export/ and like it: the job writes it (group)."""
    path = files.root / jobfiles.DRY_RUN_EXPORT
    path.mkdir(exist_ok=True)
    os.chown(path, -1, job_gid())
    path.chmod(0o2770)
    return path


def _dry_run_experiment(user: User) -> str:
    """The owner's "<experiment>-dryrun": made at approval, or here for a user
    approved before dry runs existed."""
    if not user.mlflow_dry_run_experiment_id:
        admin = MlflowAdmin.from_config(current_app.config)
        user.mlflow_dry_run_experiment_id = admin.provision_dry_run(user.mlflow_username)
        db.session.commit()
    return user.mlflow_dry_run_experiment_id


@contextmanager
def _exclusive(files: SubmissionFiles) -> Iterator[bool]:
    """One worker at a time per submission (the workers share the gateway host)."""
    files.job.mkdir(parents=True, exist_ok=True)
    with open(files.job / ".prepare.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
