"""Exports made from a CLaM-layout dataset for the disclosure checker's proofs and bench:
what must fail (dataset content, near-copies, identifiers, row-level tables, pickled code)
and what must not (a ResNet-18 state dict, aggregate metrics, a confusion matrix)."""
from __future__ import annotations

import csv
import io
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

CASE_CSV, IMAGE_CSV = "clam-details-case-extrainfo.csv", "clam-details-image.csv"
REPO = Path(__file__).resolve().parents[2]


def synthetic_dataset(dest: Path, cases: int = 10) -> Path:
    """A synthetic CLaM of ``cases`` cases at ``dest`` (deploy/testbed/make_dataset.py)."""
    subprocess.run([sys.executable, str(REPO / "deploy/testbed/make_dataset.py"), str(dest), "--cases", str(cases)],
                   check=True, capture_output=True)
    return dest


def fingerprint_index(dataset: Path, out: Path) -> Path:
    """The checker's fingerprint index of ``dataset`` at ``out``."""
    subprocess.run([sys.executable, "-m", "m2d.disclosure", "index", "--dataset", str(dataset), "--out", str(out)],
                   check=True, capture_output=True, cwd=REPO)
    return out


def rows(dataset: Path, name: str = IMAGE_CSV) -> list[dict[str, str]]:
    with open(dataset / name, newline="") as f:
        return list(csv.DictReader(f, delimiter=";"))


def an_image(dataset: Path, n: int = 0) -> tuple[Path, Path]:
    """The PNG and NPY of the dataset's n-th image."""
    png = dataset / rows(dataset)[n]["ImagePath"]
    return png, png.with_suffix(".npy")


def resnet18_state_dict(classes: int = 2, seed: int = 0) -> dict:
    """torchvision's resnet18 state dict keys and shapes, random weights (no torchvision here)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
            for i, (cin, cout, stride) in enumerate(widths, start=1):
                setattr(self, f"layer{i}", nn.Sequential(Block(cin, cout, stride), Block(cout, cout, 1)))
            self.fc = nn.Linear(512, classes)

    return ResNet18().state_dict()


def save_clam_model(path: Path, state_dict: dict | None = None) -> None:
    """As m2d/samples/clam/main.py saves its model.tar."""
    import torch
    torch.save({"model": "resnet18", "classes": ["benign", "malignant"], "input_size": [128, 160],
                "state_dict": state_dict or resnet18_state_dict()}, path)


# --- must fail -------------------------------------------------------------------------


def npy_in_checkpoint(dataset: Path, path: Path) -> None:
    """A dataset image's NPY bytes as a tensor of a torch checkpoint (stored in its zip)."""
    import torch
    npy = an_image(dataset)[1].read_bytes()
    sd = resnet18_state_dict()
    sd["bn1.extra_state"] = torch.frombuffer(bytearray(npy), dtype=torch.uint8)
    save_clam_model(path, sd)


def npy_deflated_into_checkpoint(dataset: Path, path: Path) -> None:
    """A checkpoint with the NPY added as a deflated member (compressed: not visible raw)."""
    save_clam_model(path)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("model/extra/image.npy", an_image(dataset)[1].read_bytes())


def image_as_float_tensor(dataset: Path, path: Path) -> None:
    """The image's array converted to float32 and scaled: no byte of the NPY survives."""
    import torch
    sd = resnet18_state_dict()
    sd["fc.prior"] = torch.from_numpy(np.load(an_image(dataset)[1]).astype(np.float32) / 4095.0)
    save_clam_model(path, sd)


def resized_png(dataset: Path, path: Path, fmt: str = "PNG") -> None:
    """A dataset PNG resized by one pixel and re-encoded."""
    with Image.open(an_image(dataset)[0]) as im:
        im.resize((im.width + 1, im.height + 1), Image.BILINEAR).save(path, format=fmt)


def ids_in_results_csv(dataset: Path, path: Path) -> None:
    cases = rows(dataset, CASE_CSV)
    rng = np.random.default_rng(1)
    path.write_text("patient_id,probability\n" + "".join(f"{c['Patient_Id']},{rng.random():.3f}\n" for c in cases[:3]))


def per_case_predictions(dataset: Path, path: Path) -> None:
    """One row per training case, no identifier in it: index, label, predicted probability."""
    train = [c for c in rows(dataset, CASE_CSV) if c["Split"] == "train"]
    rng = np.random.default_rng(2)
    path.write_text("index,label,probability\n" + "".join(
        f"{i},{int(c['Groundtruth'] == 'malignant')},{rng.random():.4f}\n" for i, c in enumerate(train)))


class _Call:
    """Pickles as a call of ``func(*args)``: what a hostile checkpoint holds."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def pickle_with_code(path: Path, marker: Path) -> None:
    """A legacy-looking pickle that would run a shell command when loaded."""
    import os
    path.write_bytes(pickle.dumps({"state_dict": {}, "x": _Call(os.system, (f"touch {marker}",))}, protocol=2))


# --- must pass or be reviewed --------------------------------------------------------------


def metrics_xlsx(path: Path) -> None:
    import openpyxl
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "test metrics"
    ws.append(["metric", "value"])
    for name, value in (("auc", 0.81), ("f1", 0.72), ("accuracy", 0.75), ("kappa", 0.41)):
        ws.append([name, value])
    wb.save(path)


def confusion_matrix_csv(path: Path) -> None:
    path.write_text(",predicted benign,predicted malignant\nbenign,52,11\nmalignant,12,47\n")


def safetensors_file(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save
    path.write_bytes(save(tensors))


def npz_with(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    path.write_bytes(buf.getvalue())
