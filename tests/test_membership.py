"""Membership inference in the disclosure report (issue 23, Models): a submission's
m2d.toml declares predict(export_dir, images); the report job calls it in the
submission's image and the checker turns its answers into a loss-threshold attack
(m2d/disclosure/membership.py). The rules here; the stack's proof is
tests/test_disclosure_flow.py::test_a_memorising_predict_fails_its_model_on_the_stack."""
import hashlib
import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from m2d.contract.validation import Refusal, check_zip, parse_m2d_toml
from m2d.disclosure import membership
from m2d.disclosure.index import Index
from m2d.disclosure.report import Checker
from tests.helpers.disclosure_exports import fingerprint_index, synthetic_dataset

REPO = Path(__file__).resolve().parent.parent
FAIL_AUC, REVIEW_AUC = 0.8, 0.6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return synthetic_dataset(tmp_path_factory.mktemp("membership") / "clam")


@pytest.fixture(scope="module")
def index_dir(dataset, tmp_path_factory) -> Path:
    return fingerprint_index(dataset, tmp_path_factory.mktemp("index") / "idx")


@pytest.fixture(scope="module")
def plan(dataset) -> dict:
    return membership.plan(str(dataset), 100, mount=str(dataset))


def _labels(plan) -> dict[str, int]:
    return {item["path"]: item["label"] for item in plan["images"]}


# --- the attack's arithmetic --------------------------------------------------------------


def test_auc_is_by_rank_with_ties_counting_half():
    assert membership.auc([3, 2, 1], [0]) == 1.0
    assert membership.auc([0], [1, 2]) == 0.0
    assert membership.auc([1, 1], [1, 1, 1]) == 0.5
    # pairs: 1~1 half, 1>0, 1~1 half, 1>0, 2>1, 2>0: 5 of 6
    assert membership.auc([1, 1, 2], [1, 0]) == pytest.approx(5 / 6)
    with pytest.raises(ValueError):
        membership.auc([], [1])


SACROML_ORACLE = json.loads((REPO / "tests/data/sacroml/oracle.json").read_text())


@pytest.mark.parametrize("case", sorted(SACROML_ORACLE["cases"]))
def test_the_attack_auc_is_sacromls_on_the_same_predictions(case):
    """sacroml 2.0.1's metrics.get_metrics scored the loss-threshold attack on these very
    records (tests/data/sacroml/make_oracle.py ran it; sacroml is not a test dependency)."""
    found = SACROML_ORACLE["cases"][case]
    records = found["records"]
    the_plan = {"images": [{"path": f"/d/{i}.png", "split": "train" if r["member"] else "test",
                            "label": r["label"], "case": f"C{i}"} for i, r in enumerate(records)]}
    result = membership.evaluate(the_plan, [r["p"] for r in records])
    assert result["auc"] == pytest.approx(found["loss_threshold"]["AUC"], abs=1e-8)  # sacroml rounds to 8 places
    # SACRO-ML's worst-case attack (a forest learning what marks members, on held-out records) is
    # another attack: it sees the memorising model and nothing where there is nothing, as ours does
    worst = found["worst_case"]["mean_AUC"]
    if case == "memorising":
        assert result["auc"] > FAIL_AUC and worst > FAIL_AUC
    if case == "no signal":
        assert result["auc"] <= REVIEW_AUC and worst <= REVIEW_AUC


def test_loss_is_binary_cross_entropy_clipped():
    assert membership.loss(0.9, 1) == pytest.approx(-math.log(0.9))
    assert membership.loss(0.9, 0) == pytest.approx(-math.log(0.1))
    assert membership.loss(1.0, 0) == pytest.approx(-math.log(membership.EPS))  # finite


def test_the_plan_is_deterministic_per_split_and_bounded(dataset):
    first = membership.plan(str(dataset), 3)
    assert first == membership.plan(str(dataset), 3)
    splits = [item["split"] for item in first["images"]]
    assert splits.count("train") == 3 and splits.count("test") == 3
    assert all(item["path"].startswith("/mnt/dataset/CLaM-sample/") and item["label"] in (0, 1)
               for item in first["images"])


