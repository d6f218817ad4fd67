"""The synthetic CLaM sample (m2d/contract/sample_data.py): the published layout and columns,
the real sample's shape, both encodings of each image, a signal to learn, and the
same bytes for the same seed."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from m2d.contract import sample_data, twin

HEADERS = Path(__file__).parent / "data" / "clam-csv-headers.tsv"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The default sample: what the testbed and `m2d sample-data` make."""
    dest = tmp_path_factory.mktemp("clam") / "clam"
    assert sample_data.generate(dest)
    return dest


def published_headers():
    lines = [line for line in HEADERS.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("\t") for line in lines)


def cases(root):
    return sample_data.read_csv(root / sample_data.CASE_CSV)


def images(root):
    return sample_data.read_csv(root / sample_data.IMAGE_CSV)


def all_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_csv_files_have_the_published_header_lines_and_semicolons(sample):
    headers = published_headers()
    assert set(headers) == {sample_data.CASE_CSV, sample_data.IMAGE_CSV}
    for name, header in headers.items():
        lines = (sample / name).read_text().splitlines()
        assert lines[0] == header
        columns = header.count(";") + 1
        assert all(line.count(";") + 1 == columns for line in lines[1:])


def test_default_sample_has_the_real_samples_shape(sample):
    case_rows, image_rows = cases(sample), images(sample)
    assert len(case_rows) == 10 and len(image_rows) == 46
    assert sorted(r["Groundtruth"] for r in case_rows) == ["benign"] * 5 + ["malignant"] * 5
    assert sorted(r["Split"] for r in case_rows) == ["test"] * 2 + ["train"] * 8
    test_labels = {r["Groundtruth"] for r in case_rows if r["Split"] == "test"}
    assert test_labels == {"benign", "malignant"}


def test_cases_follow_the_published_naming_and_views(sample):
    for n, row in enumerate(cases(sample), start=1):
        assert (row["Patient_Id"], row["CaseName"], row["CasePath"]) == (f"P{n}", f"S{n}-A{n}", f"CLaM-sample/S{n}-A{n}")
        views = row["Views"].split("+")
        assert views == sorted(views)
        assert row["Views_4"] == "+".join(v for v in views if v in sample_data.STANDARD_VIEWS)
        assert set(views) <= set(sample_data.STANDARD_VIEWS) | set(sample_data.EXTRA_VIEWS)
        on_disk = sorted(p.name for p in (sample / row["CasePath"]).iterdir())
        assert on_disk == views


def test_values_come_from_the_published_vocabularies_with_null_for_missing(sample):
    birads = set(sample_data.BIRADS_MALIGNANT) | set(sample_data.BIRADS_BENIGN) | {"NULL"}
    for row in cases(sample):
        assert all(value != "" for value in row.values())
        assert row["BIRADS_combined_casebased"] in birads
        assert row["BIRADS_combined_pathwaybased"] in birads
        assert row["BreastDensity_standardized"] in {"A", "B", "C", "D", "NULL"}
        assert 18 < float(row["Age"]) < 110
        assert row["Study_Description"] in sample_data.STUDY_DESCRIPTIONS


def test_each_image_row_carries_its_cases_label_and_split_and_exists(sample):
    by_case = {r["CaseName"]: r for r in cases(sample)}
    for row in images(sample):
        case = by_case[row["CaseName"]]
        assert (row["CaseLabel"], row["Split"]) == (case["Groundtruth"], case["Split"])
        assert row["Patient_Id"] == case["Patient_Id"] and row["Study_Description"] == case["Study_Description"]
        assert row["ImagePath"] == f"{case['CasePath']}/{row['Views']}/1.png"
        assert (sample / row["ImagePath"]).is_file()
        assert (sample / row["ImagePath"]).with_suffix(".npy").is_file()


def test_npy_is_12_bit_uint16_and_png_is_its_top_8_bits(sample):
    for row in images(sample)[:12]:
        png_path = sample / row["ImagePath"]
        pixels = np.load(png_path.with_suffix(".npy"))
        assert pixels.dtype == np.uint16 and pixels.max() <= 4095 and pixels.max() > 255
        png = Image.open(png_path)
        assert png.mode == "L"
        assert np.array_equal(np.asarray(png), (pixels >> 4).astype(np.uint8))


def test_size_is_width_by_height(tmp_path):
    assert sample_data.generate(tmp_path / "clam", cases=2, size=(40, 60), seed=1)
    row = images(tmp_path / "clam")[0]
    assert Image.open(tmp_path / "clam" / row["ImagePath"]).size == (40, 60)
    assert np.load((tmp_path / "clam" / row["ImagePath"]).with_suffix(".npy")).shape == (60, 40)


def test_malignant_images_carry_a_signal_that_local_contrast_alone_finds(tmp_path):
    """A learnable signal: the brightest local bump separates the classes."""
    root = tmp_path / "clam"
    sample_data.generate(root, cases=20, seed=7)

    def bump(path):
        image = Image.open(path)
        fine = np.asarray(image.filter(ImageFilter.BoxBlur(2)), dtype=float)
        coarse = np.asarray(image.filter(ImageFilter.BoxBlur(10)), dtype=float)
        return (fine - coarse).max()

    scores = {"benign": [], "malignant": []}
    for row in images(root):
        scores[row["CaseLabel"]].append(bump(root / row["ImagePath"]))
    assert min(scores["malignant"]) > max(scores["benign"])


def test_same_seed_gives_the_same_bytes_and_another_seed_another_sample(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        sample_data.generate(tmp_path / name, cases=4, size=(32, 40), seed=seed)
    a, b, c = (all_files(tmp_path / name) for name in "abc")
    assert a == b
    assert a != c


def test_a_complete_dataset_is_left_as_it_is_and_a_foreign_folder_refused(tmp_path):
    root = tmp_path / "clam"
    assert sample_data.generate(root, cases=2, seed=0)
    before = all_files(root)
    assert not sample_data.generate(root, cases=3, seed=9)
    assert all_files(root) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        sample_data.generate(tmp_path / "other", cases=2)


def test_testbed_script_writes_the_same_sample_as_the_module(tmp_path):
    """deploy/testbed/up.sh runs make_dataset.py by its path, from anywhere."""
    script = REPO / "deploy" / "testbed" / "make_dataset.py"
    for _ in range(2):
        done = subprocess.run([sys.executable, str(script), str(tmp_path / "testbed"), "--cases", "3", "--seed", "2"],
                              cwd="/", capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    assert re.search(r"already holds a complete dataset", done.stdout)
    sample_data.generate(tmp_path / "module", cases=3, seed=2)
    assert all_files(tmp_path / "testbed") == all_files(tmp_path / "module")


def test_m2d_sample_data_gives_every_split_every_label_as_the_dry_runs_twin_does(tmp_path):
    """`m2d sample-data`: the published proportions, then at least 4 cases per
    split and label, so that a test-split ROC AUC is defined; --min-per-cell 0
    gives exactly the published sample's shape."""
    def made(*args):
        done = subprocess.run([sys.executable, "-m", "m2d", "sample-data", *map(str, args)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return sample_data.counts(args[1])

    shaped = made("--out", tmp_path / "twin-like", "--size", "16x16")
    assert shaped.cases == {cell: 4 for cell in sample_data.PUBLISHED.cases}
    assert shaped == sample_data.layout(10, floor=twin.FLOOR)
    assert made("--out", tmp_path / "exact", "--size", "16x16", "--min-per-cell", "0") == sample_data.PUBLISHED
