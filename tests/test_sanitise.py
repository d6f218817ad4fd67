"""The sanitised release of models (m2d/disclosure/sanitise.py): plain tensors,
floats rounded to N mantissa bits, a pickle's code never run.

The files are the bytes torch.save writes (tests/helpers/checkpoints.py writes
them with numpy: the zip format and the legacy one); the sanitised copy is read
back with the real safetensors package."""
import collections
import hashlib
import io
import json
import pickle
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from m2d.disclosure import sanitise
from tests.helpers import checkpoints

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dataset_image(tmp_path_factory) -> np.ndarray:
    """One image of the testbed's synthetic dataset, made as the testbed makes it."""
    dest = tmp_path_factory.mktemp("clam")
    subprocess.run([sys.executable, str(REPO / "deploy/testbed/make_dataset.py"), str(dest), "--cases", "2"],
                   check=True, capture_output=True)
    png = sorted(dest.rglob("*.png"))[0]
    return np.asarray(Image.open(png).convert("L"), dtype=np.uint8)


def hide(state: dict, payload: bytes) -> dict:
    """Training code's trick (Song et al. 2017): the payload's bytes in the low 8
    mantissa bits of the weights, one byte a weight, tensor after tensor."""
    out, at = collections.OrderedDict(), 0
    for name, array in state.items():
        if array.dtype == np.float32 and at < len(payload):
            raw = array.reshape(-1).view(np.uint32).copy()
            n = min(raw.size, len(payload) - at)
            chunk = np.frombuffer(payload[at:at + n], dtype=np.uint8).astype(np.uint32)
            raw[:n] = (raw[:n] & np.uint32(0xFFFFFF00)) | chunk
            array = raw.view(np.float32).reshape(array.shape)
            at += n
        out[name] = array
    assert at == len(payload), "the model holds the whole payload"
    return out


def low_byte_payload(tensors: dict, names: list[str], length: int) -> np.ndarray:
    """What the attacker reads back: the low 8 bits of each weight, in the same order."""
    found = []
    for name in names:
        array = tensors[name]
        if array.dtype == np.float32:
            found.append((array.reshape(-1).view(np.uint32) & np.uint32(0xFF)).astype(np.uint8))
    return np.concatenate(found)[:length]


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return 0.0  # a constant carries nothing of the other
    return float(np.corrcoef(a, b)[0, 1])


def bit_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.unpackbits(a) == np.unpackbits(b)).mean())


def test_a_dataset_image_in_a_resnet18s_low_mantissa_bits_cannot_be_recovered_from_the_released_copy(
        tmp_path, dataset_image):
    image = dataset_image.reshape(-1)
    state = hide(checkpoints.resnet18_state(), image.tobytes())
    original = checkpoints.torch_zip(state, tmp_path / "model.tar")
    names = list(state)
    # the attack works on what the job wrote: the image comes back exactly
    assert np.array_equal(low_byte_payload(state, names, image.size), image)

    summary = sanitise.sanitise(original, tmp_path / "released.safetensors", mantissa_bits=7)
    released = load_file(str(tmp_path / "released.safetensors"))  # the real safetensors package reads it
    assert set(released) == set(names)
    recovered = low_byte_payload(released, names, image.size)
    # the low 16 bits of every float32 are gone: the attacker reads zeros...
    assert not recovered.any()
    # ...and the best they can do from what is left is chance: the low byte of the
    # mantissa bits kept, and the bits against the image's bits
    kept = np.concatenate([(released[n].reshape(-1).view(np.uint32) >> np.uint32(16)).astype(np.uint8)
                           for n in names if released[n].dtype == np.float32])[:image.size]
    assert abs(correlation(kept, image)) < 0.05
    assert abs(bit_agreement(kept, image) - 0.5) < 0.05
    # what was removed, and what it cost the model
    assert summary["mantissa_bits"] == 7 and summary["format"] == "torch-zip"
    assert summary["fraction_bits_removed"] > 0.49  # 16 of 32 bits of nearly every value
    assert summary["max_rel_change"] <= 2 ** -8 + 1e-12  # round to nearest: half a unit in the last place kept
    assert summary["integer_tensors"] == [n for n in names if n.endswith("num_batches_tracked")]
    assert np.array_equal(released["layer1.0.bn1.num_batches_tracked"], state["layer1.0.bn1.num_batches_tracked"])


