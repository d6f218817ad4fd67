"""What a file is, by its bytes (never by its name), and how random it looks."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np

HDF5 = b"\x89HDF\r\n\x1a\n"
NPY = b"\x93NUMPY"
IMAGES = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg", b"GIF87a": "gif", b"GIF89a": "gif",
          b"II*\x00": "tiff", b"MM\x00*": "tiff", b"BM": "bmp"}
# Protocol 2+ pickles start with PROTO; legacy torch.save writes a pickled magic number first.
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def kind(data, name_hint: str = "") -> str:
    """One of the types DISCLOSURE-INTERFACE.md lists, from the first bytes (and
    the directory of a zip). ``data`` is bytes or a memoryview/mmap."""
    head = bytes(data[:512])
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _zip_kind(data)
    if head.startswith(NPY):
        return "npy"
    if head.startswith(HDF5):
        return "hdf5"
    for magic, name in IMAGES.items():
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"BZh"):
        return "bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(TORCH_LEGACY_MAGIC):
        return "pytorch-legacy"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(data) >= 512 and bytes(data[257:262]) == b"ustar":
        return "tar"
    if _is_safetensors(data):
        return "safetensors"
    if _looks_like_text(head) and _looks_like_text(bytes(data[-512:])):
        stripped = head.lstrip()
        if stripped[:1] in (b"{", b"["):
            try:
                json.loads(bytes(data[:64 << 20]))
                return "json"
            except (ValueError, UnicodeDecodeError, RecursionError):
                pass
        if _looks_like_csv(head):
            return "csv"
        return "text"
    if _is_onnx(head):
        return "onnx"
    return "binary"


def _zip_kind(data) -> str:
    try:
        with zipfile.ZipFile(io.BytesIO(data) if isinstance(data, bytes) else _Reader(data)) as z:
            names = z.namelist()[:100_000]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return "binary"
    tops = {n.split("/", 1)[-1] for n in names}
    if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return "pytorch-zip"
    if "[Content_Types].xml" in names and any(n.startswith("xl/") for n in names):
        return "xlsx"
    if "config.json" in tops and any(n.endswith(".weights.h5") or n == "model.weights.h5" for n in names):
        return "keras"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    return "zip"


class _Reader(io.RawIOBase):
    """A seekable file over an mmap or memoryview, so zipfile reads without a copy."""

    def __init__(self, data):
        self.data, self.pos = memoryview(data), 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        self.pos = {0: offset, 1: self.pos + offset, 2: len(self.data) + offset}[whence]
        return self.pos

    def tell(self):
        return self.pos

    def readinto(self, b):
        chunk = self.data[self.pos:self.pos + len(b)]
        b[:len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


def reader(data):
    """A binary file object over ``data`` (bytes, mmap or memoryview)."""
    return io.BufferedReader(_Reader(data))


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # a character cut at the sample's end is fine
            return False
    printable = sum(1 for b in head if b >= 32 or b in (9, 10, 13))
    return printable >= 0.95 * len(head)


def _looks_like_csv(head: bytes) -> bool:
    lines = head.decode("utf-8", "replace").splitlines()[:5]
    if len(lines) < 2:
        return False
    for sep in (",", ";", "\t", "|"):
        counts = {line.count(sep) for line in lines[:-1] if line}
        if len(counts) == 1 and counts.pop() >= 1:
            return True
    return False


def _is_safetensors(data) -> bool:
    if len(data) < 10:
        return False
    size = int.from_bytes(bytes(data[:8]), "little")
    if not 2 <= size <= min(len(data) - 8, 100 << 20) or bytes(data[8:9]) != b"{":
        return False
    try:
        return isinstance(json.loads(bytes(data[8:8 + size])), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def _is_onnx(head: bytes) -> bool:
    # ModelProto: field 1 ir_version (varint, tag 0x08) first, as every exporter writes it;
    # then a producer name, opset or graph (tags 0x12, 0x1a, 0x22, 0x3a, 0x42).
    return len(head) > 4 and head[0] == 0x08 and 1 <= head[1] <= 20 and head[2] in (0x12, 0x1a, 0x22, 0x2a, 0x3a, 0x42)


def entropy(data, sample: int = 8 << 20) -> float:
    """Shannon entropy in bits per byte of (the first ``sample`` bytes of) ``data``."""
    arr = np.frombuffer(bytes(data[:sample]), dtype=np.uint8)
    if not len(arr):
        return 0.0
    p = np.bincount(arr, minlength=256) / len(arr)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum()) if len(p) > 1 else 0.0


def describe(data, type_: str) -> str:
    return f"{type_} by content, {len(data)} bytes, entropy {entropy(data):.2f} bits/byte"


def is_text(type_: str) -> bool:
    return type_ in ("text", "csv", "json")


