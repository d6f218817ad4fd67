"""A researcher's zip, uploaded over HTTP, through the real stack: Apptainer
build, Slurm GPU job, MLflow with the researcher's own account, four emails."""
import os
import uuid
from pathlib import Path

import pytest
import requests

from gateway.core.models import Build, Submission
from gateway.extensions import db
from m2d.contract import twin

from .helpers.invariants import STATUS_MAILS
from .helpers.stack import SAMPLES, Stack, zip_folder

# built, and its dry run (or job) went to Slurm
BUILT = {"dry_run_queued", "dry_run_running", "dry_run_passed", "dry_run_failed",
         "queued", "running", "completed", "failed"}


def mlflow_get(account, path, **params):
    return requests.get(f"{os.environ['M2D_MLFLOW_URL']}{path}", params=params, timeout=30,
                        auth=(account["username"], account["password"]))


def runs_of(account):
    """The runs in the experiment named like the account, read as that account."""
    experiment = mlflow_get(account, "/api/2.0/mlflow/experiments/get-by-name",
                            experiment_name=account["experiment_name"])
    experiment.raise_for_status()
    response = requests.post(f"{os.environ['M2D_MLFLOW_URL']}/api/2.0/mlflow/runs/search",
                             json={"experiment_ids": [experiment.json()["experiment"]["experiment_id"]]},
                             auth=(account["username"], account["password"]), timeout=30)
    response.raise_for_status()
    return response.json().get("runs", [])


@pytest.fixture(scope="module")
def postgres_stack(testbed, postgres):
    """A second stack, on PostgreSQL (the production database), on a database
    of its own; for this module's tests alone (idle, it would poll for the rest
    of the session)."""
    running = Stack(M2D_SQLALCHEMY_DATABASE_URI=postgres.url(postgres.create())).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def researcher(stack):
    return stack.researcher("iris")


@pytest.fixture(scope="module")
def both_databases(stack, researcher, postgres_stack, tmp_path_factory):
    """The toy sample, submitted once to the session's stack (SQLite) and once
    to the stack on PostgreSQL, at once (their jobs overlap), each followed to
    the end: {"sqlite"|"postgresql": (researcher, submission)}."""
    zip_path = zip_folder(SAMPLES / "iris", tmp_path_factory.mktemp("iris") / "submission.zip")
    researchers = {"sqlite": researcher, "postgresql": postgres_stack.researcher("iris-postgres")}
    ids = {name: someone.submit(zip_path) for name, someone in researchers.items()}
    return {name: (someone, someone.wait_until(ids[name], {"completed", "failed", "build_failed"}))
            for name, someone in researchers.items()}


@pytest.fixture(scope="module")
def iris(both_databases):
    """The toy sample, submitted once and followed to the end."""
    return both_databases["sqlite"][1]


def test_iris_sample_completes_with_four_emails_in_order(researcher, iris):
    assert iris["status"] == "completed", iris
    assert iris["slurm_job_id"] and iris["image_digest"].startswith("sha256:")
    assert [e["status"] for e in iris["events"]] == ["received", "building", "dry_run_queued", "dry_run_running",
                                                     "dry_run_passed", "queued", "running", "completed"]
    mails = researcher.wait_for_mails(iris["id"], 4)
    assert [m["Subject"].split(": ", 1)[1] for m in mails] == STATUS_MAILS
    assert all(f"Submission {iris['id']}" in m["Subject"] for m in mails)


def test_iris_sample_completes_with_postgresql_as_the_database(postgres_stack, both_databases):
    researcher, done = both_databases["postgresql"]
    submission_id = done["id"]
    assert done["status"] == "completed", done
    assert [m["Subject"].split(": ", 1)[1] for m in researcher.wait_for_mails(submission_id, 4)] == STATUS_MAILS
    assert postgres_stack.env["M2D_SQLALCHEMY_DATABASE_URI"].startswith("postgresql")


def test_iris_metrics_are_in_the_researchers_own_experiment(stack, researcher, iris):
    account = researcher.me()["mlflow"]
    assert account["experiment_name"] == account["username"]
    runs = runs_of(account)
    assert len(runs) == 1
    metrics = {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}
    assert metrics == {"accuracy": 1.0, "dataset-exists": 1.0}
    # another researcher cannot read it
    other = stack.researcher("other").me()["mlflow"]
    peek = mlflow_get(other, "/api/2.0/mlflow/experiments/get-by-name",
                      experiment_name=account["experiment_name"])
    assert peek.status_code == 403


def test_export_lands_in_that_submissions_folder_only(stack, researcher, iris):
    submissions = stack.root / "data" / "submissions"
    # this researcher's submissions (other modules on the stack export iris too)
    mine = {str(s["id"]) for s in researcher.api("GET", "/submissions").json()["submissions"]}
    exported = sorted(p.relative_to(submissions) for p in submissions.glob("*/export/*")
                      if p.parts[-3] in mine)
    assert f"{iris['id']}/export/result.txt" in [str(p) for p in exported]
    assert (submissions / str(iris["id"]) / "export" / "result.txt").read_text() == "accuracy=1.0\n"
    assert not [p for p in exported if p.name == "result.txt" and p.parts[0] != str(iris["id"])]
    # the dry run's own copy went to its own folder
    assert (submissions / str(iris["id"]) / "export-dryrun" / "result.txt").read_text() == "accuracy=1.0\n"