def test_floats_are_rounded_to_nearest_not_truncated_and_nans_lose_their_payload():
    values = np.array([1 + 2**-8 + 2**-12, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-7 + 2**-8 + 2**-20),
                       np.inf, -np.inf, 0.0, 3.4028235e38], dtype=np.float32)
    payload_nan = np.array([0x7FC0BEEF], dtype=np.uint32).view(np.float32)
    tensor = sanitise.Tensor("F32", np.concatenate([values, payload_nan]))
    rounded = sanitise.round_mantissa(tensor, 7).array
    # 1 + 2^-8 + 2^-12 is past the halfway point between 1 and 1 + 2^-7: up (truncation would give 1)
    assert rounded[0] == np.float32(1 + 2**-7)
    assert rounded[1] == np.float32(1.0)  # a tie rounds to the even neighbour
    assert rounded[2] == np.float32(1 + 2**-6)  # the other tie: up, to the even neighbour
    assert rounded[3] == np.float32(-(1 + 2**-6))
    assert rounded[4] == np.inf and rounded[5] == -np.inf and rounded[6] == 0
    assert rounded[7] == np.inf  # past bfloat16's largest value, as bfloat16 rounds it
    assert rounded[8:].view(np.uint32)[0] == 0x7FC00000  # one NaN, its payload gone
    assert not (rounded[:4].view(np.uint32) & 0xFFFF).any()


def test_bfloat16_and_float16_tensors_in_a_safetensors_file_are_rounded_in_their_own_dtype(tmp_path):
    from safetensors.numpy import save_file
    half = np.array([1 + 2**-10, 0.333], dtype=np.float16)
    save_file({"h": half, "i": np.arange(5, dtype=np.int32)}, str(tmp_path / "in.safetensors"))
    data = (tmp_path / "in.safetensors").read_bytes()
    bf16 = {"b": sanitise.Tensor("BF16", np.array([0x3F81, 0x7FC1], dtype=np.uint16))}
    (tmp_path / "bf.safetensors").write_bytes(sanitise.write_safetensors(bf16, {}))
    assert sanitise.read_safetensors(data)["h"].array.dtype == np.float16

    summary = sanitise.sanitise(tmp_path / "in.safetensors", tmp_path / "out.safetensors", mantissa_bits=7)
    out = load_file(str(tmp_path / "out.safetensors"))
    assert out["h"].dtype == np.float16 and out["h"][0] == np.float16(1.0)
    assert np.array_equal(out["i"], np.arange(5))
    assert summary["bits_removed"] == 2 * 3

    sanitise.sanitise(tmp_path / "bf.safetensors", tmp_path / "bf-out.safetensors", mantissa_bits=3)
    again = sanitise.read_safetensors((tmp_path / "bf-out.safetensors").read_bytes())["b"].array
    assert list(again) == [0x3F80, 0x7FC0]  # 1 + 2^-7 at 3 bits is 1; the NaN canonical


def test_a_legacy_torch_checkpoint_of_a_training_checkpoint_is_read_as_its_tensors(tmp_path):
    state = checkpoints.resnet18_state(seed=3)
    checkpoint = {"epoch": 2, "arch": "resnet18", "state_dict": state,
                  "optimizer": {"state": {0: {"momentum_buffer": np.ones((4, 4), np.float32)}}}}
    legacy = checkpoints.torch_legacy(checkpoint, tmp_path / "legacy.pth")
    zipped = checkpoints.torch_zip(checkpoint, tmp_path / "zipped.pt")
    for path in (legacy, zipped):
        loaded = sanitise.load(path)
        assert np.array_equal(loaded.tensors["state_dict.fc.weight"].array, state["fc.weight"])
        assert loaded.tensors["optimizer.state.0.momentum_buffer"].array.shape == (4, 4)
        assert sorted(loaded.left_out) == ["arch", "epoch"]  # plain tensors only
    assert sanitise.load(legacy).source_format == "torch-legacy"


