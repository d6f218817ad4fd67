"""The disclosure checker (m2d/disclosure, issue 23) on the testbed's synthetic dataset,
made here by deploy/testbed/make_dataset.py: the proofs that must end `fail`, those that
must not, and the hostile files a report job reads (symlinks, bombs, pickled code)."""
import gzip
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from m2d.disclosure import index as disclosure_index
from m2d.disclosure import tables
from m2d.disclosure.index import Index
from m2d.disclosure.limits import Limits
from m2d.disclosure.report import Checker
from tests.helpers import disclosure_exports as make
from tests.helpers.disclosure_exports import fingerprint_index, synthetic_dataset

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return synthetic_dataset(tmp_path_factory.mktemp("disclosure") / "clam")


@pytest.fixture(scope="module")
def index_dir(dataset, tmp_path_factory) -> Path:
    return fingerprint_index(dataset, tmp_path_factory.mktemp("index") / "idx")


def check(index_dir: Path, export: Path, **limits) -> dict:
    return Checker(Index.load(index_dir), replace(Limits(), **limits)).run(export)


def only(report: dict) -> dict:
    assert len(report["files"]) == 1, report
    return report["files"][0]


def reasons(entry: dict, name: str) -> str:
    return " | ".join(c["reason"] for c in entry["checks"] if c["name"] == name)


def status_of(entry: dict, name: str) -> str:
    return next(c["status"] for c in entry["checks"] if c["name"] == name)


def identifier_values(dataset: Path) -> set[str]:
    values = set()
    for name in (make.CASE_CSV, make.IMAGE_CSV):
        for row in make.rows(dataset, name):
            values |= {row[c] for c in ("Patient_Id", "CaseName", "CasePath", "ImagePath") if c in row}
    return values


# --- the index ---------------------------------------------------------------------------


def test_index_is_built_once_per_version_private_and_holds_no_identifier(dataset, index_dir):
    version = json.loads((index_dir / "version.json").read_text())
    assert version["train_cases"] == 8 and version["counts"]["images"] == 46
    assert oct(index_dir.stat().st_mode & 0o777) == "0o750"
    assert {oct(f.stat().st_mode & 0o777) for f in index_dir.iterdir()} == {"0o640"}
    assert disclosure_index.build(dataset, index_dir) is False  # same version: left as it is
    text = " ".join(f.read_text("latin-1") for f in index_dir.iterdir())
    assert not [v for v in identifier_values(dataset) if re.search(rf"(?<![A-Za-z0-9]){re.escape(v)}(?![A-Za-z0-9])", text)]


# --- the proofs: each must end fail ---------------------------------------------------------


@pytest.mark.parametrize("maker, check_name", [
    (make.npy_in_checkpoint, "dataset-content"),
    (make.npy_deflated_into_checkpoint, "dataset-content"),
    (make.image_as_float_tensor, "near-duplicate-image"),
])
def test_dataset_array_in_a_torch_checkpoint_fails(dataset, index_dir, tmp_path, maker, check_name):
    maker(dataset, tmp_path / "model.tar")
    entry = only(check(index_dir, tmp_path))
    assert entry["type"] == "pytorch-zip" and entry["status"] == "fail"
    assert status_of(entry, check_name) == "fail", entry
    assert "dataset file #" in reasons(entry, check_name)


def test_part_of_a_dataset_file_at_an_odd_offset_is_found_by_its_chunks(dataset, index_dir, tmp_path):
    """Not the whole file (no whole-file hash matches): the array's raw rows without the
    NPY header, between random bytes, in a tensor of the checkpoint."""
    import torch
    rows = np.load(make.an_image(dataset)[1]).tobytes()[5000:35000]
    payload = os.urandom(1001) + rows + os.urandom(999)
    state_dict = make.resnet18_state_dict()
    state_dict["fc.extra"] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    make.save_clam_model(tmp_path / "model.tar", state_dict)
    entry = only(check(index_dir, tmp_path))
    assert status_of(entry, "dataset-content") == "fail"
    assert "chunk(s)" in reasons(entry, "dataset-content") and "byte for byte" not in reasons(entry, "dataset-content")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_dataset_png_resized_by_a_pixel_and_reencoded_fails(dataset, index_dir, tmp_path, fmt):
    make.resized_png(dataset, tmp_path / "figure.png", fmt)
    entry = only(check(index_dir, tmp_path))
    assert status_of(entry, "near-duplicate-image") == "fail", entry
    assert status_of(entry, "dataset-content") == "pass"  # no byte in common: only the pHash finds it


