"""Generate a synthetic CLaM-like mammography sample.

Same layout and metadata schema as the published CLaM-sample (see the
platform's dataset notes): two semicolon-separated CSV files with ``NULL`` for
missing values, and per case ``CLaM-sample/S<n>-A<n>/<VIEW>/1.png`` (8-bit
grey) plus ``1.npy`` (uint16, 12-bit values 0-4095) holding the same image.
Images are small.  Malignant cases carry a bright blob ("lesion") so that a
toy classifier has something to learn.  The output depends only on
``cases`` and ``seed``.

    python make_dataset.py [DEST] [--cases 10] [--seed 0]

DEST defaults to $M2D_TESTBED_DIR/clam (else /opt/testbed/clam).  An existing,
complete dataset at DEST is left as it is.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE_DIR = "CLaM-sample"
CASE_CSV = "clam-details-case-extrainfo.csv"
IMAGE_CSV = "clam-details-image.csv"
CASE_COLUMNS = [
    "Patient_Id", "CaseName", "CasePath", "Study_Description", "Views_4", "Views",
    "BIRADS_combined_casebased", "BIRADS_combined_pathwaybased",
    "BreastDensity_standardized", "Age", "Groundtruth", "Split",
]
IMAGE_COLUMNS = [
    "Patient_Id", "CaseName", "CasePath", "ImagePath", "Study_Description", "Views",
    "CaseLabel", "Split",
]
NULL = "NULL"
STANDARD_VIEWS = ["LCC", "LMLO", "RCC", "RMLO"]
EXTRA_VIEWS = ["LXCCL", "RXCCL", "LLM", "RLM", "LML", "RML"]
STUDY_DESCRIPTIONS = [
    "Mammografie mammapoli beiderzijds", "Mammografie beiderzijds", "Copie SVOB",
]
BIRADS_MALIGNANT = ["4", "4a", "4b", "4c", "5", "6"]
BIRADS_BENIGN = ["0", "1", "2", "3", "4"]
DENSITIES = ["A", "B", "C", "D"]
# height x width; real crops are portrait and millions of pixels
IMAGE_SHAPE = (64, 48)


def _is_complete(dest: Path) -> bool:
    """True when both CSVs exist and every image they list is on disk."""
    image_csv = dest / IMAGE_CSV
    if not (dest / CASE_CSV).is_file() or not image_csv.is_file():
        return False
    with open(image_csv, newline="") as f:
        for row in csv.DictReader(f, delimiter=";"):
            png = dest / row["ImagePath"]
            if not png.is_file() or not png.with_suffix(".npy").is_file():
                return False
    return True


def _labels_and_splits(rng: np.random.Generator, cases: int) -> tuple[list[str], list[str]]:
    """Half malignant (rounded up); about a fifth of the cases, at least one,
    go to test, alternating between the classes so test has both if it can."""
    labels = ["malignant"] * ((cases + 1) // 2) + ["benign"] * (cases // 2)
    labels = [labels[i] for i in rng.permutation(cases)]
    n_test = max(1, round(cases * 0.2)) if cases > 1 else 0
    by_class = {
        label: [i for i in rng.permutation(cases) if labels[i] == label]
        for label in ("malignant", "benign")
    }
    test: set[int] = set()
    order = ["benign", "malignant"]
    while len(test) < n_test:
        for label in order:
            if len(test) < n_test and by_class[label]:
                test.add(int(by_class[label].pop()))
    splits = ["test" if i in test else "train" for i in range(cases)]
    return labels, splits


def _image(rng: np.random.Generator, malignant: bool) -> np.ndarray:
    """A 12-bit synthetic 'breast': a bright half-ellipse against the chest
    wall, fading outwards, with noise; malignant ones get a dense blob."""
    h, w = IMAGE_SHAPE
    y, x = np.mgrid[0:h, 0:w]
    cy, ry, rx = h / 2, h * rng.uniform(0.38, 0.48), w * rng.uniform(0.7, 0.95)
    r = np.sqrt(((y - cy) / ry) ** 2 + (x / rx) ** 2)
    tissue = np.clip(1.0 - r, 0.0, 1.0) ** 0.5 * rng.uniform(1800, 2600)
    img = tissue + rng.normal(0, 120, size=(h, w)) * (r < 1)
    if malignant:
        ly, lx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.15, 0.5) * w
        size = rng.uniform(2.5, 5.0)
        img += 1500 * np.exp(-(((y - ly) ** 2 + (x - lx) ** 2) / (2 * size**2)))
    return np.clip(np.rint(img), 0, 4095).astype(np.uint16)


def _write_image(folder: Path, pixels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "1.npy", pixels)
    Image.fromarray((pixels >> 4).astype(np.uint8), mode="L").save(folder / "1.png")


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, delimiter=";", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _generate_into(root: Path, cases: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels, splits = _labels_and_splits(rng, cases)
    case_rows, image_rows = [], []
    for n in range(1, cases + 1):
        label, split = labels[n - 1], splits[n - 1]
        malignant = label == "malignant"
        patient, case = f"P{n}", f"S{n}-A{n}"
        case_path = f"{SAMPLE_DIR}/{case}"
        study = STUDY_DESCRIPTIONS[rng.choice(len(STUDY_DESCRIPTIONS), p=[0.6, 0.3, 0.1])]
        extra = [v for v in EXTRA_VIEWS if rng.random() < 0.12]
        views = sorted(STANDARD_VIEWS + extra)
        birads = BIRADS_MALIGNANT if malignant else BIRADS_BENIGN
        pathway = str(rng.choice(birads))
        casebased = NULL if rng.random() < 0.1 else str(rng.choice(birads))
        density = NULL if rng.random() < 0.25 else str(rng.choice(DENSITIES))
        case_rows.append({
            "Patient_Id": patient, "CaseName": case, "CasePath": case_path,
            "Study_Description": study,
            "Views_4": "+".join(v for v in views if v in STANDARD_VIEWS),
            "Views": "+".join(views),
            "BIRADS_combined_casebased": casebased,
            "BIRADS_combined_pathwaybased": pathway,
            "BreastDensity_standardized": density,
            "Age": repr(float(rng.uniform(35.0, 90.0))),
            "Groundtruth": label, "Split": split,
        })
        # the published file lists a case's images in no particular order
        for i in rng.permutation(len(views)):
            view = views[i]
            _write_image(root / case_path / view, _image(rng, malignant))
            image_rows.append({
                "Patient_Id": patient, "CaseName": case, "CasePath": case_path,
                "ImagePath": f"{case_path}/{view}/1.png", "Study_Description": study,
                "Views": view, "CaseLabel": label, "Split": split,
            })
    _write_csv(root / CASE_CSV, CASE_COLUMNS, case_rows)
    _write_csv(root / IMAGE_CSV, IMAGE_COLUMNS, image_rows)


def generate(dest: str | os.PathLike, cases: int = 10, seed: int = 0) -> bool:
    """Write the dataset to ``dest``; return False if a complete one was
    already there (it is then left untouched).

    It is built in a temporary folder beside ``dest`` and renamed into place,
    so ``dest`` never holds half a dataset.  An existing ``dest`` must be
    complete or empty.
    """
    if cases < 1:
        raise ValueError("cases must be at least 1")
    dest = Path(dest)
    if _is_complete(dest):
        return False
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} exists, is not empty and is not a complete dataset")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        _generate_into(tmp, cases, seed)
        tmp.chmod(0o755)
        if dest.exists():
            dest.rmdir()
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def main(argv: list[str] | None = None) -> int:
    default_dest = Path(os.environ.get("M2D_TESTBED_DIR", "/opt/testbed")) / "clam"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", nargs="?", type=Path, default=default_dest)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if generate(args.dest, args.cases, args.seed):
        print(f"make_dataset: wrote {args.cases} cases (seed {args.seed}) to {args.dest}")
    else:
        print(f"make_dataset: {args.dest} already holds a complete dataset; left as it is")
    return 0


if __name__ == "__main__":
    sys.exit(main())