# --- what predict wrote, read as hostile ---------------------------------------------------


@pytest.mark.parametrize("raw, words", [
    (None, "wrote nothing"),
    (b"\xff\xfe", "not JSON"),
    (b"[0.5, 0.5]", "not a JSON object"),
    (b'{"predictions": "0.5"}', "no list"),
    (b'{"predictions": [0.5]}', "1 values for 2 images"),
    (b'{"predictions": [0.5, "0.5"]}', "value 2 is not a number"),
    (b'{"predictions": [0.5, true]}', "value 2 is not a number"),
    (b'{"predictions": [NaN, 0.5]}', "value 1 is not a number"),
    (b'{"predictions": [Infinity, 0.5]}', "value 1 is not a number"),
    (b'{"predictions": [0.5, [0.5]]}', "value 2 is not a number"),
    (b'{"predictions": [0.5, 1.5]}', "not a probability"),
    (b'{"predictions": [-0.1, 0.5]}', "not a probability"),
    (b'{"error": "ValueError: \\u0000\\u001b[31mboom"}', "predict raised ValueError: ??[31mboom"),
    (b"[" * 100_000, "not JSON"),
    (b" " * (membership.MAX_OUTPUT_BYTES + 1), "more than"),
])
def test_hostile_predictions_are_refused_with_why(raw, words):
    with pytest.raises(membership.BadOutput) as refused:
        membership.read_predictions(raw, 2)
    assert words in str(refused.value)


def test_read_bounded_never_follows_a_link_and_stops_past_the_bound(tmp_path):
    (tmp_path / "secret").write_text("{}")
    (tmp_path / "link").symlink_to(tmp_path / "secret")
    assert membership.read_bounded(str(tmp_path / "link")) is None
    (tmp_path / "big").write_bytes(b"x" * (membership.MAX_OUTPUT_BYTES + 100))
    assert len(membership.read_bounded(str(tmp_path / "big"))) == membership.MAX_OUTPUT_BYTES + 1


# --- the status rules ---------------------------------------------------------------------


def _result(auc, member_cases=8, non_member_cases=8, **more):
    return {"auc": auc, "members": 30, "non_members": 20, "member_cases": member_cases,
            "non_member_cases": non_member_cases, "test_accuracy": 0.75, "test_auc": 0.7,
            "worst_cases": ["S1-A1", "S3-A1"], **more}


@pytest.mark.parametrize("auc, wanted", [(0.95, "fail"), (0.81, "fail"), (0.8, "review"), (0.61, "review"),
                                         (0.6, "pass"), (0.5, "pass"), (0.1, "pass")])
def test_the_status_follows_the_sites_auc_thresholds(auc, wanted):
    status, reason = membership.status(_result(auc), FAIL_AUC, REVIEW_AUC, 2)
    assert status == wanted
    assert f"AUC {auc:.3f}" in reason and "held-out AUC 0.700" in reason and "accuracy at 0.5 0.750" in reason
    assert "30 member images (8 cases" in reason and "20 non-member images (8 cases" in reason
    assert "S1-A1, S3-A1" in reason  # the reviewer sees the worst cases by name


def test_too_few_cases_on_a_side_is_review_saying_so():
    status, reason = membership.status(_result(0.99, non_member_cases=1), FAIL_AUC, REVIEW_AUC, 2)
    assert status == "review" and "too few cases" in reason and "at least 2" in reason
    assert membership.status(_result(0.99, non_member_cases=2), FAIL_AUC, REVIEW_AUC, 2)[0] == "fail"
    no_side = {"members": 4, "non_members": 0, "member_cases": 2, "non_member_cases": 0}
    assert membership.status(no_side, FAIL_AUC, REVIEW_AUC, 0)[0] == "review"


