"""The synthetic twin of CLaM, one per version of the base dataset.

The twin has the real dataset's shape, scaled down: its cases spread over split
x label, and each cell's images over the views, in the real dataset's
proportions, with at least FLOOR cases in every split x label, so that code
which scores the test split (ROC AUC needs both labels) runs on it as on the
real data. The gateway knows the real dataset (DATASET_DIR) and reads its two
CSV files' split, label and view columns, never an image; `m2d run` does not,
and takes the published sample's proportions (sample_data.PUBLISHED).

A twin lives in a folder named after its version (``ROOT/<version>``), made
by m2d/contract/sample_data.py with a seed of that version's own: the same version and
the same counts give the same bytes. It is made on first use, written to a
temporary folder and renamed into place (sample_data.generate), under a lock so
that two workers asking at once make it once; a twin whose shape is not the
one wanted (made from other counts, or by an older generator) is made again,
the old one moved aside (``ROOT/.<version>.replaced-<ns>``, removed at the
next replacement) for a dry run that may still be reading it.

Stdlib only: numpy and Pillow are imported when a twin is really made.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import sample_data

# The base dataset's version when the gateway is told none (M2D_DATASET_VERSION).
DEFAULT_VERSION = "1"
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Small on purpose: a dry run checks that the code runs, not what it learns.
# The real dataset's proportions shared over CASES cases (fewer if it has
# fewer), then each split x label raised to FLOOR.
CASES = 24
FLOOR = 4
SIZE = (128, 160)


@dataclass(frozen=True)
class Parameters:
    cases: int
    size: tuple[int, int]
    seed: int
    like: sample_data.Counts  # the real dataset's shape, or the published sample's
    floor: int


def check_version(version: str) -> str:
    """``version`` if it can name a twin's folder, else ValueError saying what can."""
    if not isinstance(version, str) or not _VERSION.fullmatch(version) or version in (".", ".."):
        raise ValueError(f"dataset version {version!r}: use 1-64 letters, digits and . _ - "
                         "(starting with a letter or digit), e.g. 1 or 2026-03")
    return version


def parameters(version: str, like: sample_data.Counts | None = None) -> Parameters:
    """The generator's arguments for ``version``'s twin of a dataset shaped like
    ``like`` (sample_data.counts(); None: the published sample): a seed of its own."""
    from . import sample_data  # numpy and Pillow

    like = like or sample_data.PUBLISHED
    seed = int.from_bytes(hashlib.sha256(check_version(version).encode()).digest()[:4], "big")
    return Parameters(cases=min(CASES, like.total), size=SIZE, seed=seed, like=like, floor=FLOOR)


def path(root: str | os.PathLike, version: str) -> Path:
    return Path(root) / check_version(version)


def is_cached(root: str | os.PathLike, version: str, dataset: str | os.PathLike | None = None) -> bool:
    """True when ``version``'s twin is complete and shaped as ensure(root, version, dataset) makes it."""
    return _is_current(path(root, version), _parameters(version, dataset))


def is_made(root: str | os.PathLike, version: str) -> bool:
    """True when a complete twin of ``version`` is there, whatever it was made from."""
    from . import sample_data  # numpy and Pillow

    return sample_data.is_complete(path(root, version))


def ensure(root: str | os.PathLike, version: str, dataset: str | os.PathLike | None = None) -> Path:
    """The folder of ``version``'s twin under ``root``, made first if it is
    missing or not shaped like ``dataset`` (the real data of that version;
    None: the published sample). Reads only ``dataset``'s CSV files."""
    from . import sample_data  # numpy and Pillow

    dest = path(root, version)
    chosen = _parameters(version, dataset)
    if _is_current(dest, chosen):
        return dest
    if not dest.parent.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.parent.chmod(0o755)  # whatever the umask: the job account reads the twins
    # read-only is enough for flock, and works on a lock another account made
    lock = os.open(dest.parent / f".{dest.name}.lock", os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_current(dest, chosen):  # another worker made it while we waited
            return dest
        if dest.exists():
            # the one replaced before is long unused; this one a dry run may still read
            for old in dest.parent.glob(f".{dest.name}.replaced-*"):
                shutil.rmtree(old, ignore_errors=True)
            dest.rename(dest.parent / f".{dest.name}.replaced-{time.time_ns()}")
        sample_data.generate(dest, cases=chosen.cases, size=chosen.size, seed=chosen.seed,
                             like=chosen.like, floor=chosen.floor)
    finally:
        os.close(lock)
    return dest


def _parameters(version: str, dataset: str | os.PathLike | None) -> Parameters:
    from . import sample_data  # numpy and Pillow

    return parameters(version, sample_data.counts(dataset) if dataset is not None else None)


def _is_current(dest: Path, chosen: Parameters) -> bool:
    from . import sample_data  # numpy and Pillow

    if not sample_data.is_complete(dest):
        return False
    wanted = sample_data.layout(chosen.cases, chosen.like, chosen.floor)
    return sample_data.counts(dest) == wanted
