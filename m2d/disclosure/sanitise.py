"""The sanitised release of a model file: plain tensors, low mantissa bits rounded away.

    python -m m2d.disclosure.sanitise IN OUT [--mantissa-bits 7] [--summary FILE]

A hidden payload in the low bits of trained weights cannot be told from noise
(Song, Ristenpart and Shmatikov, CCS 2017: training code that encodes records in
the weights' low bits at no cost in accuracy), so it is removed instead: every
float is rounded to nearest (ties to even) at ``--mantissa-bits`` bits of
mantissa (7, bfloat16's precision, by default) and the tensors are written
again as a safetensors file: no pickle, no code, nothing but names, shapes,
dtypes and numbers. Floats keep their dtype (a model loads the copy as it
loaded the original); NaNs become the one canonical NaN (a NaN's payload is
bits too); integer tensors are copied as they are and named in the summary.

Runs on the data side (the sealed report job), never in the gateway: the input
is hostile. It is read without executing anything:
- safetensors: its JSON header and bounded offsets;
- PyTorch's zip checkpoint (torch.save since 1.6, whatever its suffix: .pt,
  .pth, .tar) and its legacy pickle format: a restricted unpickler that knows
  only the globals of tensors and plain containers (torch._utils'
  _rebuild_tensor_v2 and _rebuild_parameter, collections.OrderedDict, the
  storage types) and maps them onto numpy stand-ins; it imports nothing, so a
  ``__reduce__`` payload is refused, never called. Tensor views are checked
  against their storage before they are read.
Anything else (another global, a tensor subclass, an unknown format) raises
``Unsanitisable``: the report makes the file ``review``.

The summary (JSON, also printed) says what was done: tensors, floats rounded,
bits removed, the largest absolute and relative change of a weight (overall and per
tensor: tensor_changes; the largest five in the check's reason), what was
left out (non-tensor values: strings, numbers), and a sketch of the weights (a
fixed random projection per tensor) that release differencing compares
(gateway: a release whose weights differ from an earlier one's by less than
a site threshold is flagged).

Standard library and numpy only: it runs in the report job's image.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import math
import pickle
import struct
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_MANTISSA_BITS = 7  # bfloat16's
SKETCH_DIMENSIONS = 32  # per tensor: distances estimated within ~25 % (a random projection's)
SKETCH_SEED = 20231  # fixed: sketches of two releases must be comparable
MAX_TENSORS = 100_000
MAX_VALUES = 1_000_000  # tensors and other values in one file
MAX_DEPTH = 32  # containers in containers
MAX_ELEMENTS = 4 * 1024**3  # in one tensor; a hostile size must not allocate memory it lacks
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001


class Unsanitisable(Exception):
    """The file cannot be re-saved as plain tensors; ``reason`` says why (for the report)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------ dtypes

# name -> (numpy dtype of its raw elements, float kind: (mantissa, exponent bits) or None)
# bfloat16 has no numpy dtype: it is kept as uint16 bit patterns.
DTYPES = {
    "F64": ("<f8", (52, 11)), "F32": ("<f4", (23, 8)), "F16": ("<f2", (10, 5)), "BF16": ("<u2", (7, 8)),
    "I64": ("<i8", None), "I32": ("<i4", None), "I16": ("<i2", None), "I8": ("i1", None),
    "U8": ("u1", None), "BOOL": ("?", None),
}
UINT_OF_WIDTH = {8: np.uint64, 4: np.uint32, 2: np.uint16}
TORCH_STORAGES = {  # torch.<Name>Storage -> safetensors dtype name
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL",
}


@dataclass
class Tensor:
    dtype: str  # a DTYPES name
    array: np.ndarray  # C-contiguous, of DTYPES[dtype][0]


# ------------------------------------------------------------------ rounding

