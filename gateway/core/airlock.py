"""The export airlock: nothing leaves /mnt/export without named reviewers,
and everything that leaves is recorded (gateway.core.provenance).

    job ends -> manifest (path, size, sha256 of every regular file; taken once)
    -> the owner requests release of some files, with a justification
    -> reviewers approve or reject each file; RELEASE_APPROVALS distinct
       approvals release it, one rejection rejects it; nobody reviews a
       request on their own submission
    -> a released file is copied, its sha256 checked against the manifest, into
       the submission's released/ folder (the gateway's alone): the owner
       downloads that copy for RELEASE_DAYS, then it is deleted
    -> retention: EXPORT_RETENTION_DAYS after the job ended, the export folder
       is deleted (a warning email 7 days before)

The job account writes export/ only while its job runs; the manifest is taken
after that, and a file whose bytes differ from it at release is never released.
"""
from __future__ import annotations

import hashlib
import logging
import zipfile
from datetime import datetime, timedelta
from pathlib import Path

from flask import current_app
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from .. import queue
from ..extensions import db
from . import disclosure, jobfiles, provenance, releases
from .models import Email, Export, ExportFile, ReleaseItem, ReleaseRequest, Review, Submission, User, utcnow
from .storage import SubmissionFiles

log = logging.getLogger(__name__)

PREVIEW_BYTES = 64 * 1024
PREVIEW_SUFFIXES = {".txt", ".csv", ".tsv", ".json", ".log", ".md", ".yaml", ".yml", ".py"}
WARN_BEFORE = timedelta(days=7)
MAX_JUSTIFICATION = 5000
MAX_PATH = 1024  # ExportFile.path's column
MAX_SKIPPED_RECORDED = 100  # names of skipped entries kept in the provenance record


class AirlockError(Exception):
    """A refusal with an HTTP status, a stable code and what to do about it."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# ------------------------------------------------------------------ manifest

def released_dir(submission_id: int) -> Path:
    return SubmissionFiles(submission_id).root / "released"


def over_cap(submission_id: int) -> str | None:
    """The failure reason when the export cannot be taken (more than
    EXPORT_MAX_BYTES, EXPORT_MAX_FILES, too deep...), else None. Sizes only: the
    manifest hashes later."""
    bounds = jobfiles.Bounds.from_config(current_app.config)
    try:
        jobfiles.scan(submission_id, jobfiles.EXPORT, bounds, hashes=False)
    except jobfiles.Refused as e:
        code = "EXPORT_TOO_LARGE" if "M2D_EXPORT_MAX_BYTES" in e.reason else "EXPORT_REFUSED"
        return f"{code}: {e.reason}"
    return None


def manifest(submission: Submission) -> Export | None:
    """The export's manifest, taken now if the job has ended and nobody took it
    yet; None while the submission runs (the job may still write). An export
    that cannot be read within the bounds gets a manifest with its ``error``
    and no file: never an exception (the poll cycle and the purge go on)."""
    export = db.session.get(Export, submission.id)
    if export is not None or not submission.state.terminal:
        return export
    error, files, skipped = None, [], []
    try:
        listing = jobfiles.scan(submission.id, jobfiles.EXPORT, jobfiles.Bounds.from_config(current_app.config))
    except jobfiles.Refused as e:
        error = e.reason
    else:
        files = [_export_file(submission.id, f) for f in listing.files]
        skipped = [f"{name}: {why}" for name, why in listing.skipped]  # symlinks, fifos...: never released
    export = Export(submission_id=submission.id, manifest_at=utcnow(), error=error,
                    total_bytes=sum(f.size for f in files))
    db.session.add(export)
    try:
        db.session.flush()
        db.session.add_all(files)
        provenance.record(submission.id, "manifest", error=error,
                          files=[{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
                          skipped=skipped[:MAX_SKIPPED_RECORDED], skipped_count=len(skipped))
        db.session.commit()
    except IntegrityError:  # taken at the same moment by another process
        db.session.rollback()
    return db.session.get(Export, submission.id)


def _export_file(submission_id: int, found: jobfiles.File) -> ExportFile:
    """One manifest row. Its path is the name escaped (jobfiles.escape: two names
    never share one); a name too long for the column is kept shortened, with
    the hash of the whole name, and can never be released."""
    path, note = found.path, None if found.sha256 else "unreadable: the job's permissions keep the gateway out"
    if len(path) > MAX_PATH:
        digest = hashlib.sha256(found.name).hexdigest()
        path = f"{path[:MAX_PATH - 120]}[... name cut, sha256 of the whole name {digest}]"
        note = f"its name is longer than {MAX_PATH} characters: rename it, it cannot be released"
    return ExportFile(submission_id=submission_id, path=path, size=found.size,
                      sha256=found.sha256 if note is None else None, note=note)


def released_paths(submission_id: int, now: datetime | None = None) -> set[str]:
    now = now or utcnow()
    rows = (db.session.query(ExportFile.path).join(ReleaseItem, ReleaseItem.file_id == ExportFile.id)
            .filter(ExportFile.submission_id == submission_id, ReleaseItem.status == "released",
                    ReleaseItem.purged_at.is_(None), ReleaseItem.expires_at > now))
    return {path for (path,) in rows}


def ever_released(submission_id: int) -> set[str]:
    """Paths of the files reviewers released (since expired or not): their
    names, sizes and hashes are the owner's to see."""
    rows = (db.session.query(ExportFile.path).join(ReleaseItem, ReleaseItem.file_id == ExportFile.id)
            .filter(ExportFile.submission_id == submission_id, ReleaseItem.status == "released"))
    return {path for (path,) in rows}