def test_a_checkpoint_with_pickled_code_is_refused_and_its_code_never_runs(tmp_path):
    canary = tmp_path / "canary"
    # the payload is real: a plain unpickling runs it
    pickle.loads(pickle.dumps(checkpoints.CanaryPayload(canary)))
    assert canary.exists()
    canary.unlink()

    hostile = checkpoints.torch_zip_with_code(tmp_path / "model.pt", canary)
    with pytest.raises(sanitise.Unsanitisable, match="exec, which is not a tensor"):
        sanitise.sanitise(hostile, tmp_path / "out.safetensors")
    run = subprocess.run([sys.executable, "-m", "m2d.disclosure.sanitise", str(hostile),
                          str(tmp_path / "out.safetensors"), "--summary", str(tmp_path / "summary.json")],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 3, run.stderr
    assert "cannot be re-saved as plain tensors" in run.stderr
    assert '"status": "review"' in (tmp_path / "summary.json").read_text()
    assert not canary.exists()
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("why, content", [
    ("random bytes", bytes(range(256)) * 10),
    ("a pickle of a plain object", pickle.dumps(collections.Counter(a=1), protocol=2)),
    ("a zip that is not a checkpoint", None),
])
def test_what_is_not_a_model_file_is_unsanitisable(tmp_path, why, content):
    path = tmp_path / "file"
    if content is None:
        import zipfile
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("notes.txt", "hello")
    else:
        path.write_bytes(content)
    with pytest.raises(sanitise.Unsanitisable):
        sanitise.sanitise(path, tmp_path / "out")


def test_a_tensor_view_past_its_storage_is_refused_before_it_is_read(tmp_path):
    """as_strided reads whatever memory it is pointed at: the view is checked first."""
    path = checkpoints.torch_zip({"w": np.zeros(4, np.float32)}, tmp_path / "m.pt")
    import zipfile
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    # the tensor claims 4 x 1000 elements of its 4-element storage
    members["archive/data.pkl"] = members["archive/data.pkl"].replace(b"K\x04\x85", b"M\xa0\x0f\x85")
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(sanitise.Unsanitisable, match="past the end of its storage"):
        sanitise.load(path)


# --- the rounded model in its own format (what predict loads for the held-out metric) -----


def _torch_tensors(value, prefix: str = "") -> dict:
    """A loaded checkpoint's tensors by the copy's flattened names."""
    import torch
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    found = {}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else []
    for key, child in items:
        found.update(_torch_tensors(child, f"{prefix}.{key}" if prefix else str(key)))
    return found


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy", "safetensors"])
def test_the_rounded_model_in_its_own_format_loads_as_before_and_holds_the_released_copys_numbers(tmp_path, fmt):
    """torch.load (weights_only, and mmap for the zip) reads it as it read the
    original: the pickle, its strings and shared storages kept; its tensors
    are the sanitised copy's, value for value, dtype for dtype."""
    import torch
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file

    torch.manual_seed(1)
    weights = torch.randn(6, 5) * 3
    state = {"conv.weight": torch.randn(4, 3, 3, 3), "bn.num_batches_tracked": torch.tensor(7),
             "half": torch.randn(5).half(), "brain": torch.randn(5).bfloat16(), "all": weights,
             "rows": weights[2:4]}  # a view sharing the storage of "all"
    source = tmp_path / "model.tar"
    if fmt == "safetensors":
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(source))
    else:
        torch.save({"classes": ["benign", "malignant"], "input_size": [64, 80], "state_dict": state}, source,
                   _use_new_zipfile_serialization=fmt == "torch-zip")
    rounded = tmp_path / "view" / "model.tar"
    rounded.parent.mkdir()
    assert sanitise.write_rounded(source, rounded, 7) == fmt
    sanitise.sanitise(source, tmp_path / "copy.safetensors", 7)
    copy = load_torch(str(tmp_path / "copy.safetensors"))
    if fmt == "safetensors":
        loaded = load_torch(str(rounded))
    else:
        saved = torch.load(rounded, weights_only=True)
        assert saved["classes"] == ["benign", "malignant"] and saved["input_size"] == [64, 80]
        loaded = _torch_tensors(saved)
        rows = saved["state_dict"]["rows"]
        assert rows.untyped_storage().data_ptr() == saved["state_dict"]["all"].untyped_storage().data_ptr()
        if fmt == "torch-zip":
            assert torch.equal(_torch_tensors(torch.load(rounded, weights_only=True, mmap=True))["state_dict.all"],
                               loaded["state_dict.all"])
    assert sorted(loaded) == sorted(copy)
    for name, tensor in copy.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    original = torch.load(source, weights_only=True)["state_dict"]["all"] if fmt != "safetensors" else weights
    changed = loaded["state_dict.all" if fmt != "safetensors" else "all"]
    assert not torch.equal(changed, original) and torch.allclose(changed, original, rtol=2**-7)