def round_mantissa(tensor: Tensor, bits: int) -> Tensor:
    """Round every float to nearest (ties to even) at ``bits`` bits of
    mantissa, in its own dtype; NaNs become one NaN. Integers are unchanged."""
    kind = DTYPES[tensor.dtype][1]
    if kind is None:
        return tensor
    mantissa, exponent = kind
    drop = mantissa - bits
    raw = tensor.array.view(UINT_OF_WIDTH[tensor.array.dtype.itemsize])
    utype = raw.dtype.type
    width = raw.dtype.itemsize * 8
    exponent_mask = utype(((1 << exponent) - 1) << mantissa)
    mantissa_mask = utype((1 << mantissa) - 1)
    special = (raw & exponent_mask) == exponent_mask  # Inf and NaN
    nan = special & ((raw & mantissa_mask) != 0)
    if drop > 0:
        half = utype((1 << (drop - 1)) - 1)
        odd = (raw >> utype(drop)) & utype(1)
        keep = utype(((1 << width) - 1) ^ ((1 << drop) - 1))
        # rounding up may carry into the exponent: the next binade, or infinity, as bfloat16 does
        rounded = np.where(special, raw, (raw + half + odd) & keep)
    else:
        rounded = raw.copy()
    canonical = utype((((1 << exponent) - 1) << mantissa) | (1 << (mantissa - 1)))  # quiet NaN, sign 0
    rounded = np.where(nan, canonical, rounded).astype(raw.dtype)
    return Tensor(tensor.dtype, rounded.view(tensor.array.dtype))


