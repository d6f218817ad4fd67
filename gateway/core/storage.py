"""Where a submission's files live on the shared filesystem, and who may read them.

    DATA_DIR/                              0711: the job account may pass, not look
             gateway.db                    0600 (SQLite)
             incoming/                     0700: uploads being received and checked
             submissions/                  0711
             submissions/<id>/             2750 group JOB_GROUP
                             upload.zip    0600 the zip as received
                             code/         2750 unpacked; bound read-only in the job
                             export/       2770 /mnt/export's image is read back here when the job ends;
                                                leaves only on release
                             logs/         2770 Slurm's stdout/stderr, written as the job account
                             job/          2750 batch script, relay, the owner's MLflow login (0600,
                                                the gateway's: the job gets it once from m2d-slurm)

The gateway's account owns everything; the job account (JOB_USER, in
JOB_GROUP) reads code and job, and writes export and logs, through the group.
"""
from __future__ import annotations

import grp
import os
import shutil
from pathlib import Path

from flask import current_app


def data_dir() -> Path:
    return Path(current_app.config["DATA_DIR"])


def job_gid() -> int:
    """The job account's group id, or -1 (leave the group) when none is set."""
    name = current_app.config["JOB_GROUP"]
    return grp.getgrnam(name).gr_gid if name else -1


def write_private(path: Path, text: str, *, gid: int = -1) -> Path:
    """Write ``path`` readable by its owner alone, or also by group ``gid``,
    from its first byte on."""
    mode = 0o600 if gid == -1 else 0o640
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchown(f.fileno(), -1, gid)
        os.fchmod(f.fileno(), mode)  # an existing file keeps its mode through O_CREAT
        f.write(text)
    return Path(path)


def secure_data_dir(root: Path) -> None:
    """DATA_DIR and its submissions folder: the job account may pass through
    to its own submission's folders, but list or read nothing."""
    for path in (root, root / "submissions"):
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o711)


def incoming_dir() -> Path:
    path = data_dir() / "incoming"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
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
        gid = job_gid()
        self.root.mkdir(parents=True)
        for path, mode in ((self.root, 0o2750), (self.code, 0o2750), (self.job, 0o2750),
                           (self.export, 0o2770), (self.logs, 0o2770)):
            path.mkdir(exist_ok=True)
            os.chown(path, -1, gid)
            path.chmod(mode)  # exact, whatever the umask

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