def test_the_rounded_model_is_refused_where_the_copy_is_and_nothing_is_left(tmp_path):
    canary = tmp_path / "canary"
    hostile = checkpoints.torch_zip_with_code(tmp_path / "model.pt", canary)
    with pytest.raises(sanitise.Unsanitisable, match="exec, which is not a tensor"):
        sanitise.write_rounded(hostile, tmp_path / "rounded.pt")
    assert not canary.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


# --- in the report job: m2d.disclosure report --sanitise-bits N ---------------------------


@pytest.fixture(scope="module")
def index_dir(dataset_image, tmp_path_factory) -> Path:
    """The fingerprint index of the same synthetic dataset (the report job's)."""
    dataset = tmp_path_factory.mktemp("clam-for-index")
    subprocess.run([sys.executable, str(REPO / "deploy/testbed/make_dataset.py"), str(dataset), "--cases", "2"],
                   check=True, capture_output=True)
    out = tmp_path_factory.mktemp("index") / "idx"
    subprocess.run([sys.executable, "-m", "m2d.disclosure", "index", "--dataset", str(dataset), "--out", str(out)],
                   check=True, capture_output=True, cwd=REPO)
    return out


# a ResNet-18's stem and head alone (2 MB, not 45): enough weights for a dataset image
RESNET18_ENDS = [(name, shape) for name, shape in checkpoints.RESNET18 if name.startswith(("conv1.", "bn1.", "fc."))]


def torch_resnet18(image: bytes, layers=checkpoints.RESNET18):
    """A ResNet-18-shaped state dict made with torch itself (torchvision's names and
    shapes; ``layers`` of them), the image's bytes in the low 8 mantissa bits of its
    float32 weights."""
    import torch
    torch.manual_seed(0)
    state = collections.OrderedDict()
    for name, shape in layers:
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(100, dtype=torch.int64)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            state[name] = torch.randn(shape, dtype=torch.float32) * (2 / fan_in) ** 0.5
    hidden = hide({k: v.numpy() for k, v in state.items()}, image)
    return collections.OrderedDict((k, torch.from_numpy(np.ascontiguousarray(v))) for k, v in hidden.items())


class SystemCall:
    """A checkpoint's payload: unpickling it calls os.system."""

    def __init__(self, canary: Path):
        self.canary = canary

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.canary}",))