def as_float64(tensor: Tensor) -> np.ndarray | None:
    """The values of a float tensor as float64 (bfloat16 widened); None for integers."""
    if DTYPES[tensor.dtype][1] is None:
        return None
    if tensor.dtype == "BF16":
        return (tensor.array.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    return tensor.array.astype(np.float64)


def sketch(values: np.ndarray) -> list[float]:
    """A fixed random projection of a tensor's values (finite ones; the rest as
    0): a count sketch, each value added with a random sign to one of
    SKETCH_DIMENSIONS sums, the same for every tensor of that size. Two
    tensors' sketches are about as far apart as the tensors (the squared
    distance is kept in expectation), at the cost of one pass."""
    flat = np.nan_to_num(values.reshape(-1), nan=0.0, posinf=0.0, neginf=0.0)
    rng = np.random.default_rng(SKETCH_SEED)
    buckets = rng.integers(0, SKETCH_DIMENSIONS, flat.size, dtype=np.uint8)
    signs = rng.integers(0, 2, flat.size, dtype=np.int8) * 2 - 1
    return [float(x) for x in np.bincount(buckets, weights=flat * signs, minlength=SKETCH_DIMENSIONS)]


# ------------------------------------------------------------------ safetensors

def read_safetensors(data: bytes, layout: list | None = None) -> dict[str, Tensor]:
    """Its tensors; ``layout``, when given, gets (dtype, byte offset in ``data``,
    elements) of each (write_rounded rounds them in place)."""
    if len(data) < 8:
        raise Unsanitisable("too short for a safetensors file")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8 or length > 100 * 1024**2:
        raise Unsanitisable("its safetensors header is longer than the file")
    try:
        header = json.loads(data[8:8 + length])
    except ValueError:
        raise Unsanitisable("its safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise Unsanitisable("its safetensors header is not a JSON object")
    body = memoryview(data)[8 + length:]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue  # free text: left behind
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise Unsanitisable(f"tensor {name[:80]!r} has no dtype, shape and data_offsets") from None
        if dtype not in DTYPES:
            raise Unsanitisable(f"tensor {name[:80]!r} has dtype {str(dtype)[:20]!r}, which is not kept")
        count = _elements(shape, name)
        itemsize = np.dtype(DTYPES[dtype][0]).itemsize
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= len(body)
                and end - begin == count * itemsize):
            raise Unsanitisable(f"tensor {name[:80]!r}'s data offsets do not fit its shape or the file")
        array = np.frombuffer(body[begin:end], dtype=DTYPES[dtype][0]).reshape(shape).copy()
        tensors[name] = Tensor(dtype, array)
        if layout is not None:
            layout.append((dtype, 8 + length + begin, count))
    return tensors


def write_safetensors(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors format (huggingface/safetensors): a little-endian u64
    header length, a JSON header of dtype, shape and data_offsets per tensor
    (plus string ``__metadata__``), padded with spaces to 8 bytes, then the data."""
    header: dict = {"__metadata__": metadata}
    chunks, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name]
        raw = np.ascontiguousarray(tensor.array).tobytes()
        header[name] = {"dtype": tensor.dtype, "shape": list(tensor.array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def _elements(shape, name: str) -> int:
    if not isinstance(shape, (list, tuple)) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise Unsanitisable(f"tensor {str(name)[:80]!r} has the shape {str(shape)[:80]}")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise Unsanitisable(f"tensor {str(name)[:80]!r} claims {count:,} elements")
    return count


# ------------------------------------------------------------------ PyTorch, without running it

class _StorageType:
    """torch.<Name>Storage as a pickle names it: only its dtype matters."""
    __slots__ = ("dtype",)

    def __init__(self, dtype: str):
        self.dtype = dtype


@dataclass
class _Storage:
    dtype: str
    array: np.ndarray  # flat


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> Tensor:
    """torch._utils._rebuild_tensor_v2 (and _rebuild_tensor) on a numpy storage:
    the view is checked to lie inside the storage before it is read."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor whose storage is not one of the file's")
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
        raise pickle.UnpicklingError("a tensor with a bad size or stride")
    size, stride = tuple(size), tuple(stride)
    count = _elements(list(size), "a tensor")
    if len(stride) != len(size) or not all(isinstance(s, int) and s >= 0 for s in stride) \
            or not isinstance(storage_offset, int) or storage_offset < 0:
        raise pickle.UnpicklingError("a tensor with a bad stride or offset")
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) if count else storage_offset - 1
    if last >= storage.array.size:
        raise pickle.UnpicklingError("a tensor that reaches past the end of its storage")
    if count == 0:
        return Tensor(storage.dtype, np.zeros(size, dtype=storage.array.dtype))
    item = storage.array.itemsize
    view = np.lib.stride_tricks.as_strided(storage.array[storage_offset:], shape=size,
                                           strides=[s * item for s in stride], writeable=False)
    return Tensor(storage.dtype, np.array(view, order="C"))  # (ascontiguousarray would make a scalar 1-d)


def _rebuild_parameter(data, *_ignored) -> Tensor:
    """torch._utils._rebuild_parameter: an nn.Parameter is kept as the tensor it wraps."""
    if not isinstance(data, Tensor):
        raise pickle.UnpicklingError("a parameter that wraps no tensor")
    return data


class _Deferred:
    """A legacy checkpoint's tensor: its storage's bytes come after the pickle,
    so it is rebuilt once they are read (_resolve)."""

    def __init__(self, rebuild, args):
        self.rebuild, self.args = rebuild, args