def test_failing_main_reports_the_traceback_in_the_email(researcher, iris, tmp_path):
    # iris fixture first: both use the same (already built) environment.
    # It fails on the synthetic twin already: the real job never starts.
    submission_id = researcher.submit(zip_folder(SAMPLES / "fails", tmp_path / "fails.zip"))
    result = researcher.wait_until(submission_id, {"completed", "failed", "build_failed", "dry_run_failed"})
    assert result["status"] == "dry_run_failed" and result["exit_code"] == 1
    assert result["slurm_job_id"] is None
    assert "RuntimeError: m2d sample: this training script fails on purpose" in result["error"]
    mails = researcher.wait_for_mails(submission_id, 2)
    assert [m["Subject"].split(": ", 1)[1] for m in mails] == ["code received", "dry run failed"]
    body = mails[-1].get_content()
    assert "RuntimeError: m2d sample: this training script fails on purpose" in body
    assert "exit code 1" in body
    # the email and the API lead with the exception it ended on, before the whole log
    assert result["dry_run"]["headline"].startswith("RuntimeError: m2d sample: this training script fails on purpose")
    assert body.index(result["dry_run"]["headline"]) < body.index("---- stdout")


def test_writing_to_the_dataset_fails_read_only(stack, researcher, iris, tmp_path):
    submission_id = researcher.submit(zip_folder(SAMPLES / "writes-dataset", tmp_path / "w.zip"))
    result = researcher.wait_until(submission_id, {"completed", "failed", "build_failed", "dry_run_failed"})
    assert result["status"] == "dry_run_failed"  # the twin is read-only too
    assert "Read-only file system" in result["error"]
    assert not (stack.root / "data" / "tampered.txt").exists()
    twin_dir = stack.env.get("M2D_TWIN_DIR") or stack.root / "data" / "twins"
    for dataset in (Path(os.environ["M2D_DATASET_DIR"]), twin.path(twin_dir, result["dataset_version"])):
        assert not (dataset / "tampered.txt").exists()


def test_missing_package_is_build_failed_with_pips_message(researcher, tmp_path):
    zip_path = zip_folder(SAMPLES / "iris", tmp_path / "bad.zip",
                          extra={"requirements.txt": "nosuchpackage-m2d-test==1.0\n"})
    submission_id = researcher.submit(zip_path)
    result = researcher.wait_until(submission_id, {"queued", "build_failed"})
    assert result["status"] == "build_failed"
    assert "nosuchpackage-m2d-test" in result["error"]
    mails = researcher.wait_for_mails(submission_id, 2)
    assert [m["Subject"].split(": ", 1)[1] for m in mails] == ["code received", "execution failed"]
    assert "No matching distribution found for nosuchpackage-m2d-test" in mails[-1].get_content()


def test_simultaneous_and_repeated_submissions_with_same_requirements_build_once(
        app, researcher, tmp_path):
    # A marker that pip accepts and ignores makes these requirements new to
    # the image cache on every run, so the first build really happens here.
    requirements = f'six==1.16.0 ; os_name != "m2d-{uuid.uuid4().hex}"\n'
    zip_path = zip_folder(SAMPLES / "iris", tmp_path / "six.zip", extra={"requirements.txt": requirements})
    first, second = researcher.submit(zip_path), researcher.submit(zip_path)
    for submission_id in (first, second):
        assert researcher.wait_until(submission_id, BUILT | {"build_failed"})["status"] != "build_failed"
    third = researcher.submit(zip_path)
    researcher.wait_until(third, BUILT)
    for submission_id in (first, second, third):  # their jobs are not this test's: spare the machine
        researcher.api("POST", f"/submissions/{submission_id}/cancel")

    db.session.rollback()  # read what the workers wrote, not an old snapshot
    rows = {s.id: s for s in Submission.query.filter(Submission.id.in_([first, second, third]))}
    keys = {s.env_key for s in rows.values()}
    assert len(keys) == 1 and None not in keys
    assert len({s.image_digest for s in rows.values()}) == 1
    key = keys.pop()
    # this run's image is new by design: do not let every run leave 80 MB behind
    (Path(os.environ["M2D_IMAGE_DIR"]) / f"env-{key}.sif").unlink()
    builds = Build.query.filter_by(env_key=key).all()
    assert len(builds) == 1 and builds[0].succeeded
    assert builds[0].submission_id in (first, second)
    assert Build.query.filter_by(submission_id=third).count() == 0


def test_cancelling_a_running_job_stops_it_and_says_so(researcher, iris, tmp_path):
    # its dry run passes at once (M2D_DRY_RUN=1); the real job sleeps
    submission_id = researcher.submit(zip_folder(SAMPLES / "sleeps", tmp_path / "sleeps.zip"))
    researcher.wait_until(submission_id, "running", timeout=300)
    response = researcher.api("POST", f"/submissions/{submission_id}/cancel")
    assert response.status_code == 202, response.text
    result = researcher.wait_until(submission_id, {"cancelled", "completed", "failed"}, timeout=120)
    assert result["status"] == "cancelled" and result["slurm_job_id"]
    mails = researcher.wait_for_mails(submission_id, 4)
    assert [m["Subject"].split(": ", 1)[1] for m in mails] == [
        "code received", "queued for execution", "execution started", "cancelled"]
    again = researcher.api("POST", f"/submissions/{submission_id}/cancel")
    assert again.status_code == 409 and "already ended" in again.json()["message"]