def overview(submission: Submission) -> dict:
    """What GET .../export answers its owner: how many files and bytes the job
    left, the files reviewers released (name, size, sha256), and the requests.
    The names, sizes and hashes of the rest are the reviewers' alone: a name
    or the hash of a small file is data (the review pages show them)."""
    export = manifest(submission)
    files = export.files if export else []
    downloadable, disclosed = released_paths(submission.id), ever_released(submission.id)
    given = releases.given(submission.id)  # a model leaves as its sanitised copy: that size and sha256
    requests = (ReleaseRequest.query.filter_by(submission_id=submission.id)
                .order_by(ReleaseRequest.id).all())
    return {
        "submission_id": submission.id,
        "ended": submission.state.terminal,
        "purged": bool(export and export.purged_at),
        "error": export.error if export else None,
        "file_count": len(files),
        "total_bytes": sum(f.size for f in files),
        "requested": len(_requested_ids(submission.id)),
        "files": [{**f.to_dict(released=f.path in downloadable), **given.get(f.path, {})}
                  for f in files if f.path in disclosed],
        "requests": [owner_view(r, disclosed) for r in requests],
    }


def _requested_ids(submission_id: int, statuses: tuple[str, ...] | None = None) -> set[int]:
    return {file_id for (file_id,) in db.session.query(ReleaseItem.file_id).join(ReleaseRequest).filter(
        ReleaseRequest.submission_id == submission_id,
        ReleaseItem.status.in_(statuses or ("pending", "released", "rejected")))}


def owner_view(request: ReleaseRequest, disclosed: set[str] | None = None) -> dict:
    """A request as its owner sees it: counts per outcome, released files by name."""
    disclosed = ever_released(request.submission_id) if disclosed is None else disclosed
    answer = request.to_dict()
    answer["counts"] = {}
    for item in request.items:
        answer["counts"][item.status] = answer["counts"].get(item.status, 0) + 1
    answer["files"] = [item for item in answer["files"] if item["path"] in disclosed]
    answer["comments"] = [{"decision": r.decision, "comment": r.comment, "at": r.to_dict()["at"]}
                          for item in request.items if item.file.path not in disclosed
                          for r in item.reviews if r.comment]
    return answer


