"""Perceptual hashes (imagehash's pHash) of images and of image-shaped arrays.

A resized, re-encoded, brightness-shifted or 8-bit copy of a dataset image keeps
its pHash within a few bits; different images of the dataset are tens of bits
apart (bench/disclosure.py prints the smallest distance between two dataset
images, the margin this threshold leaves).
"""
from __future__ import annotations

import io
import warnings

import imagehash
import numpy as np
from PIL import Image

# A 1024-bit pHash (imagehash's phash, hash_size 32: the lowest 32 x 32 DCT frequencies
# of a 128 x 128 grey copy). The synthetic mammograms all share one smooth shape, which
# is all a 64-bit pHash sees (different images at distance 0) and most of what a 256-bit
# one sees (8 bits apart at 1024 x 1280); at 1024 bits different images are 170+ apart,
# a copy resized by a pixel and re-encoded (PNG or JPEG 85) within 40, and a half-size
# JPEG (quality 70) within 80 (bench/disclosure.py prints the margin for a dataset).
HASH_SIZE = 32
BITS = HASH_SIZE * HASH_SIZE
NEAR = 100  # bits of BITS: at most this far from a dataset image's pHash is a copy of it
MIN_SIDE = 32  # smaller arrays are not images worth hashing
MAX_FILE = 1 << 30  # an image file larger than this is not decoded (the file is reviewed)


def _hash(image: Image.Image) -> int:
    return int(str(imagehash.phash(image, hash_size=HASH_SIZE)), 16)


def as_words(phash: int) -> list[int]:
    """A hash as BITS // 64 unsigned 64-bit words (the index stores them so)."""
    return [(phash >> (64 * i)) & ((1 << 64) - 1) for i in range(BITS // 64)]


def array_image(arr: np.ndarray) -> Image.Image | None:
    """A 2-D (or H x W x 1/3/4) numeric array as an 8-bit grey image, scaled min..max."""
    if arr.dtype.kind not in "uif" or arr.size == 0:
        return None
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        arr = arr[..., :3].mean(axis=-1)
    elif arr.ndim == 3 and arr.shape[0] in (1, 3):  # C x H x W, as torch keeps images
        arr = arr.mean(axis=0)
    if arr.ndim != 2 or min(arr.shape) < MIN_SIDE:
        return None
    arr = np.nan_to_num(arr.astype(np.float64))
    low, high = float(arr.min()), float(arr.max())
    if high <= low:
        return None
    return Image.fromarray(((arr - low) * (255.0 / (high - low))).astype(np.uint8))


def read_npy(data, max_bytes: int) -> np.ndarray | None:
    """An NPY file's array without pickles (allow_pickle=False), if it is at most ``max_bytes``."""
    f = io.BytesIO(bytes(data[:max_bytes + 4096]))
    try:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f, max_header_size=10_000)
        if dtype.hasobject or int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > max_bytes:
            return None
        f.seek(0)
        return np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, OSError, EOFError, TypeError):
        return None


def phash_of(data, type_: str, max_pixels: int) -> int | None:
    """The pHash of an image file or of a 2-D NPY array; None for anything else."""
    if type_ == "npy":
        arr = read_npy(data, max_pixels * 8)
        image = array_image(arr) if arr is not None else None
        return _hash(image) if image is not None else None
    if type_ not in ("png", "jpeg", "gif", "tiff", "bmp", "webp") or len(data) > MAX_FILE:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(bytes(data)))
            if image.size[0] * image.size[1] > max_pixels:
                return None
            image.load()
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB") if image.mode in ("RGBA", "P", "CMYK") else image.convert("L")
        if min(image.size) < MIN_SIDE:
            return None
        return _hash(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            EOFError, ZeroDivisionError):
        return None


def nearest(phash: int, hashes: np.ndarray, refs: np.ndarray) -> tuple[int, int] | None:
    """(dataset file number, distance in bits of BITS) of the nearest dataset image, if within NEAR."""
    if not len(hashes):
        return None
    x = np.bitwise_xor(hashes.reshape(len(hashes), -1), np.array(as_words(phash), dtype=np.uint64))
    distances = np.unpackbits(x.view(np.uint8), axis=1).sum(axis=1)
    best = int(np.argmin(distances))
    return (int(refs[best]), int(distances[best])) if distances[best] <= NEAR else None
