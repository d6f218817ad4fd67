"""The dataset's fingerprint index: built once per dataset version, read by every report.

INDEX_DIR holds (all 0640 in a 0750 folder: as sensitive as the dataset):

- version.json    the version key (paths, sizes and mtimes of every dataset file) and counts
- files.json      per dataset file, by number: its type and size (never its path: paths identify)
- whole.json      sha256 of every dataset file -> its number
- chunks.npy, chunk_refs.npy   sorted chunk digests (chunks.py) and their files' numbers
- phash.npy, phash_refs.npy    perceptual hashes of the dataset's images (PNG/JPEG and 2-D NPY)
- identifiers.json             keyed hashes of the identifier columns' values (identifiers.py)
"""
from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import chunks, images, sniff
from .identifiers import COLUMNS, IdentifierIndex

FORMAT = 2  # 2: 1024-bit pHashes, identifier prefilter
CSV_SEPARATORS = ";,\t"


def version_key(dataset: Path) -> tuple[str, list[Path], int]:
    """The dataset's version: a hash over every file's relative path, size and
    mtime (no content read), the index format, the chunk sizes and the pHash size."""
    h = hashlib.sha256(f"format {FORMAT} chunks {chunks.AVG} {chunks.MIN} {chunks.MAX} phash {images.HASH_SIZE}\n".encode())
    files, total = [], 0
    for folder, dirs, names in os.walk(dataset):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            info = path.lstat()
            if not path.is_file() or path.is_symlink():
                continue
            rel = path.relative_to(dataset).as_posix()
            h.update(f"{rel}\0{info.st_size}\0{info.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            files.append(path)
            total += info.st_size
    return h.hexdigest(), files, total


def _fingerprint(path: Path) -> tuple[str, int, str, list[int], int | None]:
    data = path.read_bytes()
    type_ = sniff.kind(data)
    return (hashlib.sha256(data).hexdigest(), len(data), type_, chunks.dataset_digests(data),
            images.phash_of(data, type_, max_pixels=1 << 31))


def _identifiers_and_counts(dataset: Path) -> tuple[dict[str, str], dict[str, int]]:
    """Identifier values from the dataset's CSV files' identifier columns, and case
    and image counts per split (from columns Split, with CaseName or ImagePath)."""
    values: dict[str, str] = {}
    cases: dict[str, set[str]] = {}
    imgs: dict[str, set[str]] = {}
    for path in sorted(dataset.rglob("*.csv")):
        text = path.read_text("utf-8", "replace")
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=CSV_SEPARATORS) if text else csv.excel
        for row in csv.DictReader(io.StringIO(text), dialect=dialect):
            for column, kind in COLUMNS.items():
                if row.get(column):
                    values.setdefault(row[column].strip(), kind)
                    if column == "ImagePath":  # code swaps .png for .npy
                        values.setdefault(os.path.splitext(row[column].strip())[0] + ".npy", kind)
            split = (row.get("Split") or "all").strip()
            if row.get("CaseName"):
                cases.setdefault(split, set()).add(row["CaseName"])
            if row.get("ImagePath"):
                imgs.setdefault(split, set()).add(row["ImagePath"])
    counts = {f"{split}_cases": len(v) for split, v in cases.items()}
    counts |= {f"{split}_images": len(v) for split, v in imgs.items()}
    counts["cases"] = len(set().union(*cases.values())) if cases else 0
    counts["images"] = len(set().union(*imgs.values())) if imgs else 0
    return values, counts


def build(dataset: str | os.PathLike, out: str | os.PathLike, jobs: int = 1, log=print) -> bool:
    """Build the index of ``dataset`` into ``out``; False when ``out`` is already
    the index of this version. Written beside ``out`` and renamed into place."""
    dataset, out = Path(dataset).resolve(), Path(out)
    key, files, total = version_key(dataset)
    current = out / "version.json"
    if current.is_file() and json.loads(current.read_text()).get("index_version") == key:
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if jobs > 1:
            with ProcessPoolExecutor(jobs) as pool:
                prints = list(pool.map(_fingerprint, files, chunksize=8))
        else:
            prints = [_fingerprint(f) for f in files]
        whole, keys, refs, phashes, phash_refs, described = {}, [], [], [], [], []
        for number, (sha, size, type_, digests, phash) in enumerate(prints):
            whole.setdefault(sha, number)
            keys.extend(digests)
            refs.extend([number] * len(digests))
            if phash is not None:
                phashes.append(phash)
                phash_refs.append(number)
            described.append({"type": type_, "size": size})
        order = np.argsort(np.array(keys, dtype=np.uint64), kind="stable")
        np.save(tmp / "chunks.npy", np.array(keys, dtype=np.uint64)[order])
        np.save(tmp / "chunk_refs.npy", np.array(refs, dtype=np.int32)[order])
        np.save(tmp / "phash.npy", np.array([images.as_words(h) for h in phashes], dtype=np.uint64).reshape(-1, images.BITS // 64))
        np.save(tmp / "phash_refs.npy", np.array(phash_refs, dtype=np.int32))
        (tmp / "files.json").write_text(json.dumps(described))
        (tmp / "whole.json").write_text(json.dumps(whole))
        values, counts = _identifiers_and_counts(dataset)
        IdentifierIndex.build(values).save(tmp)
        (tmp / "version.json").write_text(json.dumps({
            "format": FORMAT, "index_version": key, "dataset": str(dataset), "files": len(files), "bytes": total,
            "chunks": len(keys), "images": len(phashes), "identifiers": len(values),
            "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "train_cases": counts.get("train_cases", counts.get("cases", 0)), "counts": counts}, indent=1))
        for f in tmp.iterdir():
            f.chmod(0o640)
        tmp.chmod(0o750)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"index: {len(files)} files ({total} bytes), {len(keys)} chunks, {len(phashes)} images, "
        f"{len(values)} identifier values -> {out}")
    return True


@dataclass
class Index:
    folder: Path
    version: dict
    files: list[dict]
    whole: dict[str, int]
    chunk_keys: np.ndarray
    chunk_refs: np.ndarray
    phashes: np.ndarray
    phash_refs: np.ndarray
    identifiers: IdentifierIndex

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Index:
        folder = Path(folder)
        version = json.loads((folder / "version.json").read_text())
        if version.get("format") != FORMAT:
            raise ValueError(f"{folder}: index format {version.get('format')}, this checker reads {FORMAT}; rebuild it")
        return cls(folder, version, json.loads((folder / "files.json").read_text()),
                   json.loads((folder / "whole.json").read_text()),
                   np.load(folder / "chunks.npy"), np.load(folder / "chunk_refs.npy"),
                   np.load(folder / "phash.npy"), np.load(folder / "phash_refs.npy"),
                   IdentifierIndex.load(folder))

    def describe(self, number: int) -> str:
        """A dataset file as a reason may name it: by number and type, never by path."""
        return f"dataset file #{number} ({self.files[number]['type']}, {self.files[number]['size']} bytes)"

    def row_counts(self) -> dict[str, int]:
        """Case and image counts (>= 5) a per-case table's row count would match."""
        return {name: n for name, n in self.version.get("counts", {}).items() if n >= 5}
