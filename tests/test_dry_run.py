"""Dry runs through the real stack: every submission runs first on the synthetic
twin of CLaM (of the dataset's version, M2D_TWIN_DIR/<version>) with its whole
log shown, and only a dry run that exits 0 lets the real job go to Slurm.

Seven Slurm jobs in all (the machine is small): a crash (dry run only), iris
and the CLaM sample (dry run + real run each), and code that fails only on the
real data (both). The CLaM sample goes the researcher's way, through the m2d
command line (submit, wait, status, export); the others through the API."""
import csv
import html
import json
import re
from datetime import datetime, timezone

import pytest
import requests

from gateway.adapters.slurm.cli_scheduler import CliScheduler
from m2d.contract import twin

from .helpers.client import m2d_as as m2d
from .helpers.experiments import metric_history, metrics_in, runs_in
from .helpers.stack import SAMPLES, zip_folder

FINAL = {"completed", "failed", "build_failed", "dry_run_failed", "cancelled"}

# Crashes on the first batch, 40 frames deep: far more than the real run's
# 20-line stderr tail, all of which the researcher needs.
CRASHES = '''import csv
rows = list(csv.DictReader(open("/mnt/dataset/clam-details-image.csv")))
print("m2d test: read", len(rows), "image rows; columns", ",".join(rows[0]))

# 40 layers, each its own frame (Python folds a repeated one)
source = "".join(f"def layer{i}(batch):\\n    return layer{i + 1}(batch)\\n" for i in range(40))
source += "def layer40(batch):\\n    raise ValueError(f'm2d test: first batch of {len(batch)} has the wrong shape')\\n"
exec(source)
layer0(rows[:4])
'''

# Behaves differently on the real data: fine where M2D_DRY_RUN=1, 300 lines
# of stderr and a failure where it is unset.
REAL_ONLY_FAILS = '''import os, sys
if os.environ.get("M2D_DRY_RUN") == "1":
    print("m2d test: dry run, one short epoch")
    sys.exit(0)
for i in range(300):
    print(f"m2d test: real line {i:03d}", file=sys.stderr)
sys.exit(4)
'''


def slurm_job_named(name, since):
    """The job Slurm has (squeue) or had (sacct) under ``name``, or None."""
    return CliScheduler().find(name, since=since)


def twin_of(stack, submission):
    """The twin the submission's dry run was bound to (the gateway's TWIN_DIR/<version>)."""
    root = stack.env.get("M2D_TWIN_DIR") or stack.root / "data" / "twins"
    return twin.path(root, submission["dataset_version"])


def _since(submission):
    return datetime.fromisoformat(submission["created_at"]).astimezone(timezone.utc)


PASSWORD = "dry-run-page-password"


@pytest.fixture(scope="module")
def researcher(stack):
    return stack.researcher("dryrun", password=PASSWORD)


def page_of(stack, researcher, submission_id):
    """The submission's page as its owner's browser gets it (logged in with the password)."""
    browser = requests.Session()
    form = browser.get(f"{stack.url}/login", timeout=30).text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
    logged_in = browser.post(f"{stack.url}/login", timeout=30, data={
        "csrf_token": csrf, "email": researcher.address, "password": PASSWORD})
    assert logged_in.ok and "/login" not in logged_in.url, logged_in.text
    return html.unescape(browser.get(f"{stack.url}/submissions/{submission_id}", timeout=30).text)


@pytest.fixture(scope="module")
def submitted(stack, researcher, tmp_path_factory):
    """All four submitted at once (their jobs overlap); the three of the API
    followed to the end, the CLaM sample's id (its test waits with `m2d wait`)."""
    folder = tmp_path_factory.mktemp("dryrun")
    # torch, numpy, Pillow, scikit-learn: its image is the slow part, so it goes first
    clam = m2d(researcher, "submit", SAMPLES / "clam", "--json")
    assert clam.returncode == 0, clam.stdout + clam.stderr
    ids = {
        "crashes": researcher.submit(zip_folder(SAMPLES / "iris", folder / "crashes.zip",
                                                extra={"main.py": CRASHES})),
        "iris": researcher.submit(zip_folder(SAMPLES / "iris", folder / "iris.zip")),
        "real-only": researcher.submit(zip_folder(SAMPLES / "iris", folder / "real.zip",
                                                  extra={"main.py": REAL_ONLY_FAILS})),
    }
    return {"clam": json.loads(clam.stdout)["id"],
            **{name: researcher.wait_until(sid, FINAL, timeout=1800) for name, sid in ids.items()}}