# What a state dict's pickle may name, and the stand-in each becomes. torch's own
# weights_only allow-list is wider (torch.Size, devices, dtypes...); these suffice
# for state dicts and checkpoints of them. Each lookup makes a fresh object, so
# a pickle's BUILD opcode can change nothing that outlives it.
REBUILDS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only tensors, storages and OrderedDict (to
    stand-ins) and imports nothing: any other global is refused, never called."""

    def __init__(self, file, storages, deferred: bool = False):
        super().__init__(file, encoding="utf-8")
        self.storages = storages  # persistent id -> _Storage
        self.deferred = deferred

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in TORCH_STORAGES:
            return _StorageType(TORCH_STORAGES[name])
        rebuild = REBUILDS.get((module, name))
        if rebuild is None:
            raise pickle.UnpicklingError(f"the pickle names {module[:80]}.{name[:80]}, which is not a tensor "
                                         "or a plain container: it could run code")
        if self.deferred:
            return lambda *args: _Deferred(rebuild, args)
        return lambda *args: rebuild(*args)

    def persistent_load(self, pid):
        if not (self.storages and isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and pid[1].dtype in DTYPES):
            raise pickle.UnpicklingError("a persistent id that is not a storage")
        return self.storages(pid)


def _unpickle(stream: io.BytesIO, storages, deferred: bool = False) -> object:
    try:
        return _RestrictedUnpickler(stream, storages, deferred).load()
    except Unsanitisable:
        raise
    except Exception as e:  # noqa: BLE001 - a hostile pickle raises anything; each is the same verdict
        raise Unsanitisable(f"its pickle is not a plain state dict: {str(e)[:200] or type(e).__name__}") from None


def read_torch_zip(path: Path | io.BytesIO, max_bytes: int, storages: dict | None = None) -> object:
    """torch.save's zip format: <archive>/data.pkl, <archive>/data/<key> raw storages.
    ``storages``, when given, gets each storage the pickle uses: its zip member's
    name -> _Storage (write_rounded rounds them)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise Unsanitisable(f"not a readable zip: {e}") from None
    with archive:
        names = {info.filename: info for info in archive.infolist()}
        roots = [n[:-len("/data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(roots) != 1:
            raise Unsanitisable("a zip, but not a PyTorch checkpoint (no single <archive>/data.pkl)")
        root = roots[0]
        if sum(info.file_size for info in names.values()) > max_bytes:
            raise Unsanitisable(f"its zip unpacks to more than {max_bytes:,} bytes")
        order = names.get(f"{root}/byteorder")
        if order is not None and archive.read(order).strip() != b"little":
            raise Unsanitisable("a big-endian checkpoint")
        loaded: dict[str, _Storage] = {}

        def storage(pid):
            _, kind, key, _location, numel = pid[:5]
            key = str(key)
            if key not in loaded:
                info = names.get(f"{root}/data/{key}")
                if info is None:
                    raise Unsanitisable(f"storage {key[:40]!r} is missing from the zip")
                raw = archive.read(info)
                width = np.dtype(DTYPES[kind.dtype][0]).itemsize
                if len(raw) % width or (isinstance(numel, int) and len(raw) // width < numel):
                    raise Unsanitisable(f"storage {key[:40]!r} is shorter than it claims")
                loaded[key] = _Storage(kind.dtype, np.frombuffer(raw, dtype=DTYPES[kind.dtype][0]))
                if storages is not None:
                    storages[info.filename] = loaded[key]
            return loaded[key]

        return _unpickle(io.BytesIO(archive.read(names[f"{root}/data.pkl"])), storage)


def read_torch_legacy(data: bytes, layout: list | None = None) -> object:
    """torch.save(..., _use_new_zipfile_serialization=False): four pickles
    (magic number, protocol, system info, the object), the storage keys,
    then each storage as a little-endian u64 count and its raw elements.
    ``layout``, when given, gets (dtype, byte offset, elements) of each storage."""
    stream = io.BytesIO(data)
    try:
        magic, protocol, info = (_unpickle(stream, None) for _ in range(3))
    except Unsanitisable:
        raise Unsanitisable("a pickle, but not a PyTorch checkpoint") from None
    if magic != LEGACY_MAGIC or protocol != LEGACY_PROTOCOL or not isinstance(info, dict):
        raise Unsanitisable("not a PyTorch legacy checkpoint")
    if not info.get("little_endian", True):
        raise Unsanitisable("a big-endian checkpoint")
    wanted: dict[str, tuple] = {}  # root key -> (dtype, [storages made for it])
    views: list[tuple[_Storage, str, int, int]] = []

    def storage(pid):
        _, kind, key, _location, numel, *view = pid
        key = str(key)
        if not isinstance(numel, int) or numel < 0 or numel > MAX_ELEMENTS:
            raise Unsanitisable("a storage with a bad size")
        entry = wanted.setdefault(key, (kind.dtype, _Storage(kind.dtype, np.zeros(0, DTYPES[kind.dtype][0]))))
        if entry[0] != kind.dtype:
            raise Unsanitisable(f"storage {key[:40]!r} is read with two dtypes")
        if view and view[0] is not None:  # (view key, offset, size): a slice of the root storage
            _view_key, offset, size = view[0]
            part = _Storage(kind.dtype, np.zeros(0, DTYPES[kind.dtype][0]))
            views.append((part, key, int(offset), int(size)))
            return part
        return entry[1]

    result = _unpickle(stream, storage, deferred=True)
    keys = _unpickle(stream, None)
    if not isinstance(keys, list):
        raise Unsanitisable("its list of storages is missing")
    for key in keys:
        dtype, made = wanted.get(str(key), (None, None))
        if made is None:
            raise Unsanitisable(f"storage {str(key)[:40]!r} is listed but never used")
        header = stream.read(8)
        if len(header) != 8:
            raise Unsanitisable("its storages end early")
        (count,) = struct.unpack("<Q", header)
        width = np.dtype(DTYPES[dtype][0]).itemsize
        if count > MAX_ELEMENTS:
            raise Unsanitisable("a storage with a bad size")
        offset = stream.tell()
        raw = stream.read(count * width)
        if len(raw) != count * width:
            raise Unsanitisable("its storages end early")
        made.array = np.frombuffer(raw, dtype=DTYPES[dtype][0])
        if layout is not None:
            layout.append((dtype, offset, count))
    for part, key, offset, size in views:
        root = wanted[key][1].array
        if offset < 0 or size < 0 or offset + size > root.size:
            raise Unsanitisable("a storage view past the end of its storage")
        part.array = root[offset:offset + size]
    return _resolve(result)


def _resolve(value, depth: int = 0, seen: list | None = None):
    """A legacy checkpoint's object with its tensors rebuilt (their storages now read)."""
    seen = [0] if seen is None else seen
    seen[0] += 1
    if depth > MAX_DEPTH or seen[0] > MAX_VALUES:
        raise Unsanitisable(f"more than {MAX_VALUES:,} values, or nested more than {MAX_DEPTH} deep")
    if isinstance(value, _Deferred):
        args = tuple(_resolve(a, depth + 1, seen) for a in value.args)
        try:
            return value.rebuild(*args)
        except (pickle.UnpicklingError, TypeError) as e:
            raise Unsanitisable(f"its pickle is not a plain state dict: {e}") from None
    if isinstance(value, dict):
        return {k: _resolve(v, depth + 1, seen) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_resolve(v, depth + 1, seen) for v in value]
    return value


# ------------------------------------------------------------------ the whole file

@dataclass
class Result:
    source_format: str
    tensors: dict[str, Tensor]
    left_out: list[str] = field(default_factory=list)  # names of non-tensor values


def load(source: Path | bytes, max_bytes: int = 16 * 1024**3, found: dict | None = None) -> Result:
    """The tensors of a model file (its path, or its bytes: a member of an
    archive, archives.py), by its content (not its name); Unsanitisable otherwise.
    ``found``, when given, gets where its numbers lie (write_rounded): "members" (a
    torch zip's storage members: name -> _Storage), or "layout" ([(dtype, byte
    offset, elements)]) and "data" (the file's bytes)."""
    in_memory = isinstance(source, (bytes, bytearray))
    if in_memory:
        head = bytes(source[:16])
    else:
        source = Path(source)
        with open(source, "rb") as f:
            head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        members = found.setdefault("members", {}) if found is not None else None
        return _flattened("torch-zip", read_torch_zip(io.BytesIO(source) if in_memory else source, max_bytes,
                                                      members))
    size = len(source) if in_memory else source.stat().st_size
    if size > max_bytes:
        raise Unsanitisable(f"larger than {max_bytes:,} bytes")
    data = bytes(source) if in_memory else source.read_bytes()
    layout = None
    if found is not None:
        found["data"], layout = data, found.setdefault("layout", [])
    if len(head) >= 9 and head[8:9] == b"{":
        return Result("safetensors", read_safetensors(data, layout))
    if head[:1] == b"\x80":
        return _flattened("torch-legacy", read_torch_legacy(data, layout))
    raise Unsanitisable("not a PyTorch checkpoint or a safetensors file (by its content)")


def _flattened(source_format: str, value) -> Result:
    result = Result(source_format, {})

    visited = 0

    def walk(prefix: str, item, depth: int):
        nonlocal visited
        visited += 1
        if depth > MAX_DEPTH or visited > MAX_VALUES:  # a pickle's memo can make a tree of 10^30 leaves
            raise Unsanitisable(f"more than {MAX_VALUES:,} values, or nested more than {MAX_DEPTH} deep")
        if isinstance(item, Tensor):
            if len(result.tensors) >= MAX_TENSORS:
                raise Unsanitisable(f"more than {MAX_TENSORS:,} tensors")
            result.tensors[prefix or "tensor"] = item
        elif isinstance(item, dict):
            for key, child in item.items():
                walk(f"{prefix}.{key}" if prefix else str(key), child, depth + 1)
        elif isinstance(item, (list, tuple)):
            for index, child in enumerate(item):
                walk(f"{prefix}.{index}" if prefix else str(index), child, depth + 1)
        elif not (item is None or isinstance(item, (_Storage, _StorageType))):
            result.left_out.append(prefix or "(the whole file)")

    walk("", value, 0)
    if not result.tensors:
        raise Unsanitisable("it holds no tensor")
    return result


def sanitise(source: Path, target: Path, mantissa_bits: int = DEFAULT_MANTISSA_BITS) -> dict:
    """Write ``source``'s tensors to ``target`` as safetensors, floats rounded;
    the summary. Unsanitisable when it cannot (nothing is written then)."""
    data, summary = sanitised_bytes(Path(source), mantissa_bits)
    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(data)
    partial.replace(target)
    return summary


def sanitised_bytes(source: Path | bytes, mantissa_bits: int = DEFAULT_MANTISSA_BITS) -> tuple[bytes, dict]:
    """``sanitise``'s safetensors bytes of ``source`` (a path, or a model's bytes)
    and its summary; Unsanitisable when it cannot be re-saved."""
    if not 1 <= mantissa_bits <= 52:
        raise ValueError("mantissa bits: 1 to 52")
    loaded = load(source)
    out: dict[str, Tensor] = {}
    summary = {"format": loaded.source_format, "mantissa_bits": mantissa_bits, "tensors": len(loaded.tensors),
               "float_values": 0, "integer_values": 0, "bits_total": 0, "bits_removed": 0,
               "max_abs_change": 0.0, "max_rel_change": 0.0, "integer_tensors": [],
               "left_out": loaded.left_out[:100], "left_out_count": len(loaded.left_out), "sketch": {},
               "tensor_changes": {}}  # per float tensor: [largest absolute, largest relative change]
    for name, tensor in loaded.tensors.items():
        rounded = _rounded(tensor, mantissa_bits)
        out[name] = rounded
        summary["bits_total"] += tensor.array.size * tensor.array.itemsize * 8
        before, after = as_float64(tensor), as_float64(rounded)
        if before is None:
            summary["integer_values"] += tensor.array.size
            summary["integer_tensors"].append(name)
            continue
        mantissa = DTYPES[tensor.dtype][1][0]
        summary["float_values"] += tensor.array.size
        summary["bits_removed"] += tensor.array.size * max(0, mantissa - mantissa_bits)
        finite = np.isfinite(before) & np.isfinite(after)
        if finite.any():
            change = np.abs(after[finite] - before[finite])
            largest_abs, largest_rel = float(change.max()), 0.0
            summary["max_abs_change"] = max(summary["max_abs_change"], largest_abs)
            scale = np.abs(before[finite])
            nonzero = scale > 0
            if nonzero.any():
                largest_rel = float((change[nonzero] / scale[nonzero]).max())
                summary["max_rel_change"] = max(summary["max_rel_change"], largest_rel)
            summary["tensor_changes"][name] = [largest_abs, largest_rel]
        summary["sketch"][name] = {"shape": list(tensor.array.shape), "norm": float(np.linalg.norm(
            np.nan_to_num(after, nan=0.0, posinf=0.0, neginf=0.0))), "projection": sketch(after)}
    summary["fraction_bits_removed"] = summary["bits_removed"] / summary["bits_total"] if summary["bits_total"] else 0
    summary["integer_tensors"] = summary["integer_tensors"][:100]
    metadata = {"m2d.sanitised": f"floats rounded to {mantissa_bits} mantissa bits; plain tensors only",
                "m2d.source_format": loaded.source_format}
    data = write_safetensors(out, metadata)
    summary["bytes"] = len(data)
    return data, summary


def _rounded(tensor: Tensor, mantissa_bits: int) -> Tensor:
    """round_mantissa at ``mantissa_bits``, or the dtype's own mantissa where it has fewer."""
    kind = DTYPES[tensor.dtype][1]
    return round_mantissa(tensor, min(mantissa_bits, kind[0]) if kind else mantissa_bits)


ZIP_ALIGNMENT = 64  # torch.save aligns each member's data so (torch.load(mmap=True) maps it)


def write_rounded(source: Path, target: Path, mantissa_bits: int = DEFAULT_MANTISSA_BITS) -> str:
    """``source`` in its own format, every float rounded as ``sanitise`` rounds it,
    all else as it is (the pickle, names, layout): what the researcher's predict
    loads in place of the released copy, which it could not load (safetensors),
    to measure the rounded model's held-out metric (rounded.py). Its tensors are
    the copy's, value for value, and it is refused (Unsanitisable, nothing
    written) exactly when the copy is. Its pickle is kept, never run here: only
    predict loads it, sealed. The source's format ("torch-zip", ...)."""
    if not 1 <= mantissa_bits <= 52:
        raise ValueError("mantissa bits: 1 to 52")
    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    try:
        with open(partial, "wb") as out:
            source_format = _round_into(Path(source), out, mantissa_bits)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)
    return source_format


def rounded_bytes(source: bytes, mantissa_bits: int = DEFAULT_MANTISSA_BITS) -> bytes:
    """``write_rounded``'s bytes of a model's bytes (a member of an archive: archives.py)."""
    if not 1 <= mantissa_bits <= 52:
        raise ValueError("mantissa bits: 1 to 52")
    out = io.BytesIO()
    _round_into(bytes(source), out, mantissa_bits)
    return out.getvalue()


def _round_into(source: Path | bytes, out, mantissa_bits: int) -> str:
    found: dict = {}
    loaded = load(source, found=found)
    if "members" in found:  # a torch zip: its members again, each storage rounded
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as archive, \
                zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as rewritten:
            for info in archive.infolist():
                body = archive.read(info)
                storage = found["members"].get(info.filename)
                if storage is not None:
                    body = _rounded(Tensor(storage.dtype, storage.array), mantissa_bits).array.tobytes()
                member = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                padding = -(out.tell() + 30 + len(member.filename.encode("utf-8")) + 4) % ZIP_ALIGNMENT
                member.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding  # as torch pads
                rewritten.writestr(member, body)
    else:  # safetensors, torch's legacy format: each tensor's or storage's bytes rounded in place
        data = bytearray(found["data"])
        for dtype, offset, count in found["layout"]:
            width = np.dtype(DTYPES[dtype][0]).itemsize
            array = np.frombuffer(bytes(data[offset:offset + count * width]), dtype=DTYPES[dtype][0])
            data[offset:offset + count * width] = _rounded(Tensor(dtype, array), mantissa_bits).array.tobytes()
        out.write(data)
    return loaded.source_format


MODEL_TYPES = ("pytorch-zip", "pytorch-legacy", "safetensors")  # the report's types this re-saves
REASON_TENSORS = 5  # tensors named in the sanitise check's reason (a reason is kept up to 2000 characters)
SANITISED_FOLDER = "sanitised"  # beside report.json: sanitised/<sha256 of the export file>.safetensors


def check_model(source: Path, sha256: str, report_dir: Path, mantissa_bits: int = DEFAULT_MANTISSA_BITS
                ) -> tuple[dict, dict | None]:
    """What the report job adds for one model file of the export: the check
    (``sanitise``: pass, or review when it cannot be re-saved) and the entry's
    ``sanitised`` field (None then): the copy's name under ``report_dir``, its
    sha256 and size, what rounding removed and changed, and the weights' sketch
    that release differencing compares (DISCLOSURE-INTERFACE.md)."""
    folder = Path(report_dir) / SANITISED_FOLDER
    folder.mkdir(exist_ok=True)
    name = f"{SANITISED_FOLDER}/{sha256}.safetensors"
    try:
        summary = sanitise(source, Path(report_dir) / name, mantissa_bits)
    except Unsanitisable as e:
        return {"name": "sanitise", "status": "review",
                "reason": f"cannot be re-saved as plain tensors, so it would leave as it is: {e.reason}"}, None
    with open(Path(report_dir) / name, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    sanitised = {"name": name, "sha256": digest, "size": summary["bytes"],
                 **{k: summary[k] for k in ("format", "mantissa_bits", "tensors", "float_values", "max_abs_change",
                                            "max_rel_change", "fraction_bits_removed", "left_out_count",
                                            "integer_tensors", "sketch", "tensor_changes")}}
    reason = (f"released as plain tensors (safetensors), floats rounded to {mantissa_bits} mantissa bits: "
              f"{summary['fraction_bits_removed']:.0%} of its bits removed, no weight changed by more than "
              f"{summary['max_rel_change']:.2%}")
    moved = sorted(summary["tensor_changes"].items(), key=lambda kv: -kv[1][0])[:REASON_TENSORS]
    if moved:  # the largest absolute change of a weight, tensor by tensor (all of them: the entry's tensor_changes)
        reason += "; largest change of a weight: " + ", ".join(
            f"{name[:60]} {absolute:.3g} ({relative:.2%})" for name, (absolute, relative) in moved)
        if len(summary["tensor_changes"]) > REASON_TENSORS:
            reason += f"; {len(summary['tensor_changes']) - REASON_TENSORS} other tensors changed less"
    if summary["left_out_count"]:
        reason += f"; {summary['left_out_count']} values that are not tensors left out"
    return {"name": "sanitise", "status": "pass", "reason": reason}, sanitised


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2d.disclosure.sanitise",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--mantissa-bits", type=int, default=DEFAULT_MANTISSA_BITS)
    parser.add_argument("--summary", type=Path, help="also write the summary (JSON) here")
    args = parser.parse_args(argv)
    try:
        summary = {"status": "sanitised", **sanitise(args.source, args.target, args.mantissa_bits)}
        code = 0
    except Unsanitisable as e:
        summary, code = {"status": "review", "reason": f"cannot be re-saved as plain tensors: {e.reason}"}, 3
    if args.summary:
        args.summary.write_text(json.dumps(summary))
    shown = {k: v for k, v in summary.items() if k != "sketch"}
    print(json.dumps(shown) if code == 0 else summary["reason"], file=sys.stdout if code == 0 else sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