def test_patient_ids_in_a_results_csv_fail_and_the_report_names_no_id(dataset, index_dir, tmp_path):
    make.ids_in_results_csv(dataset, tmp_path / "results.csv")
    report = check(index_dir, tmp_path)
    entry = only(report)
    assert status_of(entry, "identifiers") == "fail"
    assert "a patient id of the dataset at line 2, column 1 ('patient_id')" in reasons(entry, "identifiers")
    assert not re.search(r"(?<![A-Za-z0-9])P\d+(?![A-Za-z0-9])", json.dumps(report))


def test_one_row_per_training_case_fails(dataset, index_dir, tmp_path):
    make.per_case_predictions(dataset, tmp_path / "predictions.csv")
    entry = only(check(index_dir, tmp_path))
    assert status_of(entry, "table") == "fail"
    assert "as many as the dataset's train cases (8)" in reasons(entry, "table")


# --- the proofs: each must end pass or review -------------------------------------------------


def test_resnet18_state_dict_is_reviewed_for_its_size_not_failed(index_dir, tmp_path):
    state_dict = make.resnet18_state_dict()
    make.save_clam_model(tmp_path / "model.tar", state_dict)
    entry = only(check(index_dir, tmp_path))
    assert entry["status"] == "review", entry
    assert status_of(entry, "pickle-code") == "pass" and status_of(entry, "dataset-content") == "pass"
    assert status_of(entry, "identifiers") == "pass" and status_of(entry, "model-parameters") == "review"
    # torchvision's resnet18 with 2 classes has 11,177,538 parameters; its state dict adds BatchNorm's buffers
    assert f"{sum(t.numel() for t in state_dict.values())} parameters" in reasons(entry, "model-parameters")


def test_aggregate_metrics_spreadsheet_and_confusion_matrix_pass(index_dir, tmp_path):
    make.metrics_xlsx(tmp_path / "results.xlsx")
    make.confusion_matrix_csv(tmp_path / "confusion.csv")
    report = check(index_dir, tmp_path)
    assert [(f["path"], f["type"], f["status"]) for f in report["files"]] == [
        ("confusion.csv", "csv", "pass"), ("results.xlsx", "xlsx", "pass")], report


def test_small_and_zero_counts_are_reviewed_with_the_cells_named(index_dir, tmp_path):
    (tmp_path / "confusion.csv").write_text(",benign,malignant\nbenign,52,3\nmalignant,0,47\n")
    entry = only(check(index_dir, tmp_path))
    assert entry["status"] == "review"
    assert "below the threshold of 10: line 2, column 3 ('malignant')" in reasons(entry, "table")
    assert "zero count cell(s)" in reasons(entry, "table")


def test_dominated_total_is_reviewed(index_dir, tmp_path):
    (tmp_path / "costs.csv").write_text("site,cost\na,950.5\nb,30.25\nc,20.75\ntotal,1001.5\n")
    entry = only(check(index_dir, tmp_path))
    assert "dominated by their largest parts" in reasons(entry, "table")


ACRO_ORACLE = json.loads((REPO / "tests/data/acro/oracle.json").read_text())
ACRO_RULES = {"NKCheck": tables.NK, "PPercentCheck": tables.PRATIO}


def _table_of(index_dir: Path, tmp_path: Path, text: str) -> dict:
    export = tmp_path / "export"
    export.mkdir()
    (export / "table.csv").write_text(text)
    return only(check(index_dir, export))