# ------------------------------------------------------------------ requests

def reviewers() -> list[User]:
    return [u for u in User.query.filter_by(is_reviewer=True).order_by(User.id) if u.approved]


def request_release(user: User, submission: Submission, paths: list[str] | None,
                    justification: str, again: bool = False) -> ReleaseRequest:
    """The owner asks for every file not yet requested to be released (``again``:
    also those reviewers rejected, with a new justification they read). Naming
    ``paths`` is refused: until reviewers release files the owner sees only how
    many there are, and an answer that said which names exist would tell them."""
    if paths is not None:
        raise AirlockError(400, "paths_hidden", "Leave out 'paths': until reviewers release files you see only "
                           "how many the job wrote, not their names. Ask for all of them and say in the "
                           "justification which you need; reviewers release those and reject the rest.")
    justification = (justification or "").strip()
    if not justification:
        raise AirlockError(400, "justification_required",
                           "Say why these files should leave: what they are and what you will do with them.")
    if len(justification) > MAX_JUSTIFICATION:
        raise AirlockError(400, "justification_too_long",
                           f"Keep the justification under {MAX_JUSTIFICATION} characters.")
    if not submission.state.terminal:
        raise AirlockError(409, "not_ended", f"Submission {submission.id} is {submission.status}: "
                           "request a release once it has ended.")
    export = manifest(submission)
    if export.purged_at:
        raise AirlockError(410, "purged", f"The export of submission {submission.id} was deleted "
                           "(retention); there is nothing left to release.")
    if export.error:
        raise AirlockError(409, "export_unreadable", f"The export of submission {submission.id} could not be "
                           f"read: {export.error}. Nothing of it can be released.")
    taken = _requested_ids(submission.id, ("pending", "released") if again else None)
    chosen = [f for f in export.files if f.id not in taken and f.sha256]
    if not chosen:
        raise AirlockError(409, "nothing_to_release", "Every file of this export is already requested, "
                           "released or rejected, or cannot be released (or the export is empty).")
    request = ReleaseRequest(submission_id=submission.id, requester_id=user.id, justification=justification)
    db.session.add(request)
    db.session.flush()
    for export_file in chosen:
        db.session.add(ReleaseItem(request_id=request.id, file_id=export_file.id))
    provenance.record(submission.id, "release_requested", request_id=request.id, by=user.email,
                      paths=[f.path for f in chosen], justification=justification, **({"again": True} if again else {}))
    releases.flag_request(submission, chosen)
    for reviewer in reviewers():
        if reviewer.id != user.id:
            _owe(submission.id, "release_requested", request, recipient=reviewer.email)
    db.session.commit()
    queue.enqueue_mail(submission.id)
    db.session.refresh(request)
    return request


def pending_requests() -> list[ReleaseRequest]:
    return ReleaseRequest.query.filter_by(status="pending").order_by(ReleaseRequest.id).all()


def get_request(request_id: int) -> ReleaseRequest:
    request = db.session.get(ReleaseRequest, request_id)
    if request is None:
        raise AirlockError(404, "no_such_request", f"There is no release request {request_id}.")
    return request