def run_report(index_dir: Path, export: Path, report_dir: Path, *extra: str) -> dict:
    run = subprocess.run([sys.executable, "-m", "m2d.disclosure", "report", "--index", str(index_dir),
                          "--export", str(export), "--out", str(report_dir / "report.json"), *extra],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode in (0, 3), run.stderr
    return {f["path"]: f for f in json.loads((report_dir / "report.json").read_text())["files"]}


def test_the_report_job_leaves_a_resnet18_with_a_dataset_image_in_its_low_bits_only_as_a_sanitised_copy(
        tmp_path, dataset_image, index_dir):
    import torch
    image = dataset_image.reshape(-1)
    # its stem and head, as torch writes them (the whole network's bits: the test above)
    state = torch_resnet18(image.tobytes(), RESNET18_ENDS)
    export, report_dir = tmp_path / "export", tmp_path / "report"
    export.mkdir()
    report_dir.mkdir()
    torch.save(state, export / "model.pt")
    torch.save(state, export / "legacy.bin", _use_new_zipfile_serialization=False)  # by content, not suffix
    names = list(state)
    # what the job wrote gives the image back exactly, as torch loads it
    written = torch.load(export / "model.pt", weights_only=True)
    assert np.array_equal(low_byte_payload({k: v.numpy() for k, v in written.items()}, names, image.size), image)

    files = run_report(index_dir, export, report_dir, "--sanitise-bits", "7")
    for path in ("model.pt", "legacy.bin"):
        entry = files[path]
        check = next(c for c in entry["checks"] if c["name"] == "sanitise")
        assert check["status"] == "pass" and "rounded to 7 mantissa bits" in check["reason"], check
        copy = entry["sanitised"]
        assert copy["name"] == f"sanitised/{entry['sha256']}.safetensors" and copy["mantissa_bits"] == 7
        data = (report_dir / copy["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == copy["sha256"] and len(data) == copy["size"]
        # plain tensors that safetensors loads: the same names, shapes and dtypes as torch's state dict
        released = load_file(str(report_dir / copy["name"]))
        assert {k: (v.shape, v.dtype) for k, v in released.items()} == {
            k: (tuple(v.shape), v.numpy().dtype) for k, v in state.items()}
        # the attacker's extraction from the copy: not the image
        recovered = low_byte_payload(released, names, image.size)
        assert not np.array_equal(recovered, image) and not recovered.any()
        kept = np.concatenate([(released[n].reshape(-1).view(np.uint32) >> np.uint32(16)).astype(np.uint8)
                               for n in names if released[n].dtype == np.float32])[:image.size]
        assert abs(correlation(kept, image)) < 0.05 and abs(bit_agreement(kept, image) - 0.5) < 0.05
        assert np.allclose(released["fc.weight"], state["fc.weight"].numpy(), rtol=2**-8, atol=0)
        # the largest change of a weight, per float tensor: in the entry, the largest five in the reason
        changes = copy["tensor_changes"]
        assert set(changes) == {n for n in names if not n.endswith("num_batches_tracked")}
        for name, (absolute, relative) in changes.items():
            delta = np.abs(released[name].astype(np.float64) - state[name].numpy().astype(np.float64))
            assert absolute == pytest.approx(float(delta.max())) and 0 < relative <= 2 ** -8 + 1e-12
        top = max(changes, key=lambda n: changes[n][0])
        assert f"largest change of a weight: {top} " in check["reason"] and "other tensors changed less" in check["reason"]


def test_a_checkpoint_with_a_pickled_os_system_is_reviewed_without_a_copy_and_never_run(
        tmp_path, index_dir):
    import torch
    canary = tmp_path / "canary"
    export, report_dir = tmp_path / "export", tmp_path / "report"
    export.mkdir()
    report_dir.mkdir()
    state = collections.OrderedDict((name, torch.zeros(shape)) for name, shape in checkpoints.RESNET18[:3])
    state["hook"] = SystemCall(canary)
    torch.save(state, export / "weights.dat")
    with zipfile.ZipFile(export / "bundle.zip", "w") as bundle:  # a model inside an archive: never re-saved
        bundle.write(export / "weights.dat", "inner.pt")
    canary.unlink(missing_ok=True)

    files = run_report(index_dir, export, report_dir, "--sanitise-bits", "7")
    entry = files["weights.dat"]
    assert entry["type"] == "pytorch-zip"
    check = next(c for c in entry["checks"] if c["name"] == "sanitise")
    assert check["status"] == "review" and "cannot be re-saved as plain tensors" in check["reason"], check
    assert "posix.system" in check["reason"] or "os.system" in check["reason"], check["reason"]
    assert entry["status"] != "pass" and "sanitised" not in entry
    assert not (report_dir / "sanitised" / f"{entry['sha256']}.safetensors").exists()
    assert not canary.exists()
    # the same checkpoint inside a zip: the archive cannot leave as a copy either, and says which member
    bundle = files["bundle.zip"]
    (check,) = [c for c in bundle["checks"] if c["name"] == "sanitise"]
    assert check["status"] == "review" and "member 'inner.pt'" in check["reason"], check
    assert "system" in check["reason"] and "the archive would leave as it is" in check["reason"]
    assert "sanitised" not in bundle and bundle["model_members"] == 1
    assert not list((report_dir / "sanitised").glob(f"{bundle['sha256']}.*"))


def test_without_sanitise_bits_the_report_makes_no_copy(tmp_path, index_dir):
    export, report_dir = tmp_path / "export", tmp_path / "report"
    export.mkdir()
    report_dir.mkdir()
    checkpoints.torch_zip(checkpoints.resnet18_state(), export / "model.pt")
    entry = run_report(index_dir, export, report_dir)["model.pt"]
    assert "sanitised" not in entry and not any(c["name"] == "sanitise" for c in entry["checks"])
    assert not (report_dir / "sanitised").exists()


# --- a model inside an archive (m2d/disclosure/archives.py) -------------------------------


def _archive(kind: str, path: Path, members: dict[str, bytes]) -> Path:
    """``members`` in a zip, a tar or a gzip'd tar, in that order."""
    if kind == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, body in members.items():
                archive.writestr(name, body)
        return path
    with tarfile.open(path, "w:gz" if kind == "tar.gz" else "w") as archive:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            archive.addfile(info, io.BytesIO(body))
    return path


def _members(data: bytes) -> dict[str, bytes]:
    """An archive's members, in order (zip, tar, or a tar in gzip)."""
    if data[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return {name: archive.read(name) for name in archive.namelist()}
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}


@pytest.mark.parametrize("kind, suffix", [("zip", "zip"), ("tar", "tar"), ("tar.gz", "gz")])
def test_a_model_inside_an_archive_leaves_only_in_a_copy_whose_member_lost_the_payload(
        tmp_path, dataset_image, index_dir, kind, suffix):
    import torch
    image = dataset_image.reshape(-1)
    state = torch_resnet18(image.tobytes(), RESNET18_ENDS)  # the whole of it: a minute in gzip
    names = list(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    legacy = io.BytesIO()
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    inner = tmp_path / "inner.zip"  # an archive inside the archive, holding a model too
    _archive("zip", inner, {"legacy.bin": legacy.getvalue(), "notes.txt": b"epoch 2"})
    notes = tmp_path / "notes.zip"  # and one holding none: copied as it is
    _archive("zip", notes, {"notes.txt": b"nothing here"})
    members = {"README.txt": b"two epochs", "weights/model.pt": buffer.getvalue(), "inner.zip": inner.read_bytes(),
               "notes.zip": notes.read_bytes()}
    export, report_dir = tmp_path / "export", tmp_path / "report"
    export.mkdir()
    report_dir.mkdir()
    _archive(kind, export / f"models.{kind}", members)
    _archive(kind, export / f"plain.{kind}", {"README.txt": b"no model in here"})

    files = run_report(index_dir, export, report_dir, "--sanitise-bits", "7")
    entry = files[f"models.{kind}"]
    (check,) = [c for c in entry["checks"] if c["name"] == "sanitise"]
    assert check["status"] == "pass", check
    assert "2 model member(s)" in check["reason"] and "member 'weights/model.pt'" in check["reason"]
    assert "member 'legacy.bin' of member 'inner.zip'" in check["reason"]
    copy = entry["sanitised"]
    assert entry["model_members"] == 2 and copy["name"] == f"sanitised/{entry['sha256']}.{suffix}"
    data = (report_dir / copy["name"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == copy["sha256"] and len(data) == copy["size"]
    released = _members(data)
    # the same members in the same order; what is not a model, byte for byte
    assert list(released) == list(members)
    assert released["README.txt"] == members["README.txt"] and released["notes.zip"] == members["notes.zip"]
    copies = {"weights/model.pt": load_safetensors(released["weights/model.pt"]),
              "inner.zip::legacy.bin": load_safetensors(_members(released["inner.zip"])["legacy.bin"])}
    assert _members(released["inner.zip"])["notes.txt"] == b"epoch 2"
    for member, tensors in copies.items():
        assert {k: (v.shape, v.dtype) for k, v in tensors.items()} == {
            k: (tuple(v.shape), v.numpy().dtype) for k, v in state.items()}
        # the attacker's extraction from the copy's member: not the image
        recovered = low_byte_payload(tensors, names, image.size)
        assert not recovered.any()
        kept = np.concatenate([(tensors[n].reshape(-1).view(np.uint32) >> np.uint32(16)).astype(np.uint8)
                               for n in names if tensors[n].dtype == np.float32])[:image.size]
        assert abs(correlation(kept, image)) < 0.05 and abs(bit_agreement(kept, image) - 0.5) < 0.05
        assert np.allclose(tensors["fc.weight"], state["fc.weight"].numpy(), rtol=2**-8, atol=0)
        key = f"(the gzip stream)::{member}" if kind == "tar.gz" else member  # the member's path in the copy
        assert copy["members"][key]["tensors"] == len(names)
        assert f"{key}::fc.weight" in copy["sketch"] and f"{key}::fc.weight" in copy["tensor_changes"]
    assert copy["tensors"] == 2 * len(names) and copy["max_rel_change"] <= 2 ** -8 + 1e-12
    # an archive without a model is no model: it leaves as written, with no sanitise check
    plain = files[f"plain.{kind}"]
    assert "sanitised" not in plain and "model_members" not in plain
    assert not any(c["name"] == "sanitise" for c in plain["checks"])


def load_safetensors(data: bytes) -> dict:
    from safetensors.numpy import load
    return load(data)


def test_an_archive_is_rewritten_within_its_bounds_or_reviewed_naming_where(tmp_path):
    from m2d.disclosure import archives
    from m2d.disclosure.limits import Limits
    model = checkpoints.torch_zip({"w": np.ones(8, np.float32)}, tmp_path / "m.pt").read_bytes()
    many = _archive("zip", tmp_path / "many.zip", {f"m{i}.pt": model for i in range(5)}).read_bytes()
    with pytest.raises(archives.MemberUnsanitisable, match="more than 4 members"):
        archives.sanitise_archive(many, tmp_path / "copy.zip", 7, Limits(max_members=4))
    with pytest.raises(archives.MemberUnsanitisable, match="unpacks to more than 100 bytes") as big:
        archives.sanitise_archive(many, tmp_path / "copy.zip", 7, Limits(max_member_bytes=100))
    assert big.value.member == ["m0.pt"]
    with pytest.raises(archives.MemberUnsanitisable, match="archive unpacks to more than"):
        archives.sanitise_archive(many, tmp_path / "copy.zip", 7, Limits(max_unpacked_bytes=3 * len(model)))
    nested = many
    for depth in range(3):
        nested = _archive("zip", tmp_path / f"n{depth}.zip", {f"level{depth}.zip": nested}).read_bytes()
    with pytest.raises(archives.MemberUnsanitisable, match="nested deeper than 3") as deep:
        archives.sanitise_archive(nested, tmp_path / "copy.zip", 7, Limits(max_nesting=3))
    assert deep.value.member == ["level2.zip", "level1.zip", "level0.zip"]
    assert archives.sanitise_archive(nested, tmp_path / "deep.zip", 7)["tensors"] == 5  # within the default 4
    # an ONNX or Keras model member cannot be re-saved; an archive with no model gets no copy
    onnx = _archive("zip", tmp_path / "onnx.zip", {"m.onnx": b"\x08\x07\x12\x07pytorch" + bytes(64)}).read_bytes()
    with pytest.raises(archives.MemberUnsanitisable, match="onnx model"):
        archives.sanitise_archive(onnx, tmp_path / "copy.zip", 7)
    text = _archive("zip", tmp_path / "text.zip", {"a.txt": b"hello"}).read_bytes()
    with pytest.raises(archives.MemberUnsanitisable, match="no PyTorch or safetensors model"):
        archives.sanitise_archive(text, tmp_path / "copy.zip", 7)
    assert not list(tmp_path.glob("copy.zip*"))  # nothing is left behind by a refusal


def test_the_rounded_view_holds_an_archive_with_its_model_rounded_in_its_own_format(tmp_path):
    """What predict loads for the sanitised-metric check: the member torch.load reads,
    with the copy's numbers."""
    import torch

    from m2d.disclosure import archives, rounded
    state = {k: torch.from_numpy(v) for k, v in checkpoints.resnet18_state().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    export, view = tmp_path / "export", tmp_path / "view"
    export.mkdir()
    view.mkdir()
    _archive("tar", export / "models.tar", {"model.pt": buffer.getvalue(), "README.txt": b"hi"})
    _archive("zip", export / "notes.zip", {"a.txt": b"no model"})
    manifest = rounded.make_view(export, view, "/mnt/original", 7)
    assert manifest["rounded"] == {"models.tar": hashlib.sha256((export / "models.tar").read_bytes()).hexdigest()}
    assert (view / "notes.zip").readlink() == Path("/mnt/original/notes.zip")
    members = _members((view / "models.tar").read_bytes())
    assert members["README.txt"] == b"hi"
    loaded = torch.load(io.BytesIO(members["model.pt"]), weights_only=True)
    archives.sanitise_archive((export / "models.tar").read_bytes(), tmp_path / "copy.tar", 7)
    copy = load_safetensors(_members((tmp_path / "copy.tar").read_bytes())["model.pt"])
    for name, tensor in loaded.items():
        assert np.array_equal(tensor.numpy(), copy[name]), name
    assert not np.array_equal(loaded["fc.weight"].numpy(), state["fc.weight"].numpy())
