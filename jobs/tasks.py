"""rq tasks. Each takes an id, loads the truth from the database, and can be
retried without repeating its effect. The worker (jobs.worker) runs them inside
the gateway app it built once; a move of a submission queues its own email
(gateway.lifecycle)."""
from __future__ import annotations

import fcntl
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timezone
from functools import wraps
from pathlib import Path
from typing import TypeVar

from flask import current_app, has_app_context
from rq import get_current_job
from sqlalchemy import select

from gateway import create_app
from gateway.adapters import slurm
from gateway.adapters.apptainer import BuildError, Image, ImageBuilder
from gateway.adapters.slurm import Scheduler, SlurmError
from gateway.config import required
from gateway.extensions import db
from gateway.lifecycle import advance
from gateway.models import Build, Submission
from gateway.states import Status
from gateway.storage import SubmissionFiles, job_gid, write_private

from . import mail, poller
from .jobscript import RELAY_SOURCE, JobSpec, write_job_script

log = logging.getLogger(__name__)
T = TypeVar("T")


def in_app(task: Callable[..., T]) -> Callable[..., T]:
    """Run the task inside the gateway app.

    The worker pushed its app's context once, before forking (its session
    ends with each forked child); a task called elsewhere (a shell) gets an
    app of its own."""
    @wraps(task)
    def wrapped(*args, **kwargs):
        if has_app_context():
            return task(*args, **kwargs)
        with create_app().app_context():
            try:
                return task(*args, **kwargs)
            finally:
                db.session.remove()
    return wrapped


@in_app
def prepare(submission_id: int) -> None:
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
            image = _build(submission_id, files)
        except BuildError as e:
            advance(submission_id, Status.BUILDING, Status.BUILD_FAILED,
                    reason="environment build failed", error=e.for_user)
            return
        if _status(submission_id) != Status.BUILDING:
            return  # cancelled while it built
        try:
            job_id = _submit(submission_id, files, image)
        except SlurmError as e:
            rq_job = get_current_job()
            if rq_job is not None and rq_job.retries_left:
                raise  # perhaps slurmctld is restarting: rq tries again later
            advance(submission_id, Status.BUILDING, Status.FAILED,
                    reason="the job could not be submitted to Slurm", error=e.stderr or str(e))
            return
        if not advance(submission_id, Status.BUILDING, Status.QUEUED, slurm_job_id=job_id,
                       detail=f"Slurm job {job_id}"):
            scheduler().cancel(job_id)  # cancelled between the build and sbatch: it must not run


@in_app
def cancel(submission_id: int) -> None:
    """Ask Slurm to cancel the submission's job; the poller records the outcome."""
    job_id = db.session.scalar(select(Submission.slurm_job_id).where(Submission.id == submission_id))
    if job_id:
        scheduler().cancel(job_id)


@in_app
def send_mail(submission_id: int) -> int:
    return mail.send_owed(submission_id)


@in_app
def send_account_mail(email_id: int) -> bool:
    return mail.send_account(email_id)


@in_app
def poll() -> int:
    return poller.poll_once()


def scheduler() -> Scheduler:
    return slurm.from_config(current_app.config)


def _build(submission_id: int, files: SubmissionFiles) -> Image:
    requirements = (files.code / "requirements.txt").read_text()
    images = ImageBuilder.from_config(current_app.config)
    try:
        image = images.ensure(requirements)
    except BuildError as e:
        _record_build(submission_id, images.key_for(requirements), succeeded=False, log=e.log)
        raise
    if image.built:
        _record_build(submission_id, image.key, succeeded=True, log=image.log,
                      digest=image.digest, seconds=image.seconds)
    submission = db.session.get(Submission, submission_id)
    submission.env_key, submission.image_digest = image.key, image.digest
    db.session.commit()
    return image


def _status(submission_id: int) -> Status:
    return Status(db.session.scalar(select(Submission.status).where(Submission.id == submission_id)))


def _record_build(submission_id: int, key: str, *, succeeded: bool, log: str,
                  digest: str | None = None, seconds: float | None = None) -> None:
    db.session.add(Build(env_key=key, submission_id=submission_id, succeeded=succeeded,
                         image_digest=digest, seconds=seconds, log=log))
    db.session.commit()


def _submit(submission_id: int, files: SubmissionFiles, image: Image) -> str:
    """sbatch once: a retry after a crash finds the job it already made."""
    cfg = current_app.config
    submission = db.session.get(Submission, submission_id)
    user = submission.user
    spec = JobSpec(
        submission_id=submission_id,
        image=image.path,
        code_dir=files.code, dataset_dir=Path(required(cfg, "DATASET_DIR")),
        export_dir=files.export, log_dir=files.logs,
        relay=files.job / "relay.py", credentials=files.job / "mlflow.credentials",
        mlflow_upstream=cfg["MLFLOW_JOB_URL"], mlflow_url=cfg["MLFLOW_PUBLIC_URL"],
        experiment_id=user.mlflow_experiment_id, experiment_name=user.mlflow_username,
        models_dir=Path(cfg["MODELS_DIR"]) if cfg["MODELS_DIR"] else None,
        apptainer=cfg["APPTAINER"], python=cfg["RELAY_PYTHON"], partition=cfg["SLURM_PARTITION"] or None,
        gpus=cfg["SLURM_GPUS"], cpus=cfg["SLURM_CPUS"], mem=cfg["SLURM_MEM"],
        time=cfg["SLURM_TIME"], nv=cfg["APPTAINER_NV"],
        job_prefix=cfg["SLURM_JOB_PREFIX"],
    )
    batch_system = scheduler()
    existing = batch_system.find(spec.job_name, since=submission.created_at.replace(tzinfo=timezone.utc))
    if existing:
        log.info("submission %s already has Slurm job %s", submission_id, existing)
        return existing
    # What the job account reads (group): the relay, and the owner's MLflow
    # login for it; neither is bound into the container.
    gid = job_gid()
    write_private(spec.relay, RELAY_SOURCE.read_text(), gid=gid)
    write_private(spec.credentials, f"{user.mlflow_username}\n{user.mlflow_password}\n", gid=gid)
    script = write_job_script(spec, files.job / "job.sbatch")
    return batch_system.submit(script, spec.job_name)


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