def decide(request: ReleaseRequest, reviewer: User, decision: str, comment: str = "",
           paths: list[str] | None = None) -> ReleaseRequest:
    """``reviewer`` approves or rejects ``paths`` (None: every pending file) of ``request``, or
    overrides a disclosure report's `fail` with ``comment`` as the reason (gateway.core.disclosure)."""
    if decision not in ("approve", "reject", disclosure.OVERRIDE):
        raise AirlockError(400, "bad_decision", "Decide 'approve', 'reject' or 'override' (a 'fail' file).")
    comment = (comment or "").strip()
    if not (reviewer.is_reviewer and reviewer.approved):
        raise AirlockError(403, "not_a_reviewer", f"{reviewer.email} is not a reviewer. An admin grants "
                           "the role: flask --app gateway users grant-reviewer EMAIL")
    if reviewer.id in (request.requester_id, request.submission.user_id):
        raise AirlockError(403, "own_request", "Nobody reviews the release of their own files: "
                           "another reviewer must decide.")
    if decision == "reject" and not comment:
        raise AirlockError(400, "comment_required", "Say why the file is rejected: the researcher reads it.")
    _lock(request.submission_id)
    db.session.refresh(request)
    pending = [i for i in request.items if i.status == "pending"]
    if paths is not None:
        unknown = set(paths) - {i.file.path for i in request.items}
        if unknown:
            raise AirlockError(400, "unknown_path", f"Request {request.id} has no file {sorted(unknown)[0]!r}.")
        pending = [i for i in pending if i.file.path in paths]
    if not pending:
        raise AirlockError(409, "already_decided", f"Request {request.id} has no pending file to decide.")
    if refused := disclosure.refusal(pending, decision, comment):
        raise AirlockError(*refused)
    if decision != "reject" and (refused := releases.refusal(pending)):
        raise AirlockError(*refused)
    needed = current_app.config["RELEASE_APPROVALS"]
    for item in pending:
        if any(r.reviewer_id == reviewer.id for r in item.reviews):
            raise AirlockError(409, "already_reviewed", f"You already decided on '{item.file.path}'; "
                               "a release needs the approval of another reviewer.")
        db.session.add(Review(item_id=item.id, reviewer_id=reviewer.id, decision=decision, comment=comment))
        provenance.record(request.submission_id, "disclosure_override" if decision == disclosure.OVERRIDE
                          else "review", request_id=request.id, path=item.file.path,
                          sha256=item.file.sha256, reviewer=reviewer.email, decision=decision,
                          comment=comment)
        db.session.flush()
        db.session.refresh(item)
        if decision == "reject":
            item.status = "rejected"
        elif disclosure.releasable(item, needed):
            _release(item)
    _settle(request)
    db.session.commit()
    queue.enqueue_mail(request.submission_id)
    return request


def _release(item: ReleaseItem) -> None:
    """Copy the approved file out of the export (a model: its sanitised copy,
    gateway.core.releases), checking its bytes against the manifest (the report)."""
    submission_id = item.request.submission_id
    folder = released_dir(submission_id)
    folder.mkdir(exist_ok=True)
    folder.chmod(0o700)  # the gateway's alone: the job account cannot touch a released copy
    target = folder / str(item.id)
    entry = releases.report_entry(submission_id, item.file)
    plan = releases.leaving(entry)
    if plan.refused:  # decide refuses first; the report was run again in between
        item.status = "changed"
        provenance.record(submission_id, "release_refused", request_id=item.request_id, path=item.file.path,
                          why=plan.refused)
        return
    source, name, expected, size = releases.released_source(item, entry)
    try:
        digest = jobfiles.copy_out(submission_id, source, name, target, limit=size)
    except (OSError, jobfiles.Refused, ValueError) as e:
        target.unlink(missing_ok=True)
        item.status = "changed"
        why = e.reason if isinstance(e, jobfiles.Refused) else getattr(e, "strerror", None) or str(e)
        provenance.record(submission_id, "release_refused", request_id=item.request_id, path=item.file.path,
                          why=f"the file cannot be read any more: {why}")
        return
    if digest != expected:
        target.unlink(missing_ok=True)
        item.status = "changed"
        provenance.record(submission_id, "release_refused", request_id=item.request_id, path=item.file.path,
                          why=f"its sha256 differs from the {'manifest' if source == jobfiles.EXPORT else 'report'}'s",
                          sha256=digest, manifest_sha256=expected)
        return
    now = utcnow()
    item.status, item.released_at = "released", now
    item.expires_at = now + timedelta(days=current_app.config["RELEASE_DAYS"])
    # what made the file, on its own link too: a released file's record names its job and runs
    job, runs = provenance.latest(submission_id, "job"), provenance.latest(submission_id, "mlflow")
    releases.record(item, digest, target.stat().st_size, entry)
    provenance.record(submission_id, "released", request_id=item.request_id, path=item.file.path,
                      sha256=item.file.sha256, released_sha256=digest, sanitised=source != jobfiles.EXPORT,
                      leaves=releases.SANITISED if source != jobfiles.EXPORT else releases.AS_WRITTEN,
                      until=item.expires_at,
                      zip_sha256=provenance.latest(submission_id, "upload").get("zip_sha256"),
                      slurm_job_id=job.get("slurm_job_id"), node=job.get("node"),
                      disclosure=disclosure.status_of(item.file),
                      mlflow_experiment_id=runs.get("experiment_id"), mlflow_run_ids=runs.get("run_ids"))


