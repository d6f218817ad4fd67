"""Model files as PyTorch and safetensors write them, made with numpy alone.

torch.save's bytes are a pickle that names torch._utils._rebuild_tensor_v2 and
torch.<Type>Storage, with each storage as a persistent id ('storage', type,
key, location, numel). pickle writes a global only when it finds that very
object under its name, so stand-ins are put in sys.modules as `torch` and
`torch._utils` while a file is written (and taken away after): the bytes are
those torch writes, and nothing of torch is needed to write or read them.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
import types
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

STORAGE_OF = {np.dtype("<f4"): "FloatStorage", np.dtype("<f8"): "DoubleStorage", np.dtype("<f2"): "HalfStorage",
              np.dtype("<i8"): "LongStorage", np.dtype("<i4"): "IntStorage", np.dtype("u1"): "ByteStorage"}

def _resnet18_shapes() -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("conv1.weight", (64, 3, 7, 7))] + _bn("bn1", 64)
    inplanes = 64
    for layer, planes in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            prefix = f"layer{layer}.{block}"
            first_in = inplanes if block == 0 else planes
            shapes += [(f"{prefix}.conv1.weight", (planes, first_in, 3, 3))] + _bn(f"{prefix}.bn1", planes)
            shapes += [(f"{prefix}.conv2.weight", (planes, planes, 3, 3))] + _bn(f"{prefix}.bn2", planes)
            if block == 0 and (planes != inplanes):
                shapes += [(f"{prefix}.downsample.0.weight", (planes, inplanes, 1, 1))]
                shapes += _bn(f"{prefix}.downsample.1", planes)
        inplanes = planes
    return shapes + [("fc.weight", (1000, 512)), ("fc.bias", (1000,))]


def _bn(prefix: str, n: int):
    return [(f"{prefix}.weight", (n,)), (f"{prefix}.bias", (n,)), (f"{prefix}.running_mean", (n,)),
            (f"{prefix}.running_var", (n,)), (f"{prefix}.num_batches_tracked", ())]


RESNET18 = _resnet18_shapes()  # torchvision's resnet18 state dict: (name, shape) of its 122 tensors


def resnet18_state(seed: int = 0) -> dict[str, np.ndarray]:
    """A ResNet-18 state dict of float32 weights scaled as He initialisation gives them."""
    rng = np.random.default_rng(seed)
    state = collections.OrderedDict()
    for name, shape in RESNET18:
        if name.endswith("num_batches_tracked"):
            state[name] = np.array(100, dtype=np.int64)
        elif name.endswith("running_var") or (name.endswith(".weight") and len(shape) == 1):
            state[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            state[name] = (rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32)
    return state


class _FakeTensor:
    def __init__(self, array: np.ndarray, key: str, torch):
        self.array, self.key, self.torch = np.array(array, order="C"), key, torch

    def __reduce_ex__(self, protocol):
        strides = tuple(s // self.array.itemsize for s in self.array.strides)
        storage = _FakeStorage(self.array, self.key, self.torch)
        return (self.torch._utils._rebuild_tensor_v2,
                (storage, 0, tuple(self.array.shape), strides, False, collections.OrderedDict()))


class _FakeStorage:
    def __init__(self, array, key, torch):
        self.array, self.key, self.torch = array, key, torch


@contextmanager
def _fake_torch():
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # never called: only its name is written
        raise AssertionError("the stand-in is for writing")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for name in set(STORAGE_OF.values()):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield torch
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class _Pickler(pickle.Pickler):
    def __init__(self, file, storages: dict, legacy: bool):
        super().__init__(file, protocol=2)
        self.storages, self.legacy = storages, legacy

    def persistent_id(self, obj):
        if not isinstance(obj, _FakeStorage):
            return None
        self.storages[obj.key] = obj.array
        kind = getattr(obj.torch, STORAGE_OF[obj.array.dtype])
        if self.legacy:
            return ("storage", kind, obj.key, "cpu", obj.array.size, None)
        return ("storage", kind, obj.key, "cpu", obj.array.size)


def _wrap(value, torch, counter):
    if isinstance(value, np.ndarray):
        counter[0] += 1
        return _FakeTensor(value, str(counter[0] - 1), torch)
    if isinstance(value, dict):
        return type(value)((k, _wrap(v, torch, counter)) for k, v in value.items())
    if isinstance(value, list):
        return [_wrap(v, torch, counter) for v in value]
    return value


def torch_zip(obj, path: Path, archive: str = "archive") -> Path:
    """torch.save(obj, path): the zip format (PyTorch >= 1.6); numpy arrays are its tensors."""
    with _fake_torch() as torch:
        storages: dict = {}
        data = io.BytesIO()
        _Pickler(data, storages, legacy=False).dump(_wrap(obj, torch, [0]))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{archive}/data.pkl", data.getvalue())
        zf.writestr(f"{archive}/byteorder", "little")
        for key, array in storages.items():
            zf.writestr(f"{archive}/data/{key}", array.tobytes())
        zf.writestr(f"{archive}/version", "3\n")
    return path


def torch_legacy(obj, path: Path) -> Path:
    """torch.save(obj, path, _use_new_zipfile_serialization=False)."""
    with _fake_torch() as torch:
        storages: dict = {}
        out = io.BytesIO()
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                                       "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(header, out, protocol=2)
        _Pickler(out, storages, legacy=True).dump(_wrap(obj, torch, [0]))
    pickle.dump(list(storages), out, protocol=2)
    for array in storages.values():
        out.write(struct.pack("<Q", array.size) + array.tobytes())
    path.write_bytes(out.getvalue())
    return path


class CanaryPayload:
    """A pickled object that, when unpickled, writes ``canary``: the code a checkpoint may carry."""

    def __init__(self, canary: Path):
        self.canary = str(canary)

    def __reduce__(self):
        return (exec, (f"open({self.canary!r}, 'w').write('unpickled')",))


def torch_zip_with_code(path: Path, canary: Path) -> Path:
    """A torch zip checkpoint whose state dict also holds a __reduce__ payload."""
    state = collections.OrderedDict(resnet18_state())
    state["payload"] = CanaryPayload(canary)
    return torch_zip(state, path)
