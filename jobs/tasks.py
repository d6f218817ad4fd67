"""rq tasks. Each takes an id, loads the truth from the database, and can be
retried without repeating its effect."""
import fcntl
import logging
from contextlib import contextmanager
from datetime import timezone
from functools import wraps
from pathlib import Path

from flask import current_app, has_app_context
from rq import get_current_job
from sqlalchemy import select

from gateway.extensions import db
from gateway.lifecycle import advance
from gateway.models import Build, Submission
from gateway.states import Status
from gateway.storage import SubmissionFiles

from . import mail, poller, queue
from .batch import BatchSpec, write_batch_script, write_env_file
from .builder import BuildError, ImageBuilder
from .slurm import SlurmError, make_scheduler

log = logging.getLogger(__name__)
_app = None


def in_app(task):
    """Run the task inside the gateway app (config, database session)."""
    @wraps(task)
    def wrapped(*args, **kwargs):
        global _app
        if has_app_context():
            return task(*args, **kwargs)
        if _app is None:
            from gateway import create_app
            _app = create_app()
        with _app.app_context():
            try:
                return task(*args, **kwargs)
            finally:
                db.session.remove()
    return wrapped


@in_app
def prepare(submission_id):
    """Build (or reuse) the submission's image and submit its Slurm job."""
    files = SubmissionFiles(submission_id)
    with _exclusive(files) as mine:
        if not mine:
            log.info("submission %s is being prepared by another worker", submission_id)
            return
        submission = db.session.get(Submission, submission_id)
        if submission is None:
            return
        if submission.state == Status.RECEIVED:
            if not advance(submission_id, Status.RECEIVED, Status.BUILDING):
                return  # cancelled meanwhile
        elif submission.state != Status.BUILDING:
            return  # done already: a retry or a duplicate message
        try:
            environment = _build(submission_id, files)
        except BuildError as e:
            if advance(submission_id, Status.BUILDING, Status.BUILD_FAILED,
                       reason="environment build failed", error=e.for_user):
                queue.enqueue_mail(submission_id)
            return
        if _status(submission_id) != Status.BUILDING:
            return  # cancelled while it built
        try:
            job_id = _submit(submission_id, files, environment)
        except SlurmError as e:
            job = get_current_job()
            if job is not None and job.retries_left:
                raise  # perhaps slurmctld is restarting: rq tries again later
            if advance(submission_id, Status.BUILDING, Status.FAILED,
                       reason="the job could not be submitted to Slurm", error=e.stderr or str(e)):
                queue.enqueue_mail(submission_id)
            return
        if advance(submission_id, Status.BUILDING, Status.QUEUED, slurm_job_id=job_id,
                   detail=f"Slurm job {job_id}"):
            queue.enqueue_mail(submission_id)
        else:  # cancelled between the build and sbatch: the job must not run
            scheduler().cancel(job_id)


@in_app
def cancel(submission_id):
    """Ask Slurm to cancel the submission's job; the poller records the outcome."""
    job_id = db.session.scalar(select(Submission.slurm_job_id).where(Submission.id == submission_id))
    if job_id:
        scheduler().cancel(job_id)


@in_app
def send_mail(submission_id):
    return mail.send_owed(submission_id)


@in_app
def poll():
    return poller.poll_once()


def scheduler():
    return make_scheduler(current_app.config["SLURM_ADAPTER"])


def builder():
    cfg = current_app.config
    return ImageBuilder(cfg["IMAGE_DIR"], cfg["BASE_IMAGE"], apptainer=cfg["APPTAINER"],
                        bind_ca=cfg["BUILD_BIND_CA"] or None, timeout=int(cfg["BUILD_TIMEOUT"]))


def _build(submission_id, files):
    requirements = (files.code / "requirements.txt").read_text()
    images = builder()
    try:
        environment = images.ensure(requirements)
    except BuildError as e:
        _record_build(submission_id, images.key_for(requirements), succeeded=False, log=e.log)
        raise
    if environment.built:
        _record_build(submission_id, environment.key, succeeded=True, log=environment.log,
                      digest=environment.digest, seconds=environment.seconds)
    submission = db.session.get(Submission, submission_id)
    submission.env_key, submission.image_digest = environment.key, environment.digest
    db.session.commit()
    return environment


def _status(submission_id):
    return Status(db.session.scalar(select(Submission.status).where(Submission.id == submission_id)))


def _record_build(submission_id, key, *, succeeded, log, digest=None, seconds=None):
    db.session.add(Build(env_key=key, submission_id=submission_id, succeeded=succeeded,
                         image_digest=digest, seconds=seconds, log=log))
    db.session.commit()


def _submit(submission_id, files, environment):
    """sbatch once: a retry after a crash finds the job it already made."""
    cfg = current_app.config
    submission = db.session.get(Submission, submission_id)
    user = submission.user
    spec = BatchSpec(
        submission_id=submission_id,
        image=environment.path,
        code_dir=files.code, dataset_dir=Path(cfg["DATASET_DIR"]),
        export_dir=files.export, log_dir=files.logs,
        env_file=files.job / "mlflow.env",
        apptainer=cfg["APPTAINER"], partition=cfg["SLURM_PARTITION"] or None,
        gpus=int(cfg["SLURM_GPUS"]), cpus=int(cfg["SLURM_CPUS"]), mem=str(cfg["SLURM_MEM"]),
        time=str(cfg["SLURM_TIME"]), nv=bool(cfg["APPTAINER_NV"]),
        job_prefix=cfg["SLURM_JOB_PREFIX"],
    )
    slurm = scheduler()
    existing = slurm.find(spec.job_name, since=submission.created_at.replace(tzinfo=timezone.utc))
    if existing:
        log.info("submission %s already has Slurm job %s", submission_id, existing)
        return existing
    write_env_file(spec.env_file, {
        "MLFLOW_TRACKING_URI": cfg["MLFLOW_JOB_URL"],
        "MLFLOW_TRACKING_USERNAME": user.mlflow_username or "",
        "MLFLOW_TRACKING_PASSWORD": user.mlflow_password or "",
        "MLFLOW_EXPERIMENT_NAME": user.mlflow_username or "",
    })
    script = write_batch_script(spec, files.job / "job.sbatch")
    return slurm.submit(script, spec.job_name)


@contextmanager
def _exclusive(files):
    """One worker at a time per submission (the workers share the gateway host)."""
    files.job.mkdir(parents=True, exist_ok=True)
    with open(files.job / ".prepare.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