def _settle(request: ReleaseRequest) -> None:
    """Once no file is pending: the request's outcome and the researcher's emails."""
    statuses = {i.status for i in request.items}
    if "pending" in statuses or request.status != "pending":
        return
    request.status = ("released" if statuses == {"released"} else
                      "partly_released" if "released" in statuses else
                      "expired" if statuses == {"expired"} else "rejected")
    request.decided_at = utcnow()
    _owe(request.submission_id, "release_decided", request)
    if "released" in statuses:
        _owe(request.submission_id, "download_ready", request)


def _owe(submission_id: int, kind: str, request: ReleaseRequest | None, recipient: str = "") -> None:
    db.session.add(Email(submission_id=submission_id, kind=kind, recipient=recipient,
                         ref=f"request-{request.id}" if request else "",
                         release_request_id=request.id if request else None))


def _lock(submission_id: int) -> None:
    """Serialise decisions on one submission (two reviewers approving at once
    must both be counted): a no-op update takes the row's write lock."""
    db.session.execute(update(Submission).where(Submission.id == submission_id)
                       .values(id=Submission.id).execution_options(synchronize_session=False))


# ------------------------------------------------------------------ download

def download(user: User, submission: Submission, path: str, remote_addr: str | None,
             byte_range: str | None = None) -> tuple[Path, ReleaseItem]:
    """The released copy of ``path`` for its owner, recorded; or an AirlockError."""
    manifest(submission)
    export_file = ExportFile.query.filter_by(submission_id=submission.id, path=path).first()
    items = (ReleaseItem.query.filter_by(file_id=export_file.id).order_by(ReleaseItem.id.desc()).all()
             if export_file else [])
    item = next((i for i in items if i.status == "released"), None)
    if item is None:
        # one answer for a name that is missing and one that is held: which names
        # exist is the reviewers' to know until they release them
        raise AirlockError(404, "not_released", f"Submission {submission.id} has no released file '{path}'. "
                           "Files leave only after review: GET .../export lists the released ones; "
                           "POST .../release-requests with a justification asks for the rest.")
    if item.purged_at or item.expires_at <= utcnow():
        raise AirlockError(410, "expired", f"'{path}' was downloadable until {item.expires_at:%Y-%m-%d} "
                           "and has been deleted.")
    copy = released_dir(submission.id) / str(item.id)
    if not copy.is_file():
        raise AirlockError(410, "expired", f"The released copy of '{path}' is gone.")
    provenance.record(submission.id, "download", path=path, sha256=export_file.sha256, by=user.email,
                      remote_addr=remote_addr, range=byte_range)
    db.session.commit()
    return copy, item


# ------------------------------------------------------------------ reviewing

def preview(submission_id: int, export_file: ExportFile) -> str | None:
    """The text of a small text/CSV/JSON file, or None (shown escaped by the page)."""
    if export_file.size > PREVIEW_BYTES or Path(export_file.path).suffix.lower() not in PREVIEW_SUFFIXES \
            or export_file.note:
        return None
    data = jobfiles.read_head(submission_id, jobfiles.EXPORT, jobfiles.unescape(export_file.path), PREVIEW_BYTES)
    return None if data is None else jobfiles.text_of(data)