@pytest.mark.parametrize("original, copy, wanted", [
    (0.55, 0.85, "fail"),  # what leaves tells its training cases apart: it fails whatever the original scored
    (0.9, 0.5, "fail"),  # a predict that answers differently on the rounded view cannot lower the verdict
    (0.7, 0.65, "review"), (0.5, 0.55, "pass"),
])
def test_the_attack_on_the_released_copy_is_reported_beside_the_originals_and_the_larger_decides(
        original, copy, wanted):
    status, reason = membership.status(_result(original), FAIL_AUC, REVIEW_AUC, 2, rounded=_result(copy))
    assert status == wanted
    assert f"AUC {original:.3f} as written; on the released (rounded) copy AUC {copy:.3f}" in reason
    assert membership.attack(_result(original), _result(copy)) == {
        "original": {"auc": original, "members": 30, "non_members": 20, "member_cases": 8, "non_member_cases": 8},
        "rounded": {"auc": copy, "members": 30, "non_members": 20, "member_cases": 8, "non_member_cases": 8}}


def test_predict_failing_on_the_released_copy_leaves_the_originals_verdict_and_says_so():
    failed = {"error": "predict raised ValueError: the model lost its weights"}
    status, reason = membership.status(_result(0.85), FAIL_AUC, REVIEW_AUC, 2, rounded=failed)
    assert status == "fail" and "not measured on the released (rounded) copy: predict raised ValueError" in reason
    assert membership.status(_result(0.5), FAIL_AUC, REVIEW_AUC, 2, rounded=failed)[0] == "pass"
    assert membership.attack(_result(0.85), failed)["rounded"] == failed
    assert membership.attack(_result(0.85), None)["rounded"] is None


def test_an_error_is_review_never_pass():
    status, reason = membership.status({"error": "predict raised KeyError: 'x'"}, FAIL_AUC, REVIEW_AUC, 2)
    assert status == "review" and "KeyError" in reason


def test_a_timed_out_step_is_review_whatever_it_wrote(plan):
    perfect = json.dumps({"predictions": [0.5] * len(plan["images"])}).encode()
    result = membership.run(plan, perfect, 124, 600)
    assert result == {"error": "predict did not finish within its time limit of 600 s"}


# --- fake predicts, through the predict step as the report job runs it ----------------------

MEMORISING = """\
import json, os

def predict(export_dir, images):
    remembered = json.load(open(os.path.join(export_dir, "seen.json")))
    return [remembered.get(path, 0.5) for path in images]
"""
CONSTANT = "def predict(export_dir, images):\n    return [0.5 for _ in images]\n"
CRASHING = "def predict(export_dir, images):\n    raise RuntimeError('no model in ' + export_dir)\n"
SHORT = "def predict(export_dir, images):\n    return [0.5]\n"
STRINGS = "def predict(export_dir, images):\n    return ['malignant' for _ in images]\n"
EXITING = "import os\n\ndef predict(export_dir, images):\n    os._exit(0)\n"
HANGING = "import time\n\ndef predict(export_dir, images):\n    time.sleep(60)\n"