def test_a_crash_on_the_first_batch_ends_as_dry_run_failed_with_the_whole_traceback(
        stack, researcher, submitted):
    result = submitted["crashes"]
    assert result["status"] == "dry_run_failed", result
    assert result["exit_code"] == 1 and result["reason"] == "dry run FAILED with exit code 1"
    assert [e["status"] for e in result["events"]] == [
        "received", "building", "dry_run_queued", "dry_run_running", "dry_run_failed"]
    log = result["dry_run"]["log"]
    assert result["error"] == log
    # the whole traceback: its first line, all 40 frames, the error; the real
    # run would show 20 lines
    assert "Traceback (most recent call last):" in log
    assert all(f"in layer{i}\n" in log for i in range(41))
    assert "ValueError: m2d test: first batch of 4 has the wrong shape" in log
    assert len(log.splitlines()) > 2 * stack_tail_lines()
    # the twin of the dataset's version, with CLaM's layout and columns
    assert result["dataset_version"] == stack.env.get("M2D_DATASET_VERSION", twin.DEFAULT_VERSION)
    with open(twin_of(stack, result) / "clam-details-image.csv") as f:
        columns = ",".join(next(csv.reader(f)))
    assert f"columns {columns}" in log

    mails = researcher.wait_for_mails(result["id"], 2)
    assert [m["Subject"].split(": ", 1)[1] for m in mails] == ["code received", "dry run failed"]
    body = mails[-1].get_content().replace("\r\n", "\n")
    assert all(f"in layer{i}\n" in body for i in range(41))
    assert "Traceback (most recent call last):" in body and "wrong shape" in body
    page = page_of(stack, researcher, result["id"])
    assert all(f"in layer{i}\n" in page for i in range(41)) and "wrong shape" in page
    # both open on the exception it ended on, before the whole log; no real job will come
    ended = "ValueError: m2d test: first batch of 4 has the wrong shape"
    assert result["dry_run"]["headline"] == ended
    assert body.index(ended) < body.index("Traceback (most recent call last):")
    assert page.index(f"It ended on <code>{ended}</code>") < page.index("Traceback (most recent call last):")
    assert "none: the dry run failed, so the real job will not be submitted" in page
    assert "Dataset version" in page and result["dataset_version"] in page

    # Slurm's own records: the dry run ran, the real job never existed
    prefix = stack.env["M2D_SLURM_JOB_PREFIX"]
    assert slurm_job_named(f"{prefix}-{result['id']}-dry", _since(result)) == result["dry_run"]["slurm_job_id"]
    assert slurm_job_named(f"{prefix}-{result['id']}", _since(result)) is None
    assert result["slurm_job_id"] is None


def stack_tail_lines():
    return 20  # STDERR_TAIL_LINES, the real run's cap (gateway/config.py)


def test_iris_passes_its_dry_run_then_completes_with_metrics_in_both_experiments(
        stack, researcher, submitted):
    result = submitted["iris"]
    assert result["status"] == "completed", result
    assert [e["status"] for e in result["events"]] == [
        "received", "building", "dry_run_queued", "dry_run_running", "dry_run_passed",
        "queued", "running", "completed"]
    dry = result["dry_run"]
    assert dry["exit_code"] == 0 and dry["reason"] == "COMPLETED"
    assert dry["slurm_job_id"] != result["slurm_job_id"]
    assert "done: accuracy 1.0 dataset-exists 1" in dry["log"]
    assert dry["export"] == [{"path": "result.txt", "size": 13, "text": "accuracy=1.0\n"}]
    mails = researcher.wait_for_mails(result["id"], 4)
    assert [m["Subject"].split(": ", 1)[1] for m in mails] == [
        "code received", "queued for execution", "execution started", "execution finished"]

    account = researcher.me()["mlflow"]
    assert {"accuracy": 1.0, "dataset-exists": 1.0} in metrics_in(account["experiment_name"])
    assert {"accuracy": 1.0, "dataset-exists": 1.0} in metrics_in(account["experiment_name"] + "-dryrun")

    # the provenance chain names the dry run's job and its run in the dry-run experiment, before the real job's
    chain = researcher.api("GET", f"/submissions/{result['id']}/provenance").json()
    link = {r["kind"]: r["payload"] for r in chain["records"]}
    assert chain["verified"]
    assert link["dry_run_job"]["slurm_job_id"] == dry["slurm_job_id"] and link["dry_run_job"]["outcome"] == "dry_run_passed"
    assert link["dry_run_job"]["dataset"] == "synthetic twin"
    assert len(link["dry_run_mlflow"]["run_ids"]) == 1
    assert link["dry_run_mlflow"]["experiment_id"] != link["mlflow"]["experiment_id"]