def code_listing(submission_id: int) -> list[tuple[str, int]]:
    """The submission's zip as uploaded: (name, size) of each file."""
    try:
        with zipfile.ZipFile(SubmissionFiles(submission_id).upload) as zf:
            return [(i.filename, i.file_size) for i in zf.infolist() if not i.is_dir()]
    except (OSError, zipfile.BadZipFile):
        return []


def code_file(submission_id: int, name: str, limit: int = 512 * 1024) -> str | None:
    try:
        with zipfile.ZipFile(SubmissionFiles(submission_id).upload) as zf:
            with zf.open(zf.getinfo(name)) as member:
                data = member.read(limit + 1)
    except (OSError, KeyError, zipfile.BadZipFile):
        return None
    text = data[:limit].decode("utf-8", "replace")
    return text + (f"\n[... cut at {limit} bytes]" if len(data) > limit else "")


# ------------------------------------------------------------------ retention

def deletion_due(export: Export) -> datetime:
    """When an unreleased export goes: retention after the end, never sooner
    than WARN_BEFORE after its warning."""
    ended = export.submission.updated_at
    due = ended + timedelta(days=current_app.config["EXPORT_RETENTION_DAYS"])
    return max(due, export.warned_at + WARN_BEFORE) if export.warned_at else due


def purge(now: datetime | None = None) -> dict:
    """Delete expired released copies and exports past retention (warning first).

    ``now`` (naive UTC) lets tests move the clock. Returns counts."""
    now = now or utcnow()
    done = {"released_purged": 0, "warned": 0, "exports_purged": 0}
    for item in ReleaseItem.query.filter(ReleaseItem.status == "released", ReleaseItem.purged_at.is_(None),
                                         ReleaseItem.expires_at <= now):
        submission_id = item.request.submission_id
        (released_dir(submission_id) / str(item.id)).unlink(missing_ok=True)
        item.purged_at = now
        provenance.record(submission_id, "release_purged", path=item.file.path, request_id=item.request_id)
        db.session.commit()
        done["released_purged"] += 1
    retention = timedelta(days=current_app.config["EXPORT_RETENTION_DAYS"])
    from m2d.contract.states import TERMINAL
    candidates = (Submission.query.outerjoin(Export, Export.submission_id == Submission.id)
                  .filter(Submission.status.in_([s.value for s in TERMINAL]),
                          Submission.updated_at <= now - retention + WARN_BEFORE,
                          Export.purged_at.is_(None)).order_by(Submission.id).all())
    for submission in candidates:
        try:
            _purge_one(submission, now, done)
        except Exception:  # noqa: BLE001 - one submission never stops the hourly purge of the others
            db.session.rollback()
            log.exception("submission %s: its export could not be purged", submission.id)
    return done


def _purge_one(submission: Submission, now: datetime, done: dict) -> None:
    export = manifest(submission)
    if export is None or export.purged_at:
        return
    if export.files and export.warned_at is None:
        export.warned_at = now
        _owe(submission.id, "export_expiring", None)
        db.session.commit()
        queue.enqueue_mail(submission.id)
        done["warned"] += 1
    elif now >= deletion_due(export):
        _delete_export(submission.id)
        export.purged_at = now
        for item in ReleaseItem.query.join(ReleaseRequest).filter(
                ReleaseRequest.submission_id == submission.id, ReleaseItem.status == "pending"):
            item.status = "expired"
            _settle(item.request)
        provenance.record(submission.id, "export_purged", files=len(export.files))
        db.session.commit()
        queue.enqueue_mail(submission.id)
        done["exports_purged"] += 1


def _delete_export(submission_id: int) -> None:
    for failed in jobfiles.remove_all(submission_id, jobfiles.EXPORT):
        log.warning("submission %s: could not delete from its export: %s", submission_id, failed)
