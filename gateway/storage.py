"""Where a submission's files live on the shared filesystem.

    DATA_DIR/submissions/<id>/upload.zip   the zip as received
                             /code         unpacked; bound read-only in the job
                             /export       bound at /mnt/export; leaves only on release
                             /logs         Slurm's stdout/stderr (gateway-owned)
                             /job          batch script and the job's MLflow env file
    DATA_DIR/incoming/                     uploads being received and checked
"""
import os
import shutil
from pathlib import Path

from flask import current_app


def data_dir():
    return Path(current_app.config["DATA_DIR"])


def incoming_dir():
    path = data_dir() / "incoming"
    path.mkdir(parents=True, exist_ok=True)
    return path


class SubmissionFiles:
    def __init__(self, submission_id, root=None):
        self.root = Path(root or data_dir()) / "submissions" / str(submission_id)

    upload = property(lambda self: self.root / "upload.zip")
    code = property(lambda self: self.root / "code")
    export = property(lambda self: self.root / "export")
    logs = property(lambda self: self.root / "logs")
    job = property(lambda self: self.root / "job")

    def create(self):
        self.root.mkdir(parents=True)
        for path in (self.export, self.logs):
            path.mkdir()
        # the job folder holds credentials: nobody but the service account
        self.job.mkdir(mode=0o700)

    def remove(self):
        shutil.rmtree(self.root, ignore_errors=True)

    def write_private(self, name, text):
        """Write a file in job/ readable only by its owner (the job's user)."""
        path = self.job / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(path, 0o600)
        return path