@pytest.mark.parametrize("case", sorted(ACRO_ORACLE["magnitudes"]))
def test_dominance_and_p_ratio_agree_with_acros_own_verdicts(index_dir, tmp_path, case):
    """ACRO 1.0.2 judged a cell of these contributions (tests/data/acro/make_oracle.py ran
    acro.crosstab(..., aggfunc="sum") with its defaults: N=2, K=90 %, p-ratio 10 %); the
    exported table that shows them and their total gets the same rules broken. (ACRO also
    counts the contributors of a cell against its threshold: an exported table of
    magnitudes does not show them.) Magnitudes are the contributions / 8: exact ratios,
    and not whole numbers, so the column is one of magnitudes, not of counts."""
    expected = ACRO_ORACLE["magnitudes"][case]
    assert ACRO_ORACLE["acro"] == "1.0.2"
    values = [v / 8 for v in expected["contributions"]]
    lines = ["contributor,amount"] + [f"c{i},{v}" for i, v in enumerate(values)] + [f"Total,{sum(values)}"]
    entry = _table_of(index_dir, tmp_path, "\n".join(lines) + "\n")
    found = reasons(entry, "table")
    ours = {rule for rule in (tables.NK, tables.PRATIO) if tables.RULES[rule] in found}
    if tables.RULES[tables.NEGATIVE] in found:
        ours |= {tables.NK, tables.PRATIO}  # ACRO: "Dominance not defined when negative value are present"
    theirs = {ACRO_RULES[flag] for flag in expected["flags"] if flag in ACRO_RULES}
    assert ours == theirs, (expected, found)
    assert status_of(entry, "table") == ("review" if theirs else "pass")


@pytest.mark.parametrize("count", sorted(ACRO_ORACLE["counts"], key=int))
def test_the_count_threshold_agrees_with_acros_own_verdict(index_dir, tmp_path, count):
    """A frequency cell of ACRO's crosstab with this many records, and our table showing it."""
    flagged = "MinimumThresholdCheck" in ACRO_ORACLE["counts"][count]
    entry = _table_of(index_dir, tmp_path, f"group,n\na,{count}\n")
    assert status_of(entry, "table") == ("review" if flagged else "pass"), reasons(entry, "table")


# --- the CLI, as the report job and the researcher run it ----------------------------------


def test_report_cli_writes_the_interface_json_and_acro_shape_and_exits_3_on_fail(dataset, index_dir, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    make.ids_in_results_csv(dataset, export / "results.csv")
    make.confusion_matrix_csv(export / "confusion.csv")
    out, acro = tmp_path / "report.json", tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-m", "m2d.disclosure", "report", "--index", str(index_dir), "--export",
                           str(export), "--out", str(out), "--acro-out", str(acro)], cwd=REPO, capture_output=True)
    assert done.returncode == 3, done.stderr
    report = json.loads(out.read_text())
    assert report["version"] == 1 and report["index_version"] == json.loads((index_dir / "version.json").read_text())["index_version"]
    assert report["summary"] == {"pass": 1, "review": 0, "fail": 1}
    for f in report["files"]:
        assert set(f) == {"path", "size", "sha256", "type", "status", "checks"}
        assert all(set(c) == {"name", "status", "reason"} for c in f["checks"])
        assert f["status"] == max((c["status"] for c in f["checks"]), key=["pass", "review", "fail"].index)
    results = json.loads(acro.read_text())["results"]
    assert {r["files"][0]["name"]: r["status"] for r in results.values()} == {"confusion.csv": "pass", "results.csv": "fail"}
    assert all({"uid", "status", "type", "properties", "files", "outcome", "command", "summary", "timestamp",
                "comments", "exception"} <= set(r) for r in results.values())


# What ACRO's own loader requires of a results.json: acro 1.0.2 (PyPI), acro/record.py
# load_records(path), read there (the package and its pandas, statsmodels, matplotlib,
# rdflib are too heavy for requirements.txt). It opens PATH/results.json; refuses a
# "version" other than its own __version__; for each output of "results" reads uid, status,
# type, properties, fair, command, summary, comments, exception, timestamp, "outcome" (a
# dict for pandas.DataFrame.from_dict) and "files" (at least one, each a name and an "sdc"
# dict, files[0]'s sdc kept); and reads every file name ending ".csv" with pandas.read_csv
# from beside results.json (the rest stay names). SACRO-Viewer (AI-SDC/SACRO-Viewer,
# sacro/models.py ACROOutputs, sacro/versioning.py) takes the folder's one ACRO json,
# asks for "version" and "results", at least one file with a "name" per output, a version
# of at least 0.4, and shows the status from the summary's first "; " part.
ACRO_RECORD_KEYS = {"uid", "status", "type", "properties", "fair", "command", "summary", "outcome", "comments",
                    "exception", "timestamp", "files"}


