"""Accepting an upload: stream to disk, check, unpack, record, hand to workers."""
from __future__ import annotations

import hashlib
import io
import os
import uuid
from datetime import timedelta

from flask import current_app
from werkzeug.datastructures import FileStorage

from m2d.contract.validation import Refusal, UploadLimits, check_upload_size, check_zip, unpack

from ..extensions import db
from . import lifecycle, provenance
from .models import Submission, User, utcnow
from .storage import SubmissionFiles, incoming_dir

CHUNK = 1024 * 1024
QUOTA_WINDOW = timedelta(hours=24)


def limits() -> UploadLimits:
    cfg = current_app.config
    return UploadLimits(
        max_zip_bytes=cfg["MAX_ZIP_BYTES"],
        max_files=cfg["MAX_FILES"],
        max_uncompressed_bytes=cfg["MAX_UNCOMPRESSED_BYTES"],
        max_ratio=cfg["MAX_COMPRESSION_RATIO"],
        pythons=tuple(cfg["PYTHONS"]),
        default_python=cfg["DEFAULT_PYTHON"],
    )


def accept(user: User, upload: FileStorage | None) -> Submission:
    """Turn an uploaded file (werkzeug FileStorage) into a received submission.

    Raises validation.Refusal with a message for the user when the zip is not
    acceptable; nothing is recorded then.
    """
    if upload is None or not upload.filename:
        raise Refusal("no_file", "No file was uploaded. Send your zip in the form field 'file'.")
    check_quota(user)
    rules = limits()
    tmp = incoming_dir() / f"{uuid.uuid4().hex}.zip"
    try:
        size, sha256 = _keep(upload.stream, tmp, rules)
        check_zip(tmp, rules)
        submission = lifecycle.create(user, filename=os.path.basename(upload.filename))
        submission.zip_sha256 = sha256
        provenance.record(submission.id, "upload", filename=submission.filename, zip_sha256=sha256, size=size)
        files = SubmissionFiles(submission.id)
        try:
            files.create()
            os.replace(tmp, files.upload)
            os.chmod(files.upload, 0o600)
            unpack(files.upload, files.code)
            db.session.commit()
        except BaseException:
            db.session.rollback()
            files.remove()
            raise
    finally:
        tmp.unlink(missing_ok=True)
    lifecycle.hand_on(submission)
    return submission


def check_quota(user: User) -> None:
    """Refuse an upload past DAILY_SUBMISSIONS in any 24 hours (rolling), before
    the zip is checked or kept. Two uploads racing for the last slot may both
    pass: the quota bounds a leak, it is not an exact count. A submission whose
    dry run failed counts too: its dry run ran code the gateway then read
    the outputs of, and a free retry is a retry without limit."""
    allowed = current_app.config["DAILY_SUBMISSIONS"]
    recent = [created for (created,) in db.session.query(Submission.created_at)
              .filter(Submission.user_id == user.id, Submission.created_at > utcnow() - QUOTA_WINDOW)
              .order_by(Submission.created_at.desc()).limit(allowed)]
    if len(recent) < allowed:
        return
    if recent:
        # the next slot frees when the oldest of those leaves the window;
        # shown to the minute, rounded up so the time given is never too early
        frees = recent[-1] + QUOTA_WINDOW + timedelta(seconds=59)
        when = f"The next upload is possible from {frees:%Y-%m-%d %H:%M} UTC. "
    else:
        when = "Uploads are switched off on this platform. "
    raise Refusal(
        "quota_exceeded",
        f"You have uploaded {len(recent)} submissions in the last 24 hours; the limit is {allowed} a day. "
        f"{when}If your work needs more, ask the platform's admins: they can raise the limit.")


def _keep(stream, dest, rules):
    """Give the upload the name ``dest``, checking its size and hashing it.
    The request parser has already written it to a file in incoming/
    (gateway.app.DiskRequest): that file is linked into place, so a 200 MB
    upload is written to disk once. Any other stream is copied."""
    size, sha256 = _read(stream, rules)
    try:
        # a dir_fd makes CPython call linkat(AT_SYMLINK_FOLLOW), which follows
        # /proc's link to the open file; plain os.link() links /proc's entry
        # itself and fails with EXDEV
        folder = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.link(f"/proc/self/fd/{stream.fileno()}", dest.name, dst_dir_fd=folder, follow_symlinks=True)
        finally:
            os.close(folder)
        return size, sha256
    except (AttributeError, OSError, io.UnsupportedOperation):  # not a file, or another file system
        stream.seek(0)
        return _save(stream, dest, rules)


def _read(stream, rules, out=None):
    """Read the upload in chunks, checking its size and hashing as we go;
    copy it to ``out`` if given."""
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(CHUNK):
        size += len(chunk)
        check_upload_size(size, rules)
        digest.update(chunk)
        if out is not None:
            out.write(chunk)
    return size, digest.hexdigest()


def _save(stream, dest, rules):
    with open(dest, "wb") as out:
        return _read(stream, rules, out)