def test_the_clam_sample_submitted_and_followed_with_m2d_trains_on_the_data_with_its_metrics_in_the_users_experiment(
        stack, researcher, submitted):
    submission_id = submitted["clam"]
    waited = m2d(researcher, "wait", submission_id, "--timeout", 1800, timeout=1860)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert f"#{submission_id}" in waited.stdout and "completed" in waited.stdout.splitlines()[-1]
    shown = m2d(researcher, "status", submission_id, "--json")
    assert shown.returncode == 0, shown.stderr
    result = json.loads(shown.stdout)
    assert result["status"] == "completed" and result["exit_code"] == 0, result
    assert [e["status"] for e in result["events"]] == [
        "received", "building", "dry_run_queued", "dry_run_running", "dry_run_passed",
        "queued", "running", "completed"]
    dry = result["dry_run"]
    assert dry["exit_code"] == 0 and "1 epochs (dry run)" in dry["log"] and "saved /mnt/export/model.tar" in dry["log"]
    assert {f["path"] for f in dry["export"]} == {"model.tar", "metrics.json"}

    # the trained model, as the researcher sees their export: counted, held until reviewed
    exported = m2d(researcher, "export", submission_id, "--json")
    assert exported.returncode == 0, exported.stderr
    listing = json.loads(exported.stdout)
    assert listing["file_count"] == 2 and listing["files"] == []
    assert listing["total_bytes"] > 10_000_000  # 11M parameters, trained on the data

    # the metrics in the user's own experiment, through MLflow's REST API: each
    # epoch's loss and accuracy (two epochs), the test set's AUC, F1 and kappa
    experiment = researcher.me()["mlflow"]["experiment_name"]
    [(run_id, metrics)] = [(r, m) for r, m in runs_in(experiment) if "train_loss" in m]
    for key in ("train_loss", "train_accuracy"):
        assert sorted(metric_history(run_id, key)) == [1, 2], key
    assert {"test_auc", "test_f1", "test_kappa", "test_accuracy"} <= set(metrics)
    assert 0 <= metrics["test_auc"] <= 1  # the data's test split holds both classes
    assert 0 <= metrics["test_f1"] <= 1 and -1 <= metrics["test_kappa"] <= 1
    # and the dry run's short epoch in the dry run's experiment, not the user's
    [(_, dry_metrics)] = [(r, m) for r, m in runs_in(experiment + "-dryrun") if "train_loss" in m]
    assert {"train_loss", "train_accuracy", "test_accuracy", "test_f1"} <= set(dry_metrics)


def test_code_that_fails_only_on_the_real_data_shows_only_the_bounded_tail(stack, researcher, submitted):
    result = submitted["real-only"]
    assert result["status"] == "failed" and result["exit_code"] == 4, result
    assert result["dry_run"]["exit_code"] == 0
    assert "m2d test: dry run, one short epoch" in result["dry_run"]["log"]
    tail = result["error"]
    assert "m2d test: real line 299" in tail
    assert "m2d test: real line 000" not in tail
    assert len(tail.splitlines()) <= stack_tail_lines() and len(tail) <= 2000
    mails = researcher.wait_for_mails(result["id"], 4)
    assert mails[-1]["Subject"].endswith("execution failed")
    assert "real line 000" not in mails[-1].get_content()


def test_m2d_logs_shows_the_dry_runs_whole_log_and_the_real_runs_tail(stack, researcher, submitted):
    def m2d_logs(submission, *extra):
        done = m2d(researcher, "logs", submission["id"], *extra)
        assert done.returncode == 0, done.stderr
        return done.stdout

    crashed = m2d_logs(submitted["crashes"])
    assert all(f"in layer{i}\n" in crashed for i in range(41)) and "no real run" in crashed
    shown = json.loads(m2d_logs(submitted["real-only"], "--json"))
    assert "m2d test: dry run, one short epoch" in shown["dry_run"]["log"]
    assert shown["real_run"]["exit_code"] == 4 and "m2d test: real line 299" in shown["real_run"]["stderr_tail"]
    assert "real line 000" not in json.dumps(shown["real_run"])
