"""Where a submission's files live on the shared filesystem, and who may read them.

    DATA_DIR/                              0711: the job account may pass, not look
             gateway.db                    0600 (SQLite)
             incoming/                     0700: uploads being received and checked
             submissions/                  2711 group JOB_GROUP: what is made in it inherits the group
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
The group comes from submissions/ (setgid), so a folder gets it whichever
process made it, even one started before its account joined JOB_GROUP; and
the folders are repaired before each sbatch (``SubmissionFiles.repair``).
"""
from __future__ import annotations

import grp
import logging
import os
import shutil
import stat
from pathlib import Path

from flask import current_app

log = logging.getLogger(__name__)


def data_dir() -> Path:
    return Path(current_app.config["DATA_DIR"])


def job_gid(name: str | None = None) -> int:
    """The job account's group id (JOB_GROUP's), or -1 (leave the group) when none is set."""
    name = current_app.config["JOB_GROUP"] if name is None else name
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


def job_writable(path: Path) -> Path:
    """A folder of a submission's that its jobs write (group) and the gateway reads: 2770."""
    path.mkdir(exist_ok=True)
    os.chown(path, -1, job_gid())
    path.chmod(0o2770)
    return path


def secure_data_dir(root: Path, gid: int = -1) -> None:
    """DATA_DIR and its submissions folder: the job account may pass through
    to its own submission's folders, but list or read nothing. submissions/
    has group ``gid`` (setgid): the folders made in it inherit it."""
    for path in (root, root / "submissions"):
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o711)
    if gid != -1:
        try:
            os.chown(root / "submissions", -1, gid)
            (root / "submissions").chmod(0o2711)
        except PermissionError:  # not in the group (yet): repair() says so where it matters
            log.warning("%s: cannot give it group %s (this process is not in that group)", root / "submissions", gid)


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

    def folders(self) -> tuple[tuple[Path, int], ...]:
        """Each folder and its mode: the job reads code and job, writes export and logs (group)."""
        return ((self.root, 0o2750), (self.code, 0o2750), (self.job, 0o2750),
                (self.export, 0o2770), (self.logs, 0o2770))

    def create(self) -> None:
        self.root.mkdir(mode=0o750, parents=True)
        for path, _ in self.folders()[1:]:  # each inherits the group from the one above
            path.mkdir(mode=0o750, exist_ok=True)
        self.repair()

    def repair(self) -> list[str]:
        """Give the folders, and the code in code/, the group and modes the job
        needs, whatever made or changed them since (a process outside the
        group, a ``chown -R`` of DATA_DIR: issue 24, sbatch's "Unable to open
        file .../job/job.sbatch"). What the job wrote (export/, logs/) is not
        walked: only its folders. Returns what it changed."""
        gid, changed = job_gid(), []
        for path, mode in self.folders():
            changed += _set(path, gid, mode)
        if gid != -1:
            for folder, dirs, files in os.walk(self.code):  # written by the gateway, from the checked zip
                for name in dirs + files:
                    changed += _set(Path(folder) / name, gid, None)
        if changed:
            log.warning("submission folder %s repaired: %s", self.root, ", ".join(changed))
        return changed

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _set(path: Path, gid: int, mode: int | None) -> list[str]:
    """Group ``gid`` (-1: leave it) and, for a folder of ours, exactly ``mode``
    (None: add group read, and search to a folder)."""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return []
    changed = []
    if gid != -1 and st.st_gid != gid:
        os.chown(path, -1, gid, follow_symlinks=False)  # EPERM here: the process is not in JOB_GROUP
        changed.append(f"{path.name} group {st.st_gid} -> {gid}")
    want = mode if mode is not None else stat.S_IMODE(st.st_mode) | stat.S_IRGRP | (
        stat.S_IXGRP if stat.S_ISDIR(st.st_mode) else 0)
    if stat.S_IMODE(st.st_mode) != want:
        path.chmod(want)  # outside the group the kernel drops setgid: submissions/'s does the work then
        now = stat.S_IMODE(path.lstat().st_mode)
        if now != stat.S_IMODE(st.st_mode):
            changed.append(f"{path.name} mode {stat.S_IMODE(st.st_mode):o} -> {now:o}")
    return changed
