"""The synthetic twin of CLaM, one per version of the base dataset.

The gateway's dry runs and `m2d run` use the same twin: the same generator
(m2d/sample_data.py) with the same parameters, which depend only on the
dataset version, so the local run, the dry run and the real run see one
layout. Each twin lives in a folder named after its version
(``ROOT/<version>``) and is made on first use: written to a temporary folder
and renamed into place (sample_data.generate), under a lock so that two
workers asking at once make it once.

Stdlib only: numpy and Pillow are imported when a twin is really made.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

# The base dataset's version when the gateway is told none (M2D_DATASET_VERSION).
DEFAULT_VERSION = "1"
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Small on purpose: a dry run checks that the code runs, not what it learns.
CASES = 4
SIZE = (128, 160)


@dataclass(frozen=True)
class Parameters:
    cases: int
    size: tuple[int, int]
    seed: int


def check_version(version: str) -> str:
    """``version`` if it can name a twin's folder, else ValueError saying what can."""
    if not isinstance(version, str) or not _VERSION.fullmatch(version) or version in (".", ".."):
        raise ValueError(f"dataset version {version!r}: use 1-64 letters, digits and . _ - "
                         "(starting with a letter or digit), e.g. 1 or 2026-03")
    return version


def parameters(version: str) -> Parameters:
    """The generator's arguments for ``version``'s twin: fixed size, a seed of its own."""
    seed = int.from_bytes(hashlib.sha256(check_version(version).encode()).digest()[:4], "big")
    return Parameters(cases=CASES, size=SIZE, seed=seed)


def path(root: str | os.PathLike, version: str) -> Path:
    return Path(root) / check_version(version)


def is_cached(root: str | os.PathLike, version: str) -> bool:
    from . import sample_data  # numpy and Pillow

    return sample_data.is_complete(path(root, version))


def ensure(root: str | os.PathLike, version: str) -> Path:
    """The folder of ``version``'s twin under ``root``, made first if it is missing."""
    from . import sample_data  # numpy and Pillow

    dest = path(root, version)
    if is_cached(root, version):
        return dest
    if not dest.parent.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.parent.chmod(0o755)  # whatever the umask: the job account reads the twins
    # read-only is enough for flock, and works on a lock another account made
    lock = os.open(dest.parent / f".{dest.name}.lock", os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        chosen = parameters(version)
        sample_data.generate(dest, cases=chosen.cases, size=chosen.size, seed=chosen.seed)
    finally:
        os.close(lock)
    return dest
