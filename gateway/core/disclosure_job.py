"""The sealed job that writes a submission's disclosure report (singularity/disclosure.sbatch.j2).

It runs on the data side after the submission's job ended, as the job account,
through the Slurm adapter and the root wrapper (m2d-slurm submit
.../job/disclosure.sbatch <prefix>-<id>-disclosure: no MLflow login, no
researcher's account: the check is the platform's work, not their share), in
the image of the checker's requirements (m2d's `disclosure` extra, built and
kept by the image builder like any environment), with the m2d package this
gateway serves unpacked read-only beside its batch script. The dataset's
fingerprint index lives in DISCLOSURE_INDEX_DIR/<dataset version>, which the
job account reads and the gateway cannot. The report comes back as
disclosure/report.json, read by gateway.core.jobfiles once sacct says the job ended
(``poll``); gateway.core.disclosure keeps it. With RELEASE_SANITISED_MODELS on,
the job also writes each model file's sanitised copy (--sanitise-bits
RELEASE_MANTISSA_BITS) beside it, disclosure/sanitised/: the gateway never
reads the export to sanitise, the copy comes only from this job
(gateway.core.releases releases it). Where the submission declares predict,
the job also asks it about the export as it would be released (each model file
rounded as its copy is) and the report keeps the rounded model's held-out
metric beside the original's (the sanitised-metric check).

    owed --submit (rq, build queue)--> submitted --poll--> done | failed
"""
from __future__ import annotations

import io
import logging
import os
import re
import zipfile
from datetime import timezone
from pathlib import Path

from flask import current_app
from sqlalchemy import update

from m2d.contract.validation import M2D_TOML, Refusal, parse_m2d_toml

from .. import client_wheel, queue
from ..adapters.apptainer import BuildError, ImageBuilder
from ..adapters.slurm import JobInfo, Scheduler, SlurmError
from ..config import ConfigError, required
from ..extensions import db
from . import disclosure, jobfiles, scheduling
from .models import DisclosureReport, Submission, utcnow
from .storage import SubmissionFiles, job_gid, job_writable, write_private
from .templating import render

log = logging.getLogger(__name__)

TEMPLATE = "singularity/disclosure.sbatch.j2"
SCRIPT_NAME = "disclosure.sbatch"
REPORT_NAME, ACRO_NAME = "report.json", "acro.json"
CHECKER_MOUNT = "/opt/m2d/checker"
INDEX_ROOT_MOUNT = "/mnt/index-root"
EXTRA = "disclosure"  # m2d's extra: the checker's requirements
GRACE_SECONDS = 300  # Slurm's time limit is DISCLOSURE_SECONDS plus this: the checker stops itself first
_SAFE_PATH = re.compile(r"[A-Za-z0-9_./+-]+")


def job_name(prefix: str, submission_id: int) -> str:
    return f"{prefix}-{submission_id}-disclosure"


def log_name(job_id: str, stream: str) -> str:
    """The report job's Slurm log in the submission's logs/ ("out" or "err")."""
    return f"disclosure-{job_id}.{stream}"


def requirements() -> str:
    found = client_wheel.extra_requirements(EXTRA)
    if not found:
        raise BuildError(f"m2d has no '{EXTRA}' extra in pyproject.toml: the checker's requirements are unknown")
    return "\n".join(found) + "\n"


# ------------------------------------------------------------------ submitting

def submit(submission_id: int) -> str | None:
    """sbatch the report job of an owed report (once: a retry finds the job by
    its name); its Slurm id, or None when nothing is owed. SlurmError is rq's to
    retry; an image that cannot be built fails the report."""
    row = db.session.get(DisclosureReport, submission_id)
    if row is None or row.status != "owed":
        return None
    cfg = current_app.config
    submission = db.session.get(Submission, submission_id)
    try:
        image = ImageBuilder.from_config(cfg).ensure(requirements(), cfg["DEFAULT_PYTHON"])
    except (BuildError, ConfigError, ValueError) as e:  # ValueError: a setting the builder needs is missing
        disclosure.failed(row, f"the checker's image could not be built: {e}")
        db.session.commit()
        return None
    files = SubmissionFiles(submission_id)
    membership = _membership_image(files)
    wheel = client_wheel.build()
    try:
        script = _write_job(submission, files, image.path, wheel.data, membership)
    except (ConfigError, ValueError) as e:  # the site's settings: no retry changes them
        disclosure.failed(row, f"the report job could not be written: {e}")
        db.session.commit()
        return None
    batch_system = scheduling.scheduler(cfg)
    name = job_name(cfg["SLURM_JOB_PREFIX"], submission_id)
    job_id = batch_system.find(name, since=row.requested_at.replace(tzinfo=timezone.utc))
    job_id = job_id or batch_system.submit(script, name)
    claimed = db.session.execute(
        update(DisclosureReport)
        .where(DisclosureReport.submission_id == submission_id, DisclosureReport.status == "owed")
        .values(status="submitted", slurm_job_id=job_id, submitted_at=utcnow(), checker_sha256=wheel.sha256,
                image_digest=image.digest)
        .execution_options(synchronize_session=False))
    db.session.commit()
    if claimed.rowcount != 1:  # an admin asked again meanwhile: that job's report is not this one
        batch_system.cancel(job_id)
        return None
    log.info("submission %s: disclosure report job %s", submission_id, job_id)
    return job_id


