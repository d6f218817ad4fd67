"""A synthetic CLaM sample: the real dataset's layout and CSV columns, made-up images.

The layout and the two CSV files' columns are those of the published 10-case
CLaM-sample (docs/dataset.md describes them)::

    DEST/clam-details-case-extrainfo.csv     one row per case
    DEST/clam-details-image.csv              one row per image
    DEST/CLaM-sample/S<n>-A<n>/<VIEW>/1.png  8-bit grey
    DEST/CLaM-sample/S<n>-A<n>/<VIEW>/1.npy  the same image, uint16 with 12-bit values

The two encodings relate exactly: ``png == npy >> 4``.  Every image of a
malignant case carries a bright round blob (a "lesion"), so a classifier has
something to learn.  How many cases of each split and label, and images of
each view, follows a dataset's proportions (layout(): the published sample's,
or a real dataset's counts(), as the dry run's twin does). The defaults give
the published sample's shape: 10 cases, 46 images, 5 malignant and 5 benign,
8 train and 2 test.

The output depends only on the arguments (and on the numpy
and Pillow versions, which fix the random streams and the PNG encoder): the
same arguments give the same bytes.

This module needs numpy and Pillow; nothing else in the m2d client does.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
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
# Extra views seen in CLaM (the cranio-caudal exaggerated views are the common ones).
EXTRA_VIEWS = ["LXCCL", "RXCCL", "LLM", "RLM", "LML", "RML"]
MALIGNANT = "malignant"
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
             size: tuple[int, int] = DEFAULT_SIZE, seed: int = 0,
             like: Counts | None = None, floor: int = 0) -> bool:
    """Write a synthetic sample to ``dest``; return False when a complete one is
    already there, which is then left as it is.

    Its cases are spread over split x label, and each cell's images over the
    views, in the proportions of ``like`` (default: the published sample), with
    at least ``floor`` cases in every split x label (layout() says exactly).
    The sample is written to a temporary folder beside ``dest`` and renamed into
    place, so ``dest`` never holds half a dataset. An existing ``dest`` must be
    complete or empty.
    """
    if cases < 1:
        raise ValueError("cases must be at least 1")
    if floor < 0:
        raise ValueError("the floor per split and label must be 0 or more")
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
        _write_sample(tmp, cases, (width, height), seed, like or PUBLISHED, floor)
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


# --- how many of what: split x label x view ----------------------------------------

Cell = tuple[str, str]  # (split, label)


@dataclass(frozen=True)
class Counts:
    """A dataset's shape, counts only: cases per (split, label), and per cell the
    images of each view."""
    cases: dict[Cell, int]
    views: dict[Cell, dict[str, int]]

    @property
    def total(self) -> int:
        return sum(self.cases.values())


# The published CLaM-sample's counts (tests/data/clam-published/ holds its CSVs).
PUBLISHED = Counts(
    cases={("test", "benign"): 1, ("test", MALIGNANT): 1, ("train", "benign"): 4, ("train", MALIGNANT): 4},
    views={("test", "benign"): {"LCC": 1, "LMLO": 1, "RCC": 1, "RMLO": 1, "RXCCL": 1},
           ("test", MALIGNANT): {"LCC": 1, "LMLO": 1, "LXCCL": 1, "RCC": 1, "RMLO": 1, "RXCCL": 1},
           ("train", "benign"): {"LCC": 4, "LMLO": 4, "LXCCL": 1, "RCC": 4, "RMLO": 4},
           ("train", MALIGNANT): {"LCC": 4, "LLM": 1, "LMLO": 4, "LXCCL": 1, "RCC": 4, "RMLO": 4}},
)
# A split, label or view names folders and CSV values: a plain word, and few of them.
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_MOST_KINDS = 32


def counts(root: str | os.PathLike) -> Counts:
    """The shape of the dataset at ``root``, read from its two CSV files' split,
    label and view columns only (no image is opened)."""
    root = Path(root)
    cases: dict[Cell, int] = {}
    views: dict[Cell, dict[str, int]] = {}
    for name, columns in ((CASE_CSV, ("Split", "Groundtruth")), (IMAGE_CSV, ("Split", "CaseLabel", "Views"))):
        with open(root / name, newline="") as f:
            for line, row in enumerate(csv.DictReader(f, delimiter=";"), start=2):
                for column in columns:
                    if not _WORD.fullmatch(row.get(column) or ""):
                        raise ValueError(f"{root / name} line {line}: {column} {row.get(column)!r} is not a "
                                         "plain word (letters, digits, . _ -); is this a CLaM dataset?")
                cell = (row["Split"], row[columns[1]])
                if name == CASE_CSV:
                    cases[cell] = cases.get(cell, 0) + 1
                else:
                    cell_views = views.setdefault(cell, {})
                    cell_views[row["Views"]] = cell_views.get(row["Views"], 0) + 1
                if len(cases) > _MOST_KINDS or len(views) > _MOST_KINDS or len(views.get(cell, ())) > _MOST_KINDS:
                    raise ValueError(f"{root / name}: more than {_MOST_KINDS} different splits x labels or views; "
                                     "is this a CLaM dataset?")
    return Counts(cases=dict(sorted(cases.items())),
                  views={cell: dict(sorted(views.get(cell, {}).items())) for cell in sorted(cases)})


def layout(cases: int, like: Counts = PUBLISHED, floor: int = 0) -> Counts:
    """The counts of a sample of ``cases`` cases shaped like ``like``: the cases
    shared over its split x label cells in its proportions (largest remainders),
    then every split x label (every split gets every label) raised to ``floor``;
    in each cell each view on as many cases as its share of ``like``'s cell (of
    all of ``like`` for a cell ``like`` lacks), and the cell's commonest view on
    all of them, so that every case has an image."""
    if not like.total:
        raise ValueError("the dataset to take the proportions from has no cases")
    cells = sorted(like.cases)
    if floor:
        cells = sorted({(split, label) for split, _ in like.cases for label in {lb for _, lb in like.cases}})
    quotas = {cell: cases * like.cases.get(cell, 0) / like.total for cell in cells}
    shares = {cell: int(quota) for cell, quota in quotas.items()}
    by_remainder = sorted(cells, key=lambda cell: (-(quotas[cell] - shares[cell]), cell))
    for cell in by_remainder[:cases - sum(shares.values())]:
        shares[cell] += 1
    chosen = {cell: max(floor, share) for cell, share in shares.items() if max(floor, share)}
    everywhere: dict[str, int] = {}
    for by_view in like.views.values():
        for view, n in by_view.items():
            everywhere[view] = everywhere.get(view, 0) + n
    views = {}
    for cell, k in chosen.items():
        source, of = (like.views[cell], like.cases[cell]) if like.cases.get(cell) else (everywhere, like.total)
        scaled = {view: min(k, int(n * k / of + 0.5)) for view, n in source.items()}
        commonest = min(source, key=lambda view: (-source[view], view))
        scaled[commonest] = k
        views[cell] = {view: n for view, n in sorted(scaled.items()) if n}
    return Counts(cases=chosen, views=views)


# --- the sample --------------------------------------------------------------------


def _write_sample(root: Path, cases: int, size: tuple[int, int], seed: int,
                  like: Counts, floor: int) -> None:
    rng = np.random.default_rng(seed)
    chosen = layout(cases, like, floor)
    cells = [cell for cell, count in chosen.cases.items() for _ in range(count)]
    cells = [cells[i] for i in rng.permutation(len(cells))]  # cells interleaved, as in the real file
    views = _views(rng, chosen, cells)
    case_rows, image_rows = [], []
    for index, (split, label) in enumerate(cells):
        n = index + 1
        patient, case = f"P{n}", f"S{n}-A{n}"
        case_path = f"{SAMPLE_FOLDER}/{case}"
        study = _pick(rng, STUDY_DESCRIPTIONS)
        birads = BIRADS_MALIGNANT if label == MALIGNANT else BIRADS_BENIGN
        case_rows.append({
            "Patient_Id": patient, "CaseName": case, "CasePath": case_path,
            "Study_Description": study,
            "Views_4": "+".join(v for v in views[index] if v in STANDARD_VIEWS),
            "Views": "+".join(views[index]),
            "BIRADS_combined_casebased": NULL if rng.random() < 0.1 else str(rng.choice(birads)),
            "BIRADS_combined_pathwaybased": str(rng.choice(birads)),
            "BreastDensity_standardized": NULL if rng.random() < 0.3 else str(rng.choice(DENSITIES)),
            "Age": repr(float(rng.uniform(35.0, 90.0))),  # full precision, as in the real file
            "Groundtruth": label, "Split": split,
        })
        # The real file lists a case's images in no particular order.
        for view in rng.permutation(views[index]):
            _write_image(root / case_path / view, _mammogram(rng, size, label == MALIGNANT))
            image_rows.append({
                "Patient_Id": patient, "CaseName": case, "CasePath": case_path,
                "ImagePath": f"{case_path}/{view}/1.png", "Study_Description": study,
                "Views": str(view), "CaseLabel": label, "Split": split,
            })
    _write_csv(root / CASE_CSV, CASE_COLUMNS, case_rows)
    _write_csv(root / IMAGE_CSV, IMAGE_COLUMNS, image_rows)


def _views(rng: np.random.Generator, chosen: Counts, cells: list[Cell]) -> list[list[str]]:
    """Each case's views, sorted: within a cell, a view with n images goes to n
    of its cases picked at random (layout() gives every cell a view all its cases have)."""
    per_case: list[list[str]] = [[] for _ in cells]
    for cell, by_view in chosen.views.items():
        members = [i for i, c in enumerate(cells) if c == cell]
        for view, count in sorted(by_view.items()):
            for i in rng.choice(members, size=count, replace=False):
                per_case[int(i)].append(view)
    return [sorted(views) for views in per_case]


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