def load_as_acro_does(folder: Path) -> dict[str, dict]:
    """acro 1.0.2's load_records (above), step by step without pandas: {uid: record}."""
    import csv
    data = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    assert data["version"] == "1.0.2"  # load_records: ValueError("error loading output") otherwise
    records = {}
    for key, val in data["results"].items():
        assert ACRO_RECORD_KEYS <= set(val), ACRO_RECORD_KEYS - set(val)
        assert isinstance(val["outcome"], dict) and all(isinstance(c, (dict, list)) for c in val["outcome"].values())
        assert isinstance(val["files"], list) and val["files"], key  # sdcs[0]
        assert all(isinstance(f["name"], str) and isinstance(f["sdc"], dict) for f in val["files"])
        for f in val["files"]:
            if os.path.splitext(f["name"])[1] == ".csv":  # load_output: pandas.read_csv(PATH/name)
                with open(folder / f["name"], newline="", encoding="utf-8") as table:
                    rows = list(csv.reader(table))
                assert rows and rows[0], f"{f['name']}: pandas finds no columns"
                assert all(len(row) <= len(rows[0]) for row in rows), f"{f['name']}: a row longer than its header"
        assert val["status"] in ("pass", "review", "fail") and isinstance(val["comments"], list)
        # SACRO-Viewer: the status it shows is the summary's first part
        assert val["summary"].split("; ")[0] == val["status"]
        records[key] = val
    major, minor, *_ = data["version"].split(".")
    assert (int(major), int(minor)) >= (0, 4)  # SACRO-Viewer's ACRO_SUPPORTED_VERSION 0.4.x
    return records