def predict_entry(files: SubmissionFiles) -> str | None:
    """The prediction entry point the submission's m2d.toml declares (checked at
    upload; read again here, the gateway's own copy of the code), or None."""
    path = files.code / M2D_TOML
    if not path.is_file() or path.is_symlink():
        return None
    return parse_m2d_toml(path.read_text(encoding="utf-8", errors="replace"))


def _membership_image(files: SubmissionFiles) -> tuple[str, Path | None, str | None] | None:
    """(entry point, the submission's own image, None) when it declares a predict;
    (entry, None, why not) when that image cannot be had; None without one."""
    from .workflow import python_of  # (workflow imports the lifecycle that owes reports)
    try:
        entry = predict_entry(files)
    except Refusal as e:  # the rules changed since the upload
        return "?", None, f"its m2d.toml cannot be used: {e.message}"
    if entry is None:
        return None
    cfg = current_app.config
    try:  # the image the real job ran in, cached since (rebuilt only if an admin removed it)
        image = ImageBuilder.from_config(cfg).ensure((files.code / "requirements.txt").read_text(), python_of(files))
    except (BuildError, ConfigError, ValueError, OSError) as e:
        return entry, None, f"the submission's image could not be had ({type(e).__name__})"
    return entry, image.path, None


def _write_job(submission: Submission, files: SubmissionFiles, image: Path, wheel: bytes,
               membership: tuple[str, Path | None, str | None] | None = None) -> Path:
    cfg = current_app.config
    version = submission.dataset_version or cfg["DATASET_VERSION"]
    index_root = Path(required(cfg, "DISCLOSURE_INDEX_DIR"))
    dataset = Path(required(cfg, "DATASET_DIR"))
    report_dir = report_folder(files)
    checker = _unpack(wheel, files.job / "checker")
    for path in (index_root, dataset, files.export, report_dir, checker, files.logs, files.code):
        if not _SAFE_PATH.fullmatch(str(path)):  # apptainer's --bind splits on ":" and ","
            raise ValueError(f"{path}: use letters, digits and _ . / + - only")
    entry, mia_image, mia_error = membership or (None, None, None)
    if mia_image is not None and not _SAFE_PATH.fullmatch(str(mia_image)):
        mia_image, mia_error = None, "the submission's image path cannot be bound"
    seconds = cfg["DISCLOSURE_SECONDS"]
    sanitise_bits = cfg["RELEASE_MANTISSA_BITS"] if cfg["RELEASE_SANITISED_MODELS"] else None
    mia_seconds = cfg["DISCLOSURE_MIA_SECONDS"] if mia_image else 0
    predict_runs = 2 if sanitise_bits else 1  # with sanitised copies, again on the rounded export
    minutes = -(-(seconds + predict_runs * mia_seconds + GRACE_SECONDS) // 60)
    text = render(
        TEMPLATE, submission_id=submission.id, job_name=job_name(cfg["SLURM_JOB_PREFIX"], submission.id),
        log_dir=files.logs, time=str(minutes), mem=cfg["DISCLOSURE_MEM"], cpus=cfg["SLURM_CPUS"],
        partition=cfg["SLURM_PARTITION"], apptainer=cfg["APPTAINER"], image=image,
        checker_mount=CHECKER_MOUNT, checker_bind=f"{checker}:{CHECKER_MOUNT}:ro",
        dataset_bind=f"{dataset}:/mnt/dataset:ro", index_root_bind=f"{index_root}:{INDEX_ROOT_MOUNT}",
        index_in_container=f"{INDEX_ROOT_MOUNT}/{version}", index_lock=index_root / f".{version}.lock",
        index_bind=f"{index_root / version}:/mnt/index:ro", export_bind=f"{files.export}:/mnt/export:ro",
        report_dir=report_dir, report_bind=f"{report_dir}:/mnt/report", max_seconds=seconds,
        sanitise_bits=sanitise_bits, original_bind=f"{files.export}:/mnt/original:ro",
        sanitised_max_auc_drop=cfg["DISCLOSURE_SANITISED_MAX_AUC_DROP"],
        membership=mia_image is not None, mia_error=mia_error, mia_entry=entry, mia_image=mia_image,
        code_bind=f"{files.code}:/code:ro", mia_seconds=mia_seconds, mia_max_images=cfg["DISCLOSURE_MIA_MAX_IMAGES"],
        mia_fail_auc=cfg["DISCLOSURE_MIA_FAIL_AUC"], mia_review_auc=cfg["DISCLOSURE_MIA_REVIEW_AUC"],
        mia_min_cases=cfg["DISCLOSURE_MIA_MIN_CASES"])
    path = files.job / SCRIPT_NAME
    tmp = path.with_name(path.name + ".tmp")
    write_private(tmp, text, gid=job_gid())  # sbatch reads it as the job account (group); nobody writes it
    tmp.replace(path)
    return path


def _unpack(wheel: bytes, folder: Path) -> Path:
    """The wheel's m2d package into ``folder`` (the job account reads it): what
    ``pip install`` of the wheel would put on the path, for PYTHONPATH."""
    gid = job_gid()
    with zipfile.ZipFile(io.BytesIO(wheel)) as archive:
        for member in archive.infolist():
            if member.is_dir() or not member.filename.startswith("m2d/"):
                continue
            target = folder / member.filename
            for parent in reversed([p for p in target.parents if p == folder or folder in p.parents]):
                if not parent.is_dir():
                    parent.mkdir()
                    os.chown(parent, -1, gid)
                    parent.chmod(0o2750)
            _write_bytes(target, archive.read(member), gid)
    return folder


def _write_bytes(path: Path, data: bytes, gid: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchown(f.fileno(), -1, gid)
        os.fchmod(f.fileno(), 0o640 if gid != -1 else 0o600)
        f.write(data)


def report_folder(files: SubmissionFiles) -> Path:
    """disclosure/, beside export/: the report job writes it (group), the gateway reads it."""
    return job_writable(files.root / jobfiles.DISCLOSURE)


# ------------------------------------------------------------------ its end

def poll(scheduler: Scheduler | None = None) -> int:
    """Keep the report of every report job that ended; how many."""
    rows = DisclosureReport.query.filter_by(status="submitted").all()
    if not rows:
        return 0
    scheduler = scheduler or scheduling.scheduler()
    try:
        infos = scheduler.statuses([row.slurm_job_id for row in rows])
    except SlurmError as e:
        log.warning("Slurm's accounting did not answer; no report is read this cycle: %s", e)
        return 0
    done = 0
    for row in rows:
        info = infos.get(row.slurm_job_id)
        if info is None or not info.finished:
            continue
        try:
            done += finish(row.submission_id, info)
        except Exception:  # noqa: BLE001 - one report never stops the cycle for the others
            db.session.rollback()
            log.exception("submission %s: its disclosure report could not be kept; next cycle again",
                          row.submission_id)
    return done


def finish(submission_id: int, info: JobInfo) -> bool:
    """The report job ``info`` ended: keep its report, or why there is none.
    Once: only while the row still waits for that job."""
    claimed = db.session.execute(
        update(DisclosureReport)
        .where(DisclosureReport.submission_id == submission_id, DisclosureReport.status == "submitted",
               DisclosureReport.slurm_job_id == info.job_id)
        .values(status="reading", finished_at=utcnow())
        .execution_options(synchronize_session=False))
    if claimed.rowcount != 1:
        db.session.rollback()
        return False
    row = db.session.get(DisclosureReport, submission_id)
    db.session.refresh(row)
    limit = current_app.config["DISCLOSURE_REPORT_MAX_BYTES"]
    raw = jobfiles.read_head(submission_id, jobfiles.DISCLOSURE, REPORT_NAME, limit + 1)
    acro = jobfiles.read_head(submission_id, jobfiles.DISCLOSURE, ACRO_NAME, limit + 1)
    if info.state != "COMPLETED" or info.exit_code != 0 or raw is None:
        disclosure.failed(row, f"the report job (Slurm job {info.job_id}) ended {info.state}, exit code "
                               f"{info.exit_code}, without a report; its log is logs/{log_name(info.job_id, 'err')}")
    elif len(raw) > limit:
        disclosure.failed(row, f"its report is larger than {limit} bytes (M2D_DISCLOSURE_REPORT_MAX_BYTES)")
    else:
        try:
            disclosure.store(row, disclosure.parse(raw), raw, acro if acro and len(acro) <= limit else None)
        except disclosure.BadReport as e:
            disclosure.failed(row, f"its report could not be read: {e}")
    db.session.commit()
    return True


def sweep(cutoff) -> None:
    """Hand on again the reports owed since before ``cutoff`` that no queue carries."""
    for (submission_id,) in db.session.query(DisclosureReport.submission_id).filter(
            DisclosureReport.status == "owed", DisclosureReport.requested_at < cutoff):
        queue.enqueue_disclosure(submission_id)
