"""The prepare task run directly (no workers listening), against the real
builder and Slurm: retries never make a second job, and a job Slurm refuses
ends as failed with Slurm's own words."""
import os
import shutil
import tempfile
import time
import uuid
from datetime import timezone

import flask_migrate
import pytest
from werkzeug.datastructures import FileStorage

from gateway import create_app
from gateway.adapters.apptainer import ImageBuilder
from gateway.adapters.slurm.cli_scheduler import CliScheduler
from gateway.config import from_environment
from gateway.core import accounts, intake, lifecycle, workflow
from gateway.core.models import Email, Submission
from gateway.core.storage import SubmissionFiles
from gateway.extensions import db
from jobs import mail, tasks
from m2d.contract.states import Status

from .helpers.stack import SAMPLES, zip_folder


@pytest.fixture
def isolated_app(testbed):
    root = tempfile.mkdtemp(prefix="m2d-tasks-", dir="/tmp")  # shared with containers
    os.chmod(root, 0o711)  # the job account passes through, as through DATA_DIR
    config = from_environment() | {
        "TESTING": True, "DATA_DIR": root,
        "SQLALCHEMY_DATABASE_URI": f"sqlite:///{root}/gateway.db",
        "QUEUE_NAMESPACE": f"m2d-nobody-{uuid.uuid4().hex[:8]}",  # no worker listens here
        "SLURM_JOB_PREFIX": f"m2dtasks{uuid.uuid4().hex[:6]}",
        "SLURM_MEM": "1G",
    }
    app = create_app(config)
    with app.app_context():
        flask_migrate.upgrade()
        yield app
        db.session.remove()
    shutil.rmtree(root, ignore_errors=True)


def _received(tmp_path, sample="fails"):
    user = accounts.create_user(f"tasks-{uuid.uuid4().hex[:6]}@example.org", "Tasks")
    accounts.approve(user)  # its MLflow experiments: the job script names them
    zip_path = zip_folder(SAMPLES / sample, tmp_path / "s.zip")
    with open(zip_path, "rb") as f:
        return intake.accept(user, FileStorage(stream=f, filename="s.zip")).id


def test_retried_prepare_after_a_crash_finds_its_job_instead_of_submitting_again(isolated_app, tmp_path):
    sid = _received(tmp_path)
    # the crash: sbatch ran, but the worker died before recording the job id
    submission = db.session.get(Submission, sid)
    submission.status = "building"
    db.session.commit()
    image = ImageBuilder.from_config(isolated_app.config).ensure((SubmissionFiles(sid).code / "requirements.txt").read_text())
    first = workflow._submit(sid, SubmissionFiles(sid), image, dry_run=True)  # the dry run goes first

    tasks.prepare(sid)  # the retry
    db.session.expire_all()
    assert db.session.get(Submission, sid).dry_run_job_id == first
    name = f"{isolated_app.config['SLURM_JOB_PREFIX']}-{sid}-dry"
    assert CliScheduler().find(name, since=submission.created_at.replace(tzinfo=timezone.utc)) == first

    tasks.prepare(sid)  # and once more, now that it is queued: nothing happens
    assert [e.status for e in db.session.get(Submission, sid).events].count("dry_run_queued") == 1
    CliScheduler().cancel(first)  # its folders go with the test


def _real_job_sbatched_then_the_worker_died(app, sid):
    """Its dry run passed, its prepare claimed queued and sbatched the real
    job, then died before recording the job id (the interleaving is forced)."""
    submission = db.session.get(Submission, sid)
    submission.status, submission.dry_run_job_id = "dry_run_passed", "1"
    db.session.commit()
    assert lifecycle.advance(sid, Status.DRY_RUN_PASSED, Status.QUEUED)  # the claim
    files = SubmissionFiles(sid)
    image = ImageBuilder.from_config(app.config).ensure((files.code / "requirements.txt").read_text())
    return workflow._submit(sid, files, image)


def _slurm_state(job_id):
    """sacct's state of ``job_id`` once it has ended (the accounting trails slurmctld)."""
    for _ in range(60):
        info = CliScheduler().statuses([job_id]).get(job_id)
        if info is not None and info.finished:
            return info.state
        time.sleep(1)
    raise AssertionError(f"Slurm job {job_id} has not ended")


def test_a_cancel_after_the_worker_died_between_the_real_sbatch_and_the_record_scancels_that_job(
        isolated_app, tmp_path):
    sid = _received(tmp_path, "sleeps")
    orphan = _real_job_sbatched_then_the_worker_died(isolated_app, sid)
    tasks.cancel(sid)  # the researcher's cancel; no prepare is left to scancel the job
    db.session.expire_all()
    submission = db.session.get(Submission, sid)
    assert submission.status == "cancelled" and submission.slurm_job_id == orphan
    assert _slurm_state(orphan) == "CANCELLED"
    prefix = isolated_app.config["SLURM_JOB_PREFIX"]
    since = submission.created_at.replace(tzinfo=timezone.utc)
    assert CliScheduler().find(f"{prefix}-{sid}", since=since) == orphan  # and no other


def test_a_retried_prepare_after_the_worker_died_between_the_real_sbatch_and_the_record_records_that_job(
        isolated_app, tmp_path):
    sid = _received(tmp_path, "sleeps")
    first = _real_job_sbatched_then_the_worker_died(isolated_app, sid)
    tasks.prepare(sid)  # the sweep's retry
    db.session.expire_all()
    submission = db.session.get(Submission, sid)
    assert submission.status == "queued" and submission.slurm_job_id == first
    prefix = isolated_app.config["SLURM_JOB_PREFIX"]
    since = submission.created_at.replace(tzinfo=timezone.utc)
    assert CliScheduler().find(f"{prefix}-{sid}", since=since) == first  # no second job
    CliScheduler().cancel(first)


def test_job_that_slurm_refuses_fails_with_slurms_message(isolated_app, tmp_path):
    isolated_app.config["SLURM_PARTITION"] = "nosuchpartition"
    sid = _received(tmp_path)
    tasks.prepare(sid)  # outside rq: no retries left, so it fails at once
    db.session.expire_all()
    submission = db.session.get(Submission, sid)
    assert submission.status == "failed" and submission.slurm_job_id is None
    assert submission.reason == "the job could not be submitted to Slurm"
    assert "invalid partition" in submission.error.lower()
    assert [e.kind for e in Email.query.filter_by(submission_id=sid)] == ["received", "failed"]
    _, body = mail.render(Email.query.filter_by(submission_id=sid, kind="failed").one())
    assert "could not be started" in body and "not a problem with your code" in body


def test_cancel_before_the_build_means_no_build_and_no_job(isolated_app, tmp_path):
    sid = _received(tmp_path)
    assert lifecycle.cancel(db.session.get(Submission, sid)) == Status.CANCELLED
    tasks.prepare(sid)  # the message that was already queued
    db.session.expire_all()
    submission = db.session.get(Submission, sid)
    assert submission.status == "cancelled" and submission.slurm_job_id is None
    assert submission.env_key is None  # nothing was built
    name = f"{isolated_app.config['SLURM_JOB_PREFIX']}-{sid}"
    assert CliScheduler().find(name, since=submission.created_at.replace(tzinfo=timezone.utc)) is None


def test_upload_is_kept_when_redis_is_down(isolated_app, tmp_path):
    isolated_app.config["REDIS_URL"] = "redis://127.0.0.1:1/0"
    sid = _received(tmp_path)  # no exception: the poller's sweep hands it on later
    assert db.session.get(Submission, sid).status == "received"
    assert SubmissionFiles(sid).upload.exists()
