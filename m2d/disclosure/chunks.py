"""Content-defined chunks (FastCDC, pyfastcdc) on both sides: the dataset's and the export's.

A chunk's cut points depend only on the bytes around them, so a dataset file's
bytes copied to any offset of an export file (or of a member inside it) are cut
into the same chunks there after the first cut inside the copy: every such
chunk's digest is found in the index. A copy a few chunks long (a few KiB)
is found; scattering a file in pieces smaller than a chunk is not (what a
perceptual hash or a reviewer has to catch). Chunks that are nearly constant
(an image's black background, zero padding) would match anything of that kind
and are left out of the index.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyfastcdc

AVG, MIN, MAX = 2048, 512, 8192
MIN_INDEXED = 256  # a file's short last chunk below this is not indexed
MIN_ENTROPY = 3.0  # bits per byte: below it a chunk is background or padding


def _chunker() -> pyfastcdc.FastCDC:
    return pyfastcdc.FastCDC(AVG, min_size=MIN, max_size=MAX)


def digest(data) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _entropy(data) -> float:
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    p = counts[counts > 0] / len(data)
    return float(-(p * np.log2(p)).sum())


def dataset_digests(data) -> list[int]:
    """The digests of ``data``'s chunks worth indexing."""
    out = []
    for chunk in _chunker().cut_buf(memoryview(data)):
        if chunk.length >= MIN_INDEXED and _entropy(chunk.data) >= MIN_ENTROPY:
            out.append(digest(chunk.data))
    return out


@dataclass(frozen=True)
class Match:
    dataset_file: int  # the index's number of the dataset file
    chunks: int
    nbytes: int
    first_offset: int
    last_offset: int


def find(data, keys: np.ndarray, refs: np.ndarray, tick=None) -> list[Match]:
    """Dataset chunks inside ``data``: one Match per dataset file found, with how
    many chunks and bytes, and the export offsets of the first and last."""
    if not len(keys) or len(data) < MIN:
        return []
    found: dict[int, list[int]] = {}
    digests, offsets, lengths = [], [], []
    for i, chunk in enumerate(_chunker().cut_buf(memoryview(data))):
        digests.append(digest(chunk.data))
        offsets.append(chunk.offset)
        lengths.append(chunk.length)
        if tick and i % 4096 == 0:
            tick()
    arr = np.array(digests, dtype=np.uint64)
    pos = np.searchsorted(keys, arr)
    pos[pos >= len(keys)] = 0
    hits = np.flatnonzero(keys[pos] == arr)
    per_file: dict[int, list[int]] = {}
    for h in hits:
        per_file.setdefault(int(refs[pos[h]]), []).append(int(h))
    out = []
    for file_no, chunk_ids in sorted(per_file.items()):
        found[file_no] = chunk_ids
        out.append(Match(file_no, len(chunk_ids), sum(lengths[c] for c in chunk_ids),
                         offsets[chunk_ids[0]], offsets[chunk_ids[-1]]))
    return out
