"""A synthetic CLaM sample: the real dataset's layout and CSV columns, made-up images.

The layout and the two CSV files' columns are those of the published 10-case
CLaM-sample (docs/dataset.md describes them)::

    DEST/clam-details-case-extrainfo.csv     one row per case
    DEST/clam-details-image.csv              one row per image
    DEST/CLaM-sample/S<n>-A<n>/<VIEW>/1.png  8-bit grey
    DEST/CLaM-sample/S<n>-A<n>/<VIEW>/1.npy  the same image, uint16 with 12-bit values

The two encodings relate exactly: ``png == npy >> 4``.  Every image of a
malignant case carries a bright round blob (a "lesion"), so a classifier has
something to learn.  The defaults give the real sample's shape: 10 cases,
46 images, 5 malignant and 5 benign, 8 train and 2 test.

The output depends only on ``cases``, ``size`` and ``seed`` (and on the numpy
and Pillow versions, which fix the random streams and the PNG encoder): the
same arguments give the same bytes.

This module needs numpy and Pillow; nothing else in the m2d client does.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE_FOLDER = "CLaM-sample"
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
# Extra views seen in CLaM, with how often each turns up among the extras
# (the cranio-caudal exaggerated views are the common ones).
EXTRA_VIEWS = {"LXCCL": 0.3, "RXCCL": 0.3, "LLM": 0.1, "RLM": 0.1, "LML": 0.1, "RML": 0.1}
# The real sample has 6 extra images in 10 cases.
EXTRA_VIEWS_PER_CASE = 0.6
TEST_FRACTION = 0.2
STUDY_DESCRIPTIONS = {
    "Mammografie mammapoli beiderzijds": 0.6, "Mammografie beiderzijds": 0.3, "Copie SVOB": 0.1,
}
BIRADS_MALIGNANT = ["4", "4a", "4b", "4c", "5", "6"]
BIRADS_BENIGN = ["0", "1", "2", "3", "4"]
DENSITIES = ["A", "B", "C", "D"]
MAX_12_BIT = 4095
# Width x height. Real images are breast-region crops of millions of pixels, portrait;
# small ones keep the sample quick to make and to train on.
DEFAULT_SIZE = (128, 160)
DEFAULT_CASES = 10


def generate(dest: str | os.PathLike, cases: int = DEFAULT_CASES,
             size: tuple[int, int] = DEFAULT_SIZE, seed: int = 0) -> bool:
    """Write a synthetic sample to ``dest``; return False when a complete one is
    already there, which is then left as it is.

    The sample is written to a temporary folder beside ``dest`` and renamed into
    place, so ``dest`` never holds half a dataset. An existing ``dest`` must be
    complete or empty.
    """
    if cases < 1:
        raise ValueError("cases must be at least 1")
    width, height = size
    if width < 16 or height < 16:
        raise ValueError("images must be at least 16x16 pixels")
    dest = Path(dest)
    if is_complete(dest):
        return False
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty and holds no complete dataset; "
                              "choose another folder or empty this one")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        _write_sample(tmp, cases, (width, height), seed)
        # mkdtemp made it private, and the caller's umask may be tight: a
        # dataset is for reading, by the account jobs run as too
        for folder, _, names in os.walk(tmp):
            os.chmod(folder, 0o755)
            for name in names:
                os.chmod(os.path.join(folder, name), 0o644)
        if dest.exists():
            dest.rmdir()
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def is_complete(dest: str | os.PathLike) -> bool:
    """True when both CSV files exist and every image they list is on disk."""
    dest = Path(dest)
    if not (dest / CASE_CSV).is_file() or not (dest / IMAGE_CSV).is_file():
        return False
    for row in read_csv(dest / IMAGE_CSV):
        png = dest / row["ImagePath"]
        if not png.is_file() or not png.with_suffix(".npy").is_file():
            return False
    return True


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a CLaM CSV file (semicolons; "NULL" is left as the string)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter=";"))


def parse_size(text: str) -> tuple[int, int]:
    """'128x160' -> (128, 160): width x height."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 128x160") from None
    return width, height


# --- the sample --------------------------------------------------------------------


