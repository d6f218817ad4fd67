"""Model files by their structure: parameter counts, pickled code, image-shaped tensors.

Nothing is loaded with torch, safetensors, onnx or h5py: PyTorch's zip and legacy
formats are read with pickles.py, safetensors by its JSON header, ONNX by a
small protobuf walk of its initializers. HDF5 (Keras .h5, .keras's weights) is
not parsed: its parameter count is estimated from its size (4 bytes each).
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field

import numpy as np

from . import pickles

SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


@dataclass
class ModelFacts:
    format: str
    parameters: int = 0
    estimated: bool = False
    pickle: pickles.PickleFacts | None = None
    # (name for a reason, array) of tensors shaped like images, for the perceptual hash
    image_tensors: list[tuple[str, np.ndarray]] = field(default_factory=list)
    strings: list[str] = field(default_factory=list)


def pickled_globals(data) -> list[str]:
    """What a pickle would import (module.name), read from its opcodes: for `release`."""
    return pickles.read(data).globals


def _image_like(shape: tuple[int, ...]) -> bool:
    s = tuple(d for d in shape if d != 1)
    return (len(s) == 2 and min(s) >= 32) or (len(s) == 3 and s[0] in (3, 4) and min(s[1:]) >= 32)


def _as_array(raw: bytes, dtype: str, offset: int, shape: tuple[int, ...]) -> np.ndarray | None:
    if dtype in ("unknown", "bfloat16"):
        return None
    try:
        dt = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64))
        arr = np.frombuffer(raw, dtype=dt, count=n, offset=offset * dt.itemsize)
        return arr.reshape(shape).squeeze()
    except (TypeError, ValueError):
        return None


def torch_zip(z: zipfile.ZipFile, read_member, max_tensor_images: int = 64) -> ModelFacts:
    """``read_member(info) -> bytes`` reads a member within the report's bounds."""
    names = {i.filename: i for i in z.infolist()}
    pkl = next(n for n in names if n.endswith("data.pkl"))
    prefix = pkl[: -len("data.pkl")]
    facts = pickles.read(read_member(names[pkl]))
    model = ModelFacts("pytorch-zip", pickle=facts, strings=facts.strings)
    model.parameters = sum(int(np.prod(t.shape, dtype=np.int64)) for t in facts.tensors) \
        or sum(facts.storages.values())
    for t in facts.tensors:
        if len(model.image_tensors) >= max_tensor_images or not _image_like(t.shape):
            continue
        info = names.get(f"{prefix}data/{t.storage_key}")
        if info is not None:
            arr = _as_array(read_member(info), t.dtype, t.offset, t.shape)
            if arr is not None:
                model.image_tensors.append((f"tensor {len(model.image_tensors) + 1} of shape {t.shape}", arr))
    return model


def torch_legacy(data) -> ModelFacts:
    """torch.save's format before 1.6: pickles of magic, protocol, system info, the
    object, the storage keys, then the storages' bytes."""
    start, facts = 0, None
    found: list[pickles.PickleFacts] = []
    for _ in range(5):
        p = pickles.read(data, start)
        found.append(p)
        if p.error:
            break
        start = p.end
    facts = found[3] if len(found) > 3 else found[-1]
    merged = pickles.PickleFacts(globals=[g for p in found for g in p.globals],
                                 strings=[s for p in found for s in p.strings], tensors=facts.tensors,
                                 storages=facts.storages, error=next((p.error for p in found if p.error), None))
    model = ModelFacts("pytorch-legacy", pickle=merged, strings=merged.strings)
    model.parameters = sum(int(np.prod(t.shape, dtype=np.int64)) for t in facts.tensors) or sum(facts.storages.values())
    return model


def safetensors(data, max_tensor_images: int = 64) -> ModelFacts:
    size = int.from_bytes(bytes(data[:8]), "little")
    header = json.loads(bytes(data[8:8 + size]))
    model = ModelFacts("safetensors")
    base = 8 + size
    for name, entry in header.items():
        if name == "__metadata__":
            if isinstance(entry, dict):
                model.strings.extend(f"{k} {v}" for k, v in entry.items())
            continue
        model.strings.append(name)
        shape = tuple(int(d) for d in entry.get("shape", []))
        model.parameters += int(np.prod(shape, dtype=np.int64))
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype", ""), "unknown")
        begin, end = entry.get("data_offsets", [0, 0])
        if _image_like(shape) and len(model.image_tensors) < max_tensor_images and dtype != "unknown" \
                and 0 <= begin <= end <= len(data) - base:
            arr = _as_array(bytes(data[base + begin:base + end]), dtype, 0, shape)
            if arr is not None:
                model.image_tensors.append((f"tensor {len(model.image_tensors) + 1} of shape {shape}", arr))
    return model


def _fields(buf: memoryview):
    """(field number, wire type, value) of one protobuf message; value is an int or a memoryview."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            length, i = _varint(buf, i)
            if i + length > n:
                raise ValueError("truncated")
            value, i = buf[i:i + length], i + length
        elif wire == 1:
            value, i = None, i + 8
        elif wire == 5:
            value, i = None, i + 4
        else:
            raise ValueError(f"wire type {wire}")
        yield number, wire, value


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("bad varint")
        b = buf[i]
        result |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return result, i
        shift += 7


def onnx(data) -> ModelFacts:
    """ModelProto.graph (7) -> GraphProto.initializer (5) -> TensorProto.dims (1)."""
    model = ModelFacts("onnx")
    for number, wire, value in _fields(memoryview(data)):
        if number == 7 and wire == 2:
            for gnum, gwire, gvalue in _fields(value):
                if gnum == 5 and gwire == 2:
                    dims = []
                    for tnum, twire, tvalue in _fields(gvalue):
                        if tnum == 1 and twire == 0:
                            dims.append(tvalue)
                        elif tnum == 1 and twire == 2:  # packed
                            j, packed = 0, tvalue
                            while j < len(packed):
                                d, j = _varint(packed, j)
                                dims.append(d)
                        elif tnum == 8 and twire == 2:
                            model.strings.append(bytes(tvalue).decode("utf-8", "replace"))
                    model.parameters += int(np.prod(dims, dtype=np.int64)) if dims else 1
    return model


def hdf5(data, format_: str = "hdf5") -> ModelFacts:
    return ModelFacts(format_, parameters=len(data) // 4, estimated=True)