def test_the_acro_results_file_loads_as_acros_own_loader_and_sacro_viewer_read_it(dataset, index_dir, tmp_path):
    """--acro-out written as results.json beside the export's files (the folder a reviewer
    opens, as ACRO's own output folder is) is read by acro 1.0.2's load_records: every
    file an output, its verdict the status, each check's reason a comment."""
    from m2d.disclosure import report as report_module
    from tests.helpers import checkpoints
    bundle = tmp_path / "outputs"
    (bundle / "tables").mkdir(parents=True)
    make.confusion_matrix_csv(bundle / "tables" / "confusion.csv")
    make.ids_in_results_csv(dataset, bundle / "results.csv")
    (bundle / "metrics.json").write_text('{"auc": 0.71}')
    checkpoints.torch_zip({"w": np.ones((3, 3), np.float32)}, bundle / "model.pt")
    (bundle / "empty.txt").write_bytes(b"")
    done = subprocess.run([sys.executable, "-m", "m2d.disclosure", "report", "--index", str(index_dir), "--export",
                           str(bundle), "--out", str(tmp_path / "report.json"), "--acro-out",
                           str(tmp_path / "results.json")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    (tmp_path / "results.json").rename(bundle / "results.json")
    records = load_as_acro_does(bundle)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report_module.ACRO_VERSION == "1.0.2"
    by_file = {r["files"][0]["name"]: r for r in records.values()}
    assert set(by_file) == {f["path"] for f in report["files"]} == {
        "tables/confusion.csv", "results.csv", "metrics.json", "model.pt", "empty.txt"}
    for entry in report["files"]:
        record = by_file[entry["path"]]
        assert record["status"] == entry["status"] and record["type"] == "custom"
        assert record["comments"] == [f"{c['name']}: {c['status']}: {c['reason']}" for c in entry["checks"]]
    assert by_file["results.csv"]["status"] == "fail"


def test_check_export_on_the_researchers_side(dataset, index_dir, tmp_path):
    make.per_case_predictions(dataset, tmp_path / "predictions.csv")
    done = subprocess.run([sys.executable, "-m", "m2d", "check-export", str(tmp_path), "--index", str(index_dir)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    assert "FAIL    predictions.csv" in done.stdout and "one row per case" in done.stdout
    (tmp_path / "predictions.csv").unlink()
    make.confusion_matrix_csv(tmp_path / "confusion.csv")
    done = subprocess.run([sys.executable, "-m", "m2d", "check-export", str(tmp_path), "--index", str(index_dir)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and "1 pass, 0 review, 0 fail" in done.stdout


# --- hostile exports --------------------------------------------------------------------------


def test_pickled_code_fails_and_is_never_run(index_dir, tmp_path):
    marker = tmp_path.parent / f"{tmp_path.name}-ran"
    make.pickle_with_code(tmp_path / "checkpoint.pth", marker)
    entry = only(check(index_dir, tmp_path))
    assert status_of(entry, "pickle-code") == "fail"
    assert "posix.system" in reasons(entry, "pickle-code") or "os.system" in reasons(entry, "pickle-code")
    assert not marker.exists()


def test_whole_pickled_module_of_the_researchers_code_fails(index_dir, tmp_path):
    import torch
    module = torch.nn.Sequential(torch.nn.Linear(4, 2))
    torch.save(module, tmp_path / "model.pt")
    entry = only(check(index_dir, tmp_path))
    assert status_of(entry, "pickle-code") == "review"  # torch's own classes: a reviewer looks
    assert "torch.nn.modules" in reasons(entry, "pickle-code")


def test_symlink_to_a_dataset_file_is_never_followed(dataset, index_dir, tmp_path):
    (tmp_path / "image.npy").symlink_to(make.an_image(dataset)[1])
    entry = only(check(index_dir, tmp_path))
    assert entry["status"] == "fail" and entry["type"] == "a symlink" and entry["sha256"] == ""


def test_nested_archives_are_opened(dataset, index_dir, tmp_path):
    npy = make.an_image(dataset)[1].read_bytes()
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w") as t:
        info = tarfile.TarInfo("x/data.bin")
        info.size = len(npy)
        t.addfile(info, io.BytesIO(npy))
    with zipfile.ZipFile(tmp_path / "bundle.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("inner.tar.gz", gzip.compress(inner.getvalue()))
    entry = only(check(index_dir, tmp_path))
    assert status_of(entry, "dataset-content") == "fail"
    assert "the gzip stream of member 'inner.tar.gz'" in reasons(entry, "dataset-content")


def test_a_decompression_bomb_fails_within_its_bound(index_dir, tmp_path):
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("zeros", b"\0" * (8 << 20))
    entry = only(check(index_dir, tmp_path, max_member_bytes=1 << 20))
    assert status_of(entry, "limits") == "fail" and "not fully checked" in reasons(entry, "limits")


def test_identifiers_in_json_xlsx_pickle_and_names(dataset, index_dir, tmp_path):
    case = make.rows(dataset, make.CASE_CSV)[0]
    (tmp_path / "a.json").write_text(json.dumps({"worst": [{"case": case["CaseName"], "loss": 3.2}]}))
    import openpyxl
    wb = openpyxl.Workbook()
    wb.active.append(["path", "score"])
    wb.active.append([case["CasePath"] + "/LCC/1.png", 0.4])
    wb.save(tmp_path / "b.xlsx")
    import pickle
    (tmp_path / "c.pkl").write_bytes(pickle.dumps({"ids": [case["Patient_Id"]]}))
    (tmp_path / f"gradcam_{case['CaseName']}.txt").write_text("nothing\n")
    report = check(index_dir, tmp_path)
    assert {f["path"].split("_")[0]: status_of(f, "identifiers") for f in report["files"]} == {
        "a.json": "fail", "b.xlsx": "fail", "c.pkl": "fail", "gradcam": "fail"}
    # the file's own name is its key for the gateway (which lists it anyway); no reason repeats it
    assert case["CaseName"] not in json.dumps([f["checks"] for f in report["files"]])


def test_identifier_hidden_in_a_tensors_bytes_fails(dataset, index_dir, tmp_path):
    import torch
    case_path = make.rows(dataset, make.CASE_CSV)[3]["CasePath"].encode()
    payload = bytearray(os.urandom(200_000))
    payload[123_457:123_457 + len(case_path) + 2] = b"\0" + case_path + b"\0"
    state_dict = make.resnet18_state_dict()
    state_dict["fc.extra"] = torch.frombuffer(payload, dtype=torch.uint8)
    make.save_clam_model(tmp_path / "model.tar", state_dict)
    entry = only(check(index_dir, tmp_path))
    assert status_of(entry, "identifiers") == "fail" and "a case path of the dataset at byte" in reasons(entry, "identifiers")


def test_image_tensor_in_safetensors_fails_and_random_weights_do_not(dataset, index_dir, tmp_path):
    image = np.load(make.an_image(dataset)[1]).astype(np.float32)
    make.safetensors_file(tmp_path / "a.safetensors", {"w": np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32),
                                                       "stem": image})
    make.safetensors_file(tmp_path / "b.safetensors", {"w": np.random.default_rng(1).normal(size=(256, 256)).astype(np.float32)})
    a, b = check(index_dir, tmp_path)["files"]
    assert status_of(a, "near-duplicate-image") == "fail"
    assert b["status"] == "review" and "near-duplicate-image" not in [c["name"] for c in b["checks"] if c["status"] == "fail"]


def test_files_built_to_break_the_checker_fail_alone(dataset, index_dir, tmp_path):
    """Each fails on its own, the others are still checked, the report is written."""
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with open(tmp_path / "sparse.bin", "wb") as f:
        f.truncate(3 << 30)  # 3 GiB of nothing, over the bound below
    case = make.rows(dataset, make.CASE_CSV)[0]["CaseName"]
    (tmp_path / "wide.csv").write_text("a,b\n1,2\n3," + "x" * 200_000 + f"\n{case},5\n")
    make.confusion_matrix_csv(tmp_path / "z_confusion.csv")
    report = check(index_dir, tmp_path, max_file_bytes=1 << 30)
    by_path = {f["path"]: f for f in report["files"]}
    assert by_path["deep.json"]["status"] in ("pass", "review", "fail")  # no crash; typed as text
    assert status_of(by_path["sparse.bin"], "limits") == "fail"
    assert status_of(by_path["wide.csv"], "identifiers") == "fail"
    assert by_path["z_confusion.csv"]["status"] == "pass"


def _field(number: int, payload: bytes) -> bytes:
    """A protobuf length-delimited field (lengths < 128 here)."""
    return bytes([number << 3 | 2, len(payload)]) + payload


@pytest.mark.parametrize("fmt", ["legacy", "onnx", "keras"])
def test_other_model_formats_are_read_by_content(index_dir, tmp_path, fmt):
    if fmt == "legacy":
        import torch
        torch.save({"w": torch.zeros(64, 3, 7, 7)}, tmp_path / "weights.bin", _use_new_zipfile_serialization=False)
        expected = 64 * 3 * 7 * 7
    elif fmt == "onnx":  # ModelProto{ir_version 8, producer, graph{initializer{dims 64, 3, 7, 7; name}}}
        tensor = b"\x08\x40\x08\x03\x08\x07\x08\x07\x10\x01" + _field(8, b"conv1.weight")
        (tmp_path / "model.bin").write_bytes(b"\x08\x08" + _field(2, b"pytorch") + _field(7, _field(5, tensor)))
        expected = 64 * 3 * 7 * 7
    else:
        with zipfile.ZipFile(tmp_path / "model.bin", "w") as z:
            z.writestr("config.json", "{}")
            z.writestr("metadata.json", "{}")
            z.writestr("model.weights.h5", b"\x89HDF\r\n\x1a\n" + bytes(40_000 - 8))
        expected = 10_000
    entry = only(check(index_dir, tmp_path))
    assert entry["type"] == {"legacy": "pytorch-legacy", "onnx": "onnx", "keras": "keras"}[fmt]
    assert f"{expected} parameters" in reasons(entry, "model-parameters"), entry
    assert entry["status"] == "review"


def test_unknown_binary_is_reviewed_with_what_is_known(index_dir, tmp_path):
    (tmp_path / "blob.bin").write_bytes(os.urandom(5000))
    entry = only(check(index_dir, tmp_path))
    assert entry["status"] == "review" and "binary by content, 5000 bytes, entropy" in reasons(entry, "unknown-format")
