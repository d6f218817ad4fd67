"""Where a submission's files live on the shared filesystem.

    DATA_DIR/submissions/<id>/upload.zip   the zip as received
                             /code         unpacked; bound read-only in the job
                             /export       bound at /mnt/export; leaves only on release
                             /logs         Slurm's stdout/stderr (gateway-owned)
                             /job          batch script and the job's MLflow env file
    DATA_DIR/incoming/                     uploads being received and checked
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from flask import current_app


def data_dir() -> Path:
    return Path(current_app.config["DATA_DIR"])


def write_private(path: Path, text: str) -> Path:
    """Write ``path`` readable by its owner alone, from its first byte on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT
        f.write(text)
    return Path(path)


def incoming_dir() -> Path:
    path = data_dir() / "incoming"
    path.mkdir(parents=True, exist_ok=True)
    return path


class SubmissionFiles:
    def __init__(self, submission_id: int, root: str | Path | None = None) -> None:
        self.root = Path(root or data_dir()) / "submissions" / str(submission_id)

    upload = property(lambda self: self.root / "upload.zip")
    code = property(lambda self: self.root / "code")
    export = property(lambda self: self.root / "export")
    logs = property(lambda self: self.root / "logs")
    job = property(lambda self: self.root / "job")

    def create(self) -> None:
        self.root.mkdir(parents=True)
        for path in (self.export, self.logs):
            path.mkdir()
        # the job folder holds credentials: nobody but the service account
        self.job.mkdir(mode=0o700)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