def _write_sample(root: Path, cases: int, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = _labels(rng, cases)
    splits = _splits(rng, labels)
    extras = _extra_views(rng, cases)
    case_rows, image_rows = [], []
    for index in range(cases):
        n = index + 1
        label, split = labels[index], splits[index]
        patient, case = f"P{n}", f"S{n}-A{n}"
        case_path = f"{SAMPLE_FOLDER}/{case}"
        study = _pick(rng, STUDY_DESCRIPTIONS)
        views = sorted(STANDARD_VIEWS + extras[index])
        birads = BIRADS_MALIGNANT if label == "malignant" else BIRADS_BENIGN
        case_rows.append({
            "Patient_Id": patient, "CaseName": case, "CasePath": case_path,
            "Study_Description": study,
            "Views_4": "+".join(v for v in views if v in STANDARD_VIEWS),
            "Views": "+".join(views),
            "BIRADS_combined_casebased": NULL if rng.random() < 0.1 else str(rng.choice(birads)),
            "BIRADS_combined_pathwaybased": str(rng.choice(birads)),
            "BreastDensity_standardized": NULL if rng.random() < 0.3 else str(rng.choice(DENSITIES)),
            "Age": repr(float(rng.uniform(35.0, 90.0))),  # full precision, as in the real file
            "Groundtruth": label, "Split": split,
        })
        # The real file lists a case's images in no particular order.
        for view in rng.permutation(views):
            _write_image(root / case_path / view, _mammogram(rng, size, label == "malignant"))
            image_rows.append({
                "Patient_Id": patient, "CaseName": case, "CasePath": case_path,
                "ImagePath": f"{case_path}/{view}/1.png", "Study_Description": study,
                "Views": str(view), "CaseLabel": label, "Split": split,
            })
    _write_csv(root / CASE_CSV, CASE_COLUMNS, case_rows)
    _write_csv(root / IMAGE_CSV, IMAGE_COLUMNS, image_rows)


def _labels(rng: np.random.Generator, cases: int) -> list[str]:
    """Half the cases malignant (rounded up), in random order."""
    labels = ["malignant"] * ((cases + 1) // 2) + ["benign"] * (cases // 2)
    return [labels[i] for i in rng.permutation(cases)]


def _splits(rng: np.random.Generator, labels: list[str]) -> list[str]:
    """A fifth of the cases (at least one when there are two or more) go to test,
    taken from the two classes in turn so that test holds both when it can."""
    cases = len(labels)
    n_test = max(1, round(cases * TEST_FRACTION)) if cases > 1 else 0
    queues = {label: [i for i in rng.permutation(cases) if labels[i] == label]
              for label in ("benign", "malignant")}
    test: set[int] = set()
    while len(test) < n_test:
        for queue in queues.values():
            if queue and len(test) < n_test:
                test.add(int(queue.pop()))
    return ["test" if i in test else "train" for i in range(cases)]


def _extra_views(rng: np.random.Generator, cases: int) -> list[list[str]]:
    """Which extra views each case has. The total is fixed by the number of cases
    (so the default gives the real sample's 46 images whatever the seed); which
    cases get them, and which views, is random."""
    views = list(EXTRA_VIEWS)
    weights = np.array(list(EXTRA_VIEWS.values()))
    per_case: list[list[str]] = [[] for _ in range(cases)]
    for _ in range(round(cases * EXTRA_VIEWS_PER_CASE)):
        # a case holds each view once; skip cases that already have them all
        candidates = [i for i in range(cases) if len(per_case[i]) < len(views)]
        case = per_case[int(rng.choice(candidates))]
        free = [v not in case for v in views]
        p = weights * free
        case.append(str(rng.choice(views, p=p / p.sum())))
    return per_case


def _pick(rng: np.random.Generator, weighted: dict[str, float]) -> str:
    return str(rng.choice(list(weighted), p=list(weighted.values())))


def _mammogram(rng: np.random.Generator, size: tuple[int, int], malignant: bool) -> np.ndarray:
    """A 12-bit synthetic breast: a bright half-ellipse against the chest wall (the
    left edge), fading outwards, with noise; in malignant cases a dense blob."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(float)
    centre_y = height / 2 + rng.uniform(-0.05, 0.05) * height
    radius_y, radius_x = height * rng.uniform(0.38, 0.48), width * rng.uniform(0.7, 0.95)
    distance = np.sqrt(((y - centre_y) / radius_y) ** 2 + (x / radius_x) ** 2)
    inside = distance < 1
    image = np.sqrt(np.clip(1.0 - distance, 0.0, 1.0)) * rng.uniform(1800, 2600)
    image += rng.normal(0, 120, size=(height, width)) * inside
    if malignant:
        # Inside the breast, a few percent of the image's height across.
        lesion_y = centre_y + rng.uniform(-0.5, 0.5) * radius_y
        lesion_x = rng.uniform(0.15, 0.55) * radius_x
        sigma = rng.uniform(0.02, 0.04) * height
        image += 1500 * np.exp(-((y - lesion_y) ** 2 + (x - lesion_x) ** 2) / (2 * sigma**2))
    return np.clip(np.rint(image), 0, MAX_12_BIT).astype(np.uint16)


def _write_image(folder: Path, pixels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "1.npy", pixels)
    # 12-bit to 8-bit keeps the top 8 bits. PNG carries no timestamp unless asked to,
    # and a fixed compression level makes the bytes depend on the pixels alone.
    png = Image.fromarray((pixels >> 4).astype(np.uint8))  # 2-D uint8: mode L
    png.save(folder / "1.png", format="PNG", compress_level=6, optimize=False)


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, delimiter=";", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