def _predict_step(tmp_path, plan, source, timeout=60):
    """`python -m m2d.disclosure membership` as the report job runs it, in a
    process of its own, then what the checker makes of its output."""
    code, export = tmp_path / "code", tmp_path / "export"
    code.mkdir(exist_ok=True)
    export.mkdir(exist_ok=True)
    (code / "main.py").write_text(source)
    train = {p: float(label) for p, label in _labels(plan).items()
             if any(i["path"] == p and i["split"] == "train" for i in plan["images"])}
    (export / "seen.json").write_text(json.dumps(train))
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "membership.json"
    out.unlink(missing_ok=True)
    done = subprocess.run(["timeout", str(timeout), sys.executable, "-m", "m2d.disclosure", "membership",
                           "--plan", str(tmp_path / "plan.json"), "--code", str(code), "--entry", "main:predict",
                           "--export", str(export), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    result = membership.run(plan, membership.read_bounded(str(out)), done.returncode, timeout)
    return result, membership.status(result, FAIL_AUC, REVIEW_AUC, 2)


def test_a_predict_that_memorises_its_training_cases_fails(tmp_path, plan):
    result, (status, reason) = _predict_step(tmp_path, plan, MEMORISING)
    assert status == "fail", reason
    assert result["auc"] > 0.8 and result["member_cases"] == 8 and result["non_member_cases"] == 2
    assert "training cases furthest below the test losses' median: S" in reason


def test_a_constant_predict_passes_with_auc_one_half(tmp_path, plan):
    result, (status, reason) = _predict_step(tmp_path, plan, CONSTANT)
    assert status == "pass" and result["auc"] == 0.5, reason
    assert result["worst_cases"] == []


@pytest.mark.parametrize("source, words", [
    (CRASHING, "predict raised RuntimeError: no model in"),
    (SHORT, "predict returned 1 values for"),
    (STRINGS, "is not a number ('str')"),
    (EXITING, "wrote nothing"),
])
def test_a_predict_that_crashes_or_answers_wrongly_is_review(tmp_path, plan, source, words):
    _result, (status, reason) = _predict_step(tmp_path, plan, source)
    assert status == "review" and words in reason, reason


def test_a_predict_that_hangs_is_stopped_and_review(tmp_path, plan):
    _result, (status, reason) = _predict_step(tmp_path, plan, HANGING, timeout=1)
    assert status == "review" and "time limit of 1 s" in reason, reason


# --- the report: which files get the check -------------------------------------------------


def test_the_membership_check_goes_on_top_level_model_files(index_dir, tmp_path):
    import numpy as np

    from tests.helpers import checkpoints
    export = tmp_path / "export"
    (export / "inner").mkdir(parents=True)
    checkpoints.torch_zip({"w": np.zeros((2, 2), np.float32)}, export / "model.pt")
    checkpoints.torch_zip({"w": np.zeros((2, 2), np.float32)}, export / "inner" / "copy.pt")
    (export / "metrics.json").write_text('{"auc": 0.7}')
    verdict = ("fail", "loss-threshold attack AUC 0.950")
    report = Checker(Index.load(index_dir), membership=verdict).run(export)
    files = {f["path"]: f for f in report["files"]}
    assert [c for c in files["model.pt"]["checks"] if c["name"] == "membership"] == [
        {"name": "membership", "status": "fail", "reason": "loss-threshold attack AUC 0.950"}]
    assert files["model.pt"]["status"] == "fail"
    assert not any(c["name"] == "membership" for c in files["metrics.json"]["checks"])
    assert not any(c["name"] == "membership" for c in files["inner/copy.pt"]["checks"])


def test_an_archive_holding_a_model_is_a_model_file_for_the_membership_check(index_dir, tmp_path):
    import numpy as np

    from tests.helpers import checkpoints
    export = tmp_path / "export"
    export.mkdir()
    model = checkpoints.torch_zip({"w": np.zeros((2, 2), np.float32)}, tmp_path / "model.pt")
    with zipfile.ZipFile(export / "models.zip", "w") as archive:
        archive.write(model, "model.pt")
    (export / "metrics.json").write_text('{"auc": 0.7}')
    report = Checker(Index.load(index_dir), membership=("review", "AUC 0.7")).run(export)
    files = {f["path"]: f for f in report["files"]}
    assert {"name": "membership", "status": "review", "reason": "AUC 0.7"} in files["models.zip"]["checks"]
    assert not any(c["name"] == "membership" for c in files["metrics.json"]["checks"])


def test_without_a_model_file_every_top_level_file_gets_the_check(index_dir, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "seen.json").write_text('{"x": 1}')
    report = Checker(Index.load(index_dir), membership=("review", "too few cases")).run(export)
    (entry,) = report["files"]
    assert {"name": "membership", "status": "review", "reason": "too few cases"} in entry["checks"]


def test_no_entry_point_no_membership_check(index_dir, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "seen.json").write_text('{"x": 1}')
    (entry,) = Checker(Index.load(index_dir)).run(export)["files"]
    assert not any(c["name"] == "membership" for c in entry["checks"])


def test_the_report_cli_runs_the_attack_from_the_plan_and_the_output(dataset, index_dir, tmp_path, plan):
    """The report step as the job runs it: the plan and membership.json in, a fail on the model."""
    mounted = membership.plan(str(dataset), 100, mount=str(dataset))
    (tmp_path / "plan.json").write_text(json.dumps(mounted))
    labels = [i["label"] if i["split"] == "train" else 0.5 for i in mounted["images"]]
    (tmp_path / "membership.json").write_text(json.dumps({"predictions": labels}))
    export = tmp_path / "export"
    export.mkdir()
    (export / "seen.json").write_text("{}")
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "m2d.disclosure", "report", "--index", str(index_dir),
                           "--export", str(export), "--out", str(out),
                           "--membership-plan", str(tmp_path / "plan.json"),
                           "--membership", str(tmp_path / "membership.json"), "--membership-exit", "0",
                           "--mia-min-cases", "2"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    (entry,) = json.loads(out.read_text())["files"]
    (check,) = [c for c in entry["checks"] if c["name"] == "membership"]
    assert check["status"] == "fail" and "AUC 1.000" in check["reason"], check
    members = sum(1 for i in mounted["images"] if i["split"] == "train")
    assert entry["membership"] == {"original": {"auc": 1.0, "members": members,
                                                "non_members": len(mounted["images"]) - members, "member_cases": 8,
                                                "non_member_cases": 2}, "rounded": None}
    # no model file to round (the job's view rounded nothing, predict did not run again): what leaves is
    # what predict saw, so there is no second attack, and nothing says it failed
    (tmp_path / "view.json").write_text(json.dumps({"version": 1, "mantissa_bits": 7, "rounded": {},
                                                    "as_written": {}}))
    done = subprocess.run([sys.executable, "-m", "m2d.disclosure", "report", "--index", str(index_dir),
                           "--export", str(export), "--out", str(out), "--sanitise-bits", "7",
                           "--membership-plan", str(tmp_path / "plan.json"),
                           "--membership", str(tmp_path / "membership.json"), "--membership-exit", "0",
                           "--rounded-view", str(tmp_path / "view.json"), "--rounded-exit", "skipped",
                           "--mia-min-cases", "2"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    (entry,) = json.loads(out.read_text())["files"]
    (check,) = [c for c in entry["checks"] if c["name"] == "membership"]
    assert "rounded" not in check["reason"] and entry["membership"]["rounded"] is None, check
    # a plan that could not be made: review, and still a report
    done = subprocess.run([sys.executable, "-m", "m2d.disclosure", "report", "--index", str(index_dir),
                           "--export", str(export), "--out", str(out), "--membership-plan", str(tmp_path / "none"),
                           "--membership-exit", "plan"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (check,) = [c for c in json.loads(out.read_text())["files"][0]["checks"] if c["name"] == "membership"]
    assert check["status"] == "review" and "plan" in check["reason"]


# --- the rounded (released) model's held-out metric beside the original's --------------------

MAX_DROP = 0.05


def _held(test_auc, accuracy=0.75, **more):
    return {"auc": 0.5, "members": 30, "non_members": 20, "member_cases": 8, "non_member_cases": 8,
            "test_accuracy": accuracy, "worst_cases": [], **({"test_auc": test_auc} if test_auc is not None else {}),
            **more}


@pytest.mark.parametrize("before, after, wanted", [
    (0.80, 0.80, "pass"), (0.80, 0.76, "pass"), (0.80, 0.75, "pass"), (0.80, 0.85, "pass"),
    (0.80, 0.7499, "review"), (0.80, 0.50, "review"),
])
def test_the_rounded_copys_held_out_auc_within_the_sites_drop_passes_else_review(before, after, wanted):
    status, reason, held_out = membership.compare(_held(before), _held(after, 0.70), MAX_DROP)
    assert status == wanted, reason
    assert held_out["original"] == {"auc": before, "accuracy": 0.75, "images": 20}
    assert held_out["rounded"] == {"auc": after, "accuracy": 0.70, "images": 20}
    assert held_out["auc_drop"] == pytest.approx(before - after)
    assert held_out["accuracy_drop"] == pytest.approx(0.05) and held_out["max_auc_drop"] == MAX_DROP
    assert f"held-out AUC {before:.3f} as written, {after:.3f} rounded" in reason
    assert "accuracy at 0.5 0.750 as written, 0.700 rounded" in reason
    if wanted == "review":
        assert "the released (rounded) model is worse on the held-out cases" in reason


def test_with_one_label_among_the_held_out_images_accuracy_is_compared():
    status, reason, held_out = membership.compare(_held(None, 0.9), _held(None, 0.8), MAX_DROP)
    assert status == "review" and held_out["auc_drop"] is None and "accuracy compared" in reason
    assert held_out["accuracy_drop"] == pytest.approx(0.1) and "held-out AUC undefined as written" in reason
    assert membership.compare(_held(None, 0.9), _held(None, 0.9), MAX_DROP)[0] == "pass"


def test_predict_failing_on_the_rounded_copy_or_on_the_original_is_review_never_pass():
    status, reason, held_out = membership.compare(_held(0.8), {"error": "predict raised KeyError: 'w'"}, MAX_DROP)
    assert status == "review" and "predict failed on the rounded copy" in reason and "KeyError" in reason
    assert held_out["original"]["auc"] == 0.8 and held_out["rounded"]["auc"] is None
    status, reason, _ = membership.compare({"error": "predict did not finish"}, _held(0.8), MAX_DROP)
    assert status == "review" and "not compared" in reason and "did not finish" in reason


def test_the_check_goes_on_files_that_leave_as_their_copy_and_only_for_the_bytes_predict_saw(index_dir, tmp_path):
    import numpy as np

    from tests.helpers import checkpoints
    export = tmp_path / "export"
    export.mkdir()
    model = checkpoints.torch_zip({"w": np.ones((2, 2), np.float32)}, export / "model.pt")
    checkpoints.torch_zip({"w": np.zeros((2, 2), np.float32)}, export / "other.pt")
    (export / "metrics.json").write_text('{"auc": 0.7}')
    held_out = {"original": {"auc": 0.8}, "rounded": {"auc": 0.79}}
    asked = {"model.pt": hashlib.sha256(model.read_bytes()).hexdigest(), "other.pt": "0" * 64}
    report = Checker(Index.load(index_dir), sanitise_bits=7, report_dir=tmp_path,
                     sanitised_metric=("pass", "within 0.05", held_out, asked)).run(export)
    files = {f["path"]: f for f in report["files"]}
    assert {"name": "sanitised-metric", "status": "pass", "reason": "within 0.05"} in files["model.pt"]["checks"]
    assert files["model.pt"]["sanitised"]["held_out"] == held_out
    (other,) = [c for c in files["other.pt"]["checks"] if c["name"] == "sanitised-metric"]
    assert other["status"] == "review" and "not asked about this file's rounded copy" in other["reason"]
    assert "held_out" not in files["other.pt"]["sanitised"]
    assert not any(c["name"] == "sanitised-metric" for c in files["metrics.json"]["checks"])
    names = [c["name"] for c in files["model.pt"]["checks"]]  # beside the sanitise line, wherever it is shown
    assert names[names.index("sanitise") + 1] == "sanitised-metric"


# A researcher's predict would torch.load the model; this one reads the same PyTorch zip
# with the checker's own reader (importing torch is 2.5 s of a CPU, twice a test).
ROUNDING_SENSITIVE = """\
import json, os
from m2d.disclosure import sanitise

def predict(export_dir, images):
    saved = sanitise.load(os.path.join(export_dir, "model.pt")).tensors
    classes = json.load(open(os.path.join(export_dir, "meta", "classes.json")))
    assert classes == ["benign", "malignant"], classes
    scores = sanitise.as_float64(saved["scores"]).tolist()
    if BREAKS_WHEN_ROUNDED and len(set(scores)) == 1:
        raise ValueError("the model lost its weights")
    return [scores[i] for i in range(len(images))]
"""


def _job_as_the_report_job_runs_it(tmp_path, dataset, index_dir, scores, breaks=False) -> dict:
    """The report job's steps without apptainer: plan, predict, rounded-view,
    predict on the view, report; the model file's entry."""
    import numpy as np

    from tests.helpers import checkpoints
    the_plan = membership.plan(str(dataset), 100, mount=str(dataset))
    export, code = tmp_path / "export", tmp_path / "code"
    (export / "meta").mkdir(parents=True)
    code.mkdir()
    (export / "meta" / "classes.json").write_text('["benign", "malignant"]')
    checkpoints.torch_zip({"scores": np.array([scores(item) for item in the_plan["images"]], np.float32)},
                          export / "model.pt")
    (code / "main.py").write_text(ROUNDING_SENSITIVE.replace("BREAKS_WHEN_ROUNDED", str(breaks)))
    (tmp_path / "plan.json").write_text(json.dumps(the_plan))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "m2d.disclosure", *map(str, args)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    def predict(export_dir, scratch):
        scratch.mkdir()
        return run("membership", "--plan", tmp_path / "plan.json", "--code", code, "--entry", "main:predict",
                   "--export", export_dir, "--out", scratch / "membership.json").returncode

    assert predict(export, tmp_path / "scratch") == 0
    (tmp_path / "rounded" / "view").mkdir(parents=True)
    made = run("rounded-view", "--export", export, "--view", tmp_path / "rounded" / "view", "--link-to", export,
               "--sanitise-bits", 7, "--manifest", tmp_path / "rounded" / "view.json")
    assert made.returncode == 0, made.stderr
    rounded_exit = predict(tmp_path / "rounded" / "view", tmp_path / "scratch-rounded")
    (tmp_path / "report").mkdir()
    done = run("report", "--index", index_dir, "--export", export, "--out", tmp_path / "report" / "report.json",
               "--sanitise-bits", 7, "--membership-plan", tmp_path / "plan.json",
               "--membership", tmp_path / "scratch" / "membership.json", "--membership-exit", 0,
               "--rounded-view", tmp_path / "rounded" / "view.json",
               "--rounded-membership", tmp_path / "scratch-rounded" / "membership.json",
               "--rounded-exit", rounded_exit, "--sanitised-max-auc-drop", MAX_DROP, "--mia-min-cases", 2,
               "--acro-out", tmp_path / "report" / "acro.json")
    assert done.returncode in (0, 3), done.stderr
    files = {f["path"]: f for f in json.loads((tmp_path / "report" / "report.json").read_text())["files"]}
    view = json.loads((tmp_path / "rounded" / "view.json").read_text())
    assert view["rounded"] == {"model.pt": files["model.pt"]["sha256"]}
    assert (tmp_path / "rounded" / "view" / "meta").is_dir()  # folders are folders, files links to the export
    assert (tmp_path / "rounded" / "view" / "meta" / "classes.json").readlink() == export / "meta" / "classes.json"
    return files["model.pt"]


def test_a_model_that_rounding_keeps_passes_with_both_metrics_in_the_report(tmp_path, dataset, index_dir):
    entry = _job_as_the_report_job_runs_it(tmp_path, dataset, index_dir,
                                           lambda item: 0.8 if item["label"] else 0.2)
    (check,) = [c for c in entry["checks"] if c["name"] == "sanitised-metric"]
    assert check["status"] == "pass", check
    held_out = entry["sanitised"]["held_out"]
    assert held_out["original"]["accuracy"] == held_out["rounded"]["accuracy"] == 1.0
    assert held_out["accuracy_drop"] == 0 and held_out["max_auc_drop"] == MAX_DROP
    assert "held-out accuracy at 0.5 1.000 as written, 1.000 rounded" in check["reason"]


def test_the_report_keeps_the_attack_on_the_original_and_on_the_released_copy(tmp_path, dataset, index_dir):
    """A model that remembers its training cases (confident and right on them only):
    rounding keeps that, so the attack on what leaves finds them as well."""
    entry = _job_as_the_report_job_runs_it(
        tmp_path, dataset, index_dir,
        lambda item: (0.99 if item["label"] else 0.01) if item["split"] == "train" else 0.5)
    (check,) = [c for c in entry["checks"] if c["name"] == "membership"]
    assert check["status"] == "fail", check
    assert "AUC 1.000 as written; on the released (rounded) copy AUC 1.000" in check["reason"]
    attack = entry["membership"]
    assert attack["original"]["auc"] == attack["rounded"]["auc"] == 1.0
    assert attack["rounded"]["members"] == attack["original"]["members"] > 0


def test_a_model_whose_skill_lies_in_the_low_bits_is_reviewed_as_worse_when_released(tmp_path, dataset, index_dir):
    """Its held-out answers differ only below the 7th mantissa bit: rounded, they are all alike."""
    entry = _job_as_the_report_job_runs_it(tmp_path, dataset, index_dir,
                                           lambda item: 0.5 + (1e-6 if item["label"] else -1e-6))
    (check,) = [c for c in entry["checks"] if c["name"] == "sanitised-metric"]
    assert check["status"] == "review" and "the released (rounded) model is worse" in check["reason"], check
    held_out = entry["sanitised"]["held_out"]
    assert held_out["original"]["accuracy"] == 1.0 and held_out["rounded"]["accuracy"] < 1.0
    assert entry["status"] != "pass"


def test_predict_failing_on_the_rounded_model_is_reviewed(tmp_path, dataset, index_dir):
    entry = _job_as_the_report_job_runs_it(tmp_path, dataset, index_dir,
                                           lambda item: 0.5 + (1e-6 if item["label"] else -1e-6), breaks=True)
    (check,) = [c for c in entry["checks"] if c["name"] == "sanitised-metric"]
    assert check["status"] == "review", check
    assert "predict failed on the rounded copy" in check["reason"] and "lost its weights" in check["reason"]


# --- m2d.toml at upload ----------------------------------------------------------------------


def _zip(tmp_path, toml: str | bytes) -> Path:
    path = tmp_path / "s.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("main.py", "print(1)\n")
        z.writestr("requirements.txt", "")
        z.writestr("m2d.toml", toml)
    return path


def test_m2d_toml_declares_the_entry_point_at_upload(tmp_path):
    assert check_zip(_zip(tmp_path, '[disclosure]\npredict = "models.net:predict"\n')).predict == "models.net:predict"
    assert check_zip(_zip(tmp_path, "# nothing declared\n")).predict is None
    assert parse_m2d_toml("[disclosure]\n") is None


@pytest.mark.parametrize("text, words", [
    ("[disclosure]\npredict = 3\n", "[disclosure] predict is '3'"),
    ('[disclosure]\npredict = "main"\n', "[disclosure] predict is 'main'"),
    ('[disclosure]\npredict = "main:predict; import os"\n', "not 'module:function'"),
    ('[disclosure]\npreddict = "main:predict"\n', "unknown key 'preddict'"),
    ('predict = "main:predict"\n', "unknown table or key 'predict'"),
    ('disclosure = "main:predict"\n', "'disclosure' must be a table"),
    ("[disclosure\n", "not valid TOML"),
    (b"\xff", "not UTF-8"),
])
def test_a_malformed_m2d_toml_is_refused_naming_the_key(tmp_path, text, words):
    with pytest.raises(Refusal) as refused:
        check_zip(_zip(tmp_path, text))
    assert refused.value.code == "bad_m2d_toml" and words in refused.value.message
    assert 'predict = "main:predict"' in refused.value.message  # how to fix it


def test_the_clam_sample_declares_predict_and_it_answers_for_every_image(dataset, tmp_path, monkeypatch):
    """The hospital's sample: m2d.toml names main:predict, which loads model.tar
    (here untrained) from the export and gives a probability per image."""
    import types

    import torch

    for name in ("mlflow", "sklearn", "sklearn.metrics"):  # its image has them; predict uses neither
        try:
            __import__(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.accuracy_score = stub.cohen_kappa_score = stub.f1_score = stub.roc_auc_score = None
            monkeypatch.setitem(sys.modules, name, stub)

    sample = REPO / "m2d" / "samples" / "clam"
    assert parse_m2d_toml((sample / "m2d.toml").read_text()) == "main:predict"
    sys.path.insert(0, str(sample))
    try:
        import main as clam
    finally:
        sys.path.remove(str(sample))
        sys.modules.pop("main", None)
    model = clam.ResNet18()
    model.fc = torch.nn.Linear(512, 2)
    export = tmp_path / "export"
    export.mkdir()
    torch.save({"model": "resnet18", "classes": clam.CLASSES, "input_size": [64, 80],
                "state_dict": model.state_dict()}, export / "model.tar")
    images = [i["path"] for i in membership.plan(str(dataset), 3, mount=str(dataset))["images"]]
    answers = clam.predict(str(export), images)
    assert len(answers) == 6 and all(0.0 <= p <= 1.0 for p in answers)
