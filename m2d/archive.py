"""Making a submission zip from a project folder, and checking one.

The rules are the platform's own (m2d/contract/validation.py, stdlib only, imported by the gateway): a zip that
passes `check` here is one the gateway accepts, refused with the same code and
message otherwise.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from m2d.contract.validation import PYTHON_VERSION_FILE, Checked, Refusal, check_zip, normalise_requirements, unpack

__all__ = ["Checked", "Refusal", "Zipped", "check", "make_zip", "normalise_requirements",
           "requirement_lines", "unpack"]

# Never part of a submission: caches, version control, editor state, environments.
# Hidden files and folders (.env, .DS_Store, .idea, ...) are left out as well:
# they are local state at best, and secrets at worst. Except .python-version: the
# platform reads it to pick the submission's Python.
SKIPPED_FOLDERS = {"__pycache__", "__MACOSX", "node_modules"}
SKIPPED_SUFFIXES = (".pyc", ".pyo")


@dataclass
class Zipped:
    path: Path
    files: list[str] = field(default_factory=list)    # what went in, '/'-separated
    skipped: list[str] = field(default_factory=list)  # what was left out, and why


def check(path: str | os.PathLike) -> Checked:
    """The gateway's verdict on a zip: Checked, or a Refusal with its code and message."""
    return check_zip(path)


def requirement_lines(checked: Checked) -> list[str]:
    return normalise_requirements(checked.requirements).splitlines()


def make_zip(folder: str | os.PathLike, out: str | os.PathLike) -> Zipped:
    """Zip `folder`'s contents so that they sit at the zip's root, leaving out what
    never belongs in a submission. Entries are written in sorted order."""
    folder, out = Path(folder).resolve(), Path(out).resolve()
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    zipped = Zipped(path=out)
    sources = []
    for current, dirs, files in os.walk(folder):
        current = Path(current)
        for name in sorted(dirs):
            why = _why_skipped_folder(current / name)
            if why:
                zipped.skipped.append(f"{_relative(current / name, folder)}/ ({why})")
                dirs.remove(name)
        dirs.sort()
        for name in sorted(files):
            path = current / name
            why = "the zip itself" if path == out else _why_skipped_file(path)
            if why:
                zipped.skipped.append(f"{_relative(path, folder)} ({why})")
            else:
                sources.append(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sources:
            name = _relative(path, folder)
            # ZipInfo.from_file follows a link to a file and stores its content,
            # which is what the platform wants (it refuses links themselves).
            info = zipfile.ZipInfo.from_file(path, name)
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(path, "rb") as source, archive.open(info, "w") as target:
                while chunk := source.read(1024 * 1024):
                    target.write(chunk)
            zipped.files.append(name)
    return zipped


def _why_skipped_folder(path: Path) -> str | None:
    if path.is_symlink():
        return "a link to a folder"
    if path.name.startswith("."):
        return "hidden"
    if path.name in SKIPPED_FOLDERS:
        return "cache or junk"
    if (path / "pyvenv.cfg").exists():
        return "a virtual environment; packages come from requirements.txt"
    return None


def _why_skipped_file(path: Path) -> str | None:
    if path.name.startswith(".") and path.name != PYTHON_VERSION_FILE:
        return "hidden"
    if path.name.endswith(SKIPPED_SUFFIXES):
        return "compiled Python"
    if not path.is_file():
        return "not a regular file (a broken link?)"
    return None


def _relative(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()
