"""The export airlock: request, review, release, download, provenance.

The first part runs the rules on a local SQLite app (make unit); the second
walks the issue's proof through the real stack (the iris sample writes
/mnt/export/result.txt)."""
import hashlib
import json
import re
import socket
import sqlite3
import subprocess
import threading
from datetime import datetime, timedelta

import pytest
import requests
from sqlalchemy import text

from gateway.core import airlock, lifecycle, provenance
from gateway.core.models import Email, Submission
from gateway.core.storage import SubmissionFiles
from gateway.extensions import db
from m2d.contract.states import Status

from .helpers.stack import SAMPLES, wait_for, zip_folder
from .helpers.users import log_in_session as _log_in
from .helpers.users import make_user as _user
from .helpers.users import token_header as _token

RESULT = b"accuracy=1.0\n"


def _ended_with_export(user, files=None, status=Status.COMPLETED):
    submission = lifecycle.create(user, "mine.zip")
    submission.status = status.value
    db.session.commit()
    export = SubmissionFiles(submission.id).export
    export.mkdir(parents=True)
    for name, data in (files or {"result.txt": RESULT}).items():
        (export / name).parent.mkdir(parents=True, exist_ok=True)
        (export / name).write_bytes(data)
    return submission


@pytest.fixture
def alice(local_app):
    return _user("alice@example.org")


@pytest.fixture
def bob(local_app):
    return _user("bob@example.org")


@pytest.fixture
def reviewers(local_app):
    found = []
    for name in ("rita", "rolf"):
        user = _user(f"{name}@example.org")
        user.is_reviewer = True
        found.append(user)
    db.session.commit()
    return found


def _request(client, user, submission_id, justification="the trained model, for a paper", **body):
    return client.post(f"/api/v1/submissions/{submission_id}/release-requests", headers=_token(user),
                       json={"justification": justification, **body})


def _approve(request, reviewers, paths=None):
    """Both reviewers approve (RELEASE_APPROVALS is 2 by default)."""
    for reviewer in reviewers:
        airlock.decide(request, reviewer, "approve", paths=paths)


def test_the_owner_sees_only_how_many_files_and_bytes_until_reviewers_release_them(client, alice, reviewers):
    submission = _ended_with_export(alice, {"result.txt": RESULT, "sub/metrics.json": b"{}"})
    url = f"/api/v1/submissions/{submission.id}/export"
    answer = client.get(url, headers=_token(alice))
    assert answer.json["file_count"] == 2 and answer.json["total_bytes"] == len(RESULT) + 2
    assert answer.json["files"] == [] and answer.json["requests"] == []
    hidden = ("result.txt", "metrics.json", hashlib.sha256(RESULT).hexdigest(), hashlib.sha256(b"{}").hexdigest())
    assert not any(word in answer.get_data(as_text=True) for word in hidden)
    # the manifest has them all, for the reviewers
    assert [(f.path, f.sha256) for f in airlock.manifest(submission).files] == [
        ("result.txt", hashlib.sha256(RESULT).hexdigest()), ("sub/metrics.json", hashlib.sha256(b"{}").hexdigest())]

    request = airlock.get_request(_request(client, alice, submission.id).json["id"])
    _approve(request, reviewers, paths=["result.txt"])
    airlock.decide(request, reviewers[0], "reject", "not needed", paths=["sub/metrics.json"])
    answer = client.get(url, headers=_token(alice))
    assert answer.json["files"] == [{"path": "result.txt", "size": len(RESULT), "released": True, "note": None,
                                     "sha256": hashlib.sha256(RESULT).hexdigest()}]
    assert "metrics.json" not in answer.get_data(as_text=True)
    assert answer.json["requests"][0]["counts"] == {"released": 1, "rejected": 1}
    assert answer.json["requests"][0]["comments"][0]["comment"] == "not needed"
    provenance_answer = client.get(f"/api/v1/submissions/{submission.id}/provenance", headers=_token(alice))
    assert provenance_answer.json["verified"] and "result.txt" in provenance_answer.get_data(as_text=True)
    assert not any(word in provenance_answer.get_data(as_text=True) for word in hidden[1::2])


def test_a_running_submission_has_no_manifest_and_cannot_request(client, alice):
    submission = _ended_with_export(alice, status=Status.RUNNING)
    assert client.get(f"/api/v1/submissions/{submission.id}/export", headers=_token(alice)).json["files"] == []
    response = _request(client, alice, submission.id)
    assert response.status_code == 409 and response.json["error"] == "not_ended"


def test_a_request_is_pending_and_the_download_is_403_until_reviewed(client, alice, reviewers):
    submission = _ended_with_export(alice)
    response = _request(client, alice, submission.id)
    assert response.status_code == 201 and response.json["status"] == "pending"
    assert response.json["counts"] == {"pending": 1} and response.json["files"] == []
    held = client.get(f"/api/v1/submissions/{submission.id}/export/result.txt", headers=_token(alice))
    assert held.status_code == 404 and held.json["error"] == "not_released"
    # a name that is not there answers the same: which names exist is the reviewers' to know
    missing = client.get(f"/api/v1/submissions/{submission.id}/export/no-such.txt", headers=_token(alice))
    assert (missing.status_code, missing.json["error"]) == (404, "not_released")
    assert missing.json["message"].replace("no-such.txt", "result.txt") == held.json["message"]
    # every reviewer is owed the "request received" email
    owed = Email.query.filter_by(submission_id=submission.id, kind="release_requested").all()
    assert sorted(e.recipient for e in owed) == ["rita@example.org", "rolf@example.org"]


def test_a_request_needs_a_justification_and_names_no_paths(client, alice):
    """Naming paths is refused whether they exist or not: an answer that told
    would be a name oracle."""
    submission = _ended_with_export(alice)
    assert _request(client, alice, submission.id, justification=" ").json["error"] == "justification_required"
    for paths in (["../../etc/passwd"], ["result.txt"]):
        response = _request(client, alice, submission.id, paths=paths)
        assert response.status_code == 400 and response.json["error"] == "paths_hidden"


def test_two_person_rule_one_approval_is_not_enough_and_own_approval_is_refused(
        client, local_app, alice, reviewers):
    local_app.config["RELEASE_APPROVALS"] = 2
    alice.is_reviewer = True  # even a reviewer never approves her own request
    db.session.commit()
    submission = _ended_with_export(alice)
    request = airlock.get_request(_request(client, alice, submission.id).json["id"])
    with pytest.raises(airlock.AirlockError) as refused:
        airlock.decide(request, alice, "approve")
    assert refused.value.code == "own_request"
    airlock.decide(request, reviewers[0], "approve")
    assert request.status == "pending" and request.items[0].status == "pending"
    with pytest.raises(airlock.AirlockError) as twice:
        airlock.decide(request, reviewers[0], "approve")
    assert twice.value.code in ("already_reviewed", "already_decided")
    airlock.decide(request, reviewers[1], "approve", "fine")
    assert request.status == "released"
    download = client.get(f"/api/v1/submissions/{submission.id}/export/result.txt", headers=_token(alice))
    assert download.status_code == 200 and download.data == RESULT
    assert download.headers["Content-Disposition"] == "attachment; filename=result.txt"
    kinds = {e.kind for e in Email.query.filter_by(submission_id=submission.id, recipient="")}
    assert {"release_decided", "download_ready"} <= kinds


def test_two_reviewers_release_a_file_by_default(client, local_app, alice, reviewers):
    """RELEASE_APPROVALS is 2 unless an admin lowers it: the two-person rule is the promise."""
    assert local_app.config["RELEASE_APPROVALS"] == 2
    submission = _ended_with_export(alice)
    request = airlock.get_request(_request(client, alice, submission.id).json["id"])
    airlock.decide(request, reviewers[0], "approve")
    assert request.status == "pending" and request.items[0].status == "pending"
    airlock.decide(request, reviewers[1], "approve")
    assert request.status == "released"


def test_the_decision_email_names_only_released_files_and_gives_every_comment(client, alice, reviewers):
    from jobs.mail import render

    submission = _ended_with_export(alice, {"result.txt": RESULT, "secret-name.csv": b"1\n"})
    request = airlock.get_request(_request(client, alice, submission.id).json["id"])
    _approve(request, reviewers, paths=["result.txt"])
    airlock.decide(request, reviewers[0], "reject", "row-level data", paths=["secret-name.csv"])
    email = Email.query.filter_by(submission_id=submission.id, kind="release_decided", recipient="").one()
    subject, body = render(email)
    assert subject.endswith("partly released")
    assert "result.txt: released" in body and "1 file(s) not released" in body and "rejected: row-level data" in body
    assert "secret-name" not in body


def test_a_user_who_is_not_a_reviewer_cannot_decide(client, alice, bob):
    submission = _ended_with_export(alice)
    request = airlock.get_request(_request(client, alice, submission.id).json["id"])
    with pytest.raises(airlock.AirlockError) as refused:
        airlock.decide(request, bob, "approve")
    assert refused.value.code == "not_a_reviewer"


def test_a_rejected_file_never_downloads_nor_can_be_requested_again(client, alice, reviewers):
    submission = _ended_with_export(alice)
    request = airlock.get_request(_request(client, alice, submission.id).json["id"])
    with pytest.raises(airlock.AirlockError):
        airlock.decide(request, reviewers[0], "reject")  # a rejection says why
    airlock.decide(request, reviewers[0], "reject", "row-level data")
    assert request.status == "rejected"
    download = client.get(f"/api/v1/submissions/{submission.id}/export/result.txt", headers=_token(alice))
    assert download.status_code == 404 and download.json["error"] == "not_released"
    again = _request(client, alice, submission.id)
    assert again.status_code == 409 and again.json["error"] == "nothing_to_release"


def test_a_file_changed_after_the_manifest_is_never_released(client, alice, reviewers):
    submission = _ended_with_export(alice)
    request = airlock.get_request(_request(client, alice, submission.id).json["id"])
    (SubmissionFiles(submission.id).export / "result.txt").write_bytes(b"something else\n")
    _approve(request, reviewers)
    assert request.items[0].status == "changed" and request.status == "rejected"
    download = client.get(f"/api/v1/submissions/{submission.id}/export/result.txt", headers=_token(alice))
    assert download.status_code == 404


def test_another_users_id_is_404_on_every_airlock_url(client, alice, bob):
    submission = _ended_with_export(alice)
    base = f"/api/v1/submissions/{submission.id}"
    for method, path in (("get", "/export"), ("get", "/export/result.txt"), ("get", "/provenance"),
                         ("post", "/release-requests")):
        response = getattr(client, method)(base + path, headers=_token(bob), json={"justification": "x"})
        assert response.status_code == 404, path
    _log_in(client, bob)
    assert client.get(f"/submissions/{submission.id}/export/result.txt").status_code == 404
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/account").get_data(as_text=True)).group(1)
    web_request = client.post(f"/submissions/{submission.id}/release-requests",
                              data={"csrf_token": token, "all": "1", "justification": "mine now"})
    assert web_request.status_code == 404 and not airlock.overview(submission)["requests"]


def test_the_download_is_resumable_with_a_range(client, alice, reviewers):
    submission = _ended_with_export(alice)
    _approve(airlock.get_request(_request(client, alice, submission.id).json["id"]), reviewers)
    response = client.get(f"/api/v1/submissions/{submission.id}/export/result.txt",
                          headers={**_token(alice), "Range": "bytes=9-"})
    assert response.status_code == 206 and response.data == RESULT[9:]
    downloads = [r for r in provenance.chain(submission.id) if r.kind == "download"]
    assert json.loads(downloads[-1].payload)["range"] == "bytes=9-"


def test_the_provenance_chain_verifies_and_a_changed_row_is_found(client, alice, reviewers):
    submission = _ended_with_export(alice)
    _approve(airlock.get_request(_request(client, alice, submission.id).json["id"]), reviewers)
    answer = client.get(f"/api/v1/submissions/{submission.id}/provenance", headers=_token(alice)).json
    assert answer["verified"] is True
    assert [r["kind"] for r in answer["records"]] == ["manifest", "release_requested", "review", "review",
                                                      "released"]
    assert answer["records"][1]["prev_hash"] == answer["records"][0]["hash"]
    db.session.execute(text("UPDATE provenance_record SET payload = replace(payload, 'rita', 'mallory') "
                            "WHERE kind = 'review'"))
    db.session.commit()
    broken = provenance.verify(submission.id)
    assert broken is not None and broken.seq == 3 and "changed" in broken.why


def test_retention_warns_seven_days_before_then_deletes(client, alice):
    submission = _ended_with_export(alice)
    client.get(f"/api/v1/submissions/{submission.id}/export", headers=_token(alice))  # manifest
    ended = db.session.get(Submission, submission.id).updated_at
    days = client.application.config["EXPORT_RETENTION_DAYS"]
    assert airlock.purge(ended + timedelta(days=days - 8)) == {"released_purged": 0, "warned": 0,
                                                               "exports_purged": 0}
    assert airlock.purge(ended + timedelta(days=days - 6))["warned"] == 1
    assert Email.query.filter_by(submission_id=submission.id, kind="export_expiring").count() == 1
    assert airlock.purge(ended + timedelta(days=days - 1))["exports_purged"] == 0  # a week after the warning
    assert airlock.purge(ended + timedelta(days=days + 2))["exports_purged"] == 1
    assert not (SubmissionFiles(submission.id).export / "result.txt").exists()
    assert _request(client, alice, submission.id).status_code == 410


def test_an_export_over_the_cap_is_reported(local_app, alice):
    submission = _ended_with_export(alice, {"big.bin": b"x" * 100})
    local_app.config["EXPORT_MAX_BYTES"] = 50
    assert "EXPORT_TOO_LARGE" in airlock.over_cap(submission.id)
    local_app.config["EXPORT_MAX_BYTES"] = 100
    assert airlock.over_cap(submission.id) is None


def test_reviewer_pages_show_the_request_with_an_escaped_preview_and_the_code(client, alice, reviewers):
    submission = _ended_with_export(alice, {"result.csv": b"a,b\n<script>x</script>,1\n"})
    request_id = _request(client, alice, submission.id).json["id"]
    _log_in(client, reviewers[0])
    assert f"Request {request_id}" in client.get("/review/").get_data(as_text=True)
    page = client.get(f"/review/requests/{request_id}").get_data(as_text=True)
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "<script>x" not in page
    assert 'name="csrf_token"' in page and 'value="approve"' in page


def test_the_review_pages_are_for_reviewers_only(client, alice, bob):
    submission = _ended_with_export(alice)
    request_id = _request(client, alice, submission.id).json["id"]
    _log_in(client, bob)
    assert client.get("/review/").status_code == 403
    assert client.get(f"/review/requests/{request_id}").status_code == 403


def test_the_submission_page_counts_the_export_and_names_only_released_files(client, alice, reviewers):
    submission = _ended_with_export(alice)
    _log_in(client, alice)
    page = client.get(f"/submissions/{submission.id}").get_data(as_text=True)
    assert "result.txt" not in page and hashlib.sha256(RESULT).hexdigest() not in page
    assert "<strong>1</strong> file(s), 13 bytes" in page
    assert "Request release" in page and 'name="justification"' in page
    _approve(airlock.get_request(_request(client, alice, submission.id).json["id"]), reviewers)
    page = client.get(f"/submissions/{submission.id}").get_data(as_text=True)
    assert "result.txt" in page and hashlib.sha256(RESULT).hexdigest() in page


# ---------------------------------------------------------------- the real stack

@pytest.fixture(scope="module")
def iris_runs(stack, tmp_path_factory):
    """Three researchers' own completed iris runs, submitted at once (their
    builds, dry runs and jobs overlap): one released, one rejected, one purged."""
    zip_path = zip_folder(SAMPLES / "iris", tmp_path_factory.mktemp("airlock") / "iris.zip")
    researchers = {name: stack.researcher(name) for name in ("airlock", "rejected", "retention")}
    ids = {name: researcher.submit(zip_path) for name, researcher in researchers.items()}
    for name, submission_id in ids.items():
        submission = researchers[name].wait_until(submission_id, {"completed", "failed", "build_failed"})
        assert submission["status"] == "completed", submission
    return {name: (researchers[name], ids[name]) for name in ids}


@pytest.fixture(scope="module")
def iris_done(iris_runs):
    return iris_runs["airlock"]


def _reviewer(stack, name):
    person = stack.researcher(name)
    stack.flask("users", "grant-reviewer", person.address)
    return person


def test_release_through_the_stack_with_two_reviewers(stack, iris_done, mlflow_url, admin_auth):
    researcher, submission_id = iris_done
    first, second = _reviewer(stack, "rev-one"), _reviewer(stack, "rev-two")
    export = researcher.api("GET", f"/submissions/{submission_id}/export").json()
    # the owner sees how many files, not their names nor hashes, until reviewers release them
    assert export["file_count"] == 1 and export["files"] == [] and export["total_bytes"] > 0

    response = researcher.api("POST", f"/submissions/{submission_id}/release-requests",
                              json={"justification": "result.txt: the iris model's accuracy"})
    assert response.status_code == 201 and response.json()["status"] == "pending", response.text
    request_id = str(response.json()["id"])
    download = researcher.api("GET", f"/submissions/{submission_id}/export/result.txt")
    assert download.status_code == 404 and download.json()["error"] == "not_released"

    # the two-person rule, the default
    stack.flask("users", "grant-reviewer", researcher.address)  # reviewers never review their own
    with pytest.raises(AssertionError, match="own"):
        stack.flask("releases", "approve", request_id, "--reviewer", researcher.address)
    stack.flask("releases", "approve", request_id, "--reviewer", first.address, "--comment", "ok")
    assert researcher.api("GET", f"/submissions/{submission_id}/export/result.txt").status_code == 404
    assert request_id in stack.flask("releases", "list")
    stack.flask("releases", "approve", request_id, "--reviewer", second.address, "--comment", "ok too")
    download = researcher.api("GET", f"/submissions/{submission_id}/export/result.txt")
    assert download.status_code == 200, download.text
    export = researcher.api("GET", f"/submissions/{submission_id}/export").json()
    (result,) = export["files"]
    assert result["path"] == "result.txt" and result["released"] is True
    assert hashlib.sha256(download.content).hexdigest() == result["sha256"]
    assert "attachment" in download.headers["Content-Disposition"]

    # emails: the request to each reviewer, the decision and the download to the researcher
    for reviewer in (first, second):
        subjects = [m["Subject"] for m in _wait_mails(stack, reviewer.address, 1)]
        assert any("release requested" in s for s in subjects)
    subjects = [m["Subject"] for m in _wait_mails(stack, researcher.address, 6)]
    assert any(s.endswith(f"release request {request_id} released") for s in subjects)
    assert any("download available" in s for s in subjects)

    chain = researcher.api("GET", f"/submissions/{submission_id}/provenance").json()
    kinds = [r["kind"] for r in chain["records"]]
    assert chain["verified"] and kinds[:7] == ["upload", "environment", "dry_run_job", "dry_run_mlflow",
                                                "job", "mlflow", "manifest"]
    assert kinds.count("review") == 2 and "released" in kinds and kinds[-1] == "download"
    assert chain["records"][-1]["payload"]["by"] == researcher.address

    # the chain names the Slurm job and node as sacct has them, and the job's MLflow runs as MLflow has them
    job_id = researcher.submission(submission_id)["slurm_job_id"]
    link = {r["kind"]: r["payload"] for r in chain["records"]}
    assert link["job"]["slurm_job_id"] == job_id and link["job"]["node"] == _sacct_node(job_id)
    experiment_id, run_ids = link["mlflow"]["experiment_id"], link["mlflow"]["run_ids"]
    assert run_ids == _mlflow_run_ids(mlflow_url, admin_auth, experiment_id) and len(run_ids) == 1
    run = requests.get(f"{mlflow_url}/api/2.0/mlflow/runs/get", params={"run_id": run_ids[0]}, auth=admin_auth,
                       timeout=30).json()["run"]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["m2d.slurm_job_id"] == job_id and tags["m2d.submission_id"] == str(submission_id)
    assert run["info"]["experiment_id"] == experiment_id
    assert {m["key"] for m in run["data"]["metrics"]} >= {"accuracy"}
    # and the released file's own record repeats them
    released = link["released"]
    assert (released["path"], released["sha256"]) == ("result.txt", result["sha256"])
    assert (released["slurm_job_id"], released["node"], released["mlflow_run_ids"]) == (
        job_id, link["job"]["node"], run_ids)
    assert released["zip_sha256"] == link["upload"]["zip_sha256"]
    requirements = (SAMPLES / "iris" / "requirements.txt").read_bytes()
    assert link["environment"]["requirements_sha256"] == hashlib.sha256(requirements).hexdigest()
    assert link["environment"]["image_digest"]


def test_user_b_gets_404_on_every_airlock_url_of_user_a(stack, iris_done):
    _researcher, submission_id = iris_done
    other = stack.researcher("other")
    for method, path in (("GET", "/export"), ("GET", "/export/result.txt"), ("GET", "/provenance"),
                         ("POST", "/release-requests")):
        response = other.api(method, f"/submissions/{submission_id}{path}", json={"justification": "x"})
        assert response.status_code == 404, path


def test_a_rejected_file_never_downloads_on_the_stack(stack, iris_runs):
    researcher, submission_id = iris_runs["rejected"]
    reviewer = _reviewer(stack, "rev-three")
    response = researcher.api("POST", f"/submissions/{submission_id}/release-requests",
                              json={"justification": "all of it"})
    assert response.status_code == 201, response.text
    stack.flask("releases", "reject", str(response.json()["id"]), "--reviewer", reviewer.address,
                "--comment", "no row-level data may leave")
    download = researcher.api("GET", f"/submissions/{submission_id}/export/result.txt")
    assert download.status_code == 404 and download.json()["error"] == "not_released"
    body = _wait_mails(stack, researcher.address, 1, subject="rejected")[-1].get_content()
    assert "no row-level data may leave" in body


def test_retention_purges_an_expired_export_after_warning(stack, iris_runs):
    researcher, submission_id = iris_runs["retention"]
    ended = researcher.submission(submission_id)["updated_at"][:19]
    days = 90  # the default EXPORT_RETENTION_DAYS
    moment = datetime.fromisoformat(ended)
    warn_at = (moment + timedelta(days=days - 6)).isoformat(timespec="seconds")
    purge_at = (moment + timedelta(days=days + 2)).isoformat(timespec="seconds")
    export = SubmissionFiles(submission_id, stack.env["M2D_DATA_DIR"]).export
    # the purge covers every submission of this session: look at this one's
    assert "warned=0" not in stack.flask("airlock", "purge", "--now", warn_at)
    # the warning comes 7 days before the deletion it announces
    deletion = (moment + timedelta(days=days - 6 + 7)).date().isoformat()
    warning = _wait_mails(stack, researcher.address, 1, subject="export deleted on")
    assert len(warning) == 1 and warning[0]["Subject"].endswith(f"export deleted on {deletion}")
    assert "result.txt" not in warning[0]["Subject"] and "1 file(s)" in warning[0].get_content()
    stack.flask("airlock", "purge", "--now", warn_at)
    assert (export / "result.txt").exists()  # warned, not yet deleted
    assert "exports_purged=0" not in stack.flask("airlock", "purge", "--now", purge_at)
    assert not (export / "result.txt").exists()
    assert len(_wait_mails(stack, researcher.address, 1, subject="export deleted on")) == 1  # warned once
    answer = researcher.api("GET", f"/submissions/{submission_id}/export").json()
    assert answer["purged"] is True
    kinds = [r["kind"] for r in researcher.api("GET", f"/submissions/{submission_id}/provenance").json()["records"]]
    assert kinds[-1] == "export_purged"


def test_tampering_with_a_provenance_row_is_found_by_verify(stack, iris_done):
    researcher, submission_id = iris_done
    assert "ok" in stack.flask("provenance", "verify", str(submission_id))
    records = researcher.api("GET", f"/submissions/{submission_id}/provenance").json()["records"]
    (manifest,) = [r["seq"] for r in records if r["kind"] == "manifest"]  # 7: after the dry run's two links
    database = stack.env["M2D_DATA_DIR"] + "/gateway.db"
    with sqlite3.connect(database) as conn:
        conn.execute("UPDATE provenance_record SET payload = replace(payload, 'result.txt', 'other.txt') "
                     "WHERE submission_id = ? AND kind = 'manifest'", (submission_id,))
    with pytest.raises(AssertionError, match=rf"broken: submission \d+: link {manifest} "):
        stack.flask("provenance", "verify", str(submission_id))
    with pytest.raises(AssertionError, match="broken"):
        stack.flask("provenance", "verify")


def _sacct_node(job_id):
    """The node the job ran on, asked of the real sacct."""
    done = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "NodeList", "-j", job_id], capture_output=True,
                          text=True, check=True, timeout=60)
    return done.stdout.strip()


def _mlflow_run_ids(mlflow_url, admin_auth, experiment_id):
    """Every run of the experiment, oldest first, asked of MLflow's REST API."""
    answer = requests.post(f"{mlflow_url}/api/2.0/mlflow/runs/search", auth=admin_auth, timeout=30, json={
        "experiment_ids": [experiment_id], "order_by": ["attributes.start_time ASC"], "max_results": 1000})
    assert answer.ok, answer.text
    return [run["info"]["run_id"] for run in answer.json().get("runs", [])]


def _wait_mails(stack, address, count, subject=""):
    """At least ``count`` messages to ``address`` whose subject holds ``subject``."""
    return wait_for(lambda: len(m := [x for x in stack.mails_to(address) if subject in x["Subject"]]) >= count
                    and m, 60, f"{count} mails to {address} about {subject!r}")


# --- the m2d client's airlock commands, through the real gateway ------------------


@pytest.fixture(scope="module")
def plain_runs(stack, tmp_path_factory):
    """Two researchers' own completed runs without a dry run (the airlock is the
    point here), submitted at once: the iris sample and the exports sample.
    After the retention test: its purge covers every export of the session."""
    folder = tmp_path_factory.mktemp("m2d-airlock")
    zips = {"m2d-airlock": zip_folder(SAMPLES / "iris", folder / "iris.zip"),
            "exports": zip_folder(SAMPLES / "exports", folder / "e.zip")}
    researchers = {name: stack.researcher(name, dry_run=False) for name in zips}
    ids = {name: researchers[name].submit(zip_path) for name, zip_path in zips.items()}
    for name, submission_id in ids.items():
        submission = researchers[name].wait_until(submission_id, {"completed", "failed", "build_failed"})
        assert submission["status"] == "completed", submission
    return {name: (researchers[name], ids[name]) for name in ids}


@pytest.fixture(scope="module")
def m2d_iris(stack, plain_runs):
    """A researcher's own completed iris run, with `m2d` set up for them
    through M2D_URL/M2D_TOKEN."""
    researcher, submission_id = plain_runs["m2d-airlock"]
    env = {"M2D_URL": stack.url, "M2D_TOKEN": researcher.token}
    return researcher, submission_id, env


def _m2d(env, cwd, *args):
    from .helpers.client import m2d

    return m2d(*args, env=env, cwd=cwd)


def test_m2d_export_release_download_and_provenance(stack, m2d_iris, tmp_path):
    researcher, submission_id, env = m2d_iris
    listing = json.loads(_m2d(env, tmp_path, "export", submission_id, "--json").stdout)
    assert listing["file_count"] == 1 and listing["files"] == []
    shown = _m2d(env, tmp_path, "export", submission_id)
    assert shown.returncode == 0 and "1 export file(s)" in shown.stdout and "0 released" in shown.stdout
    assert "result.txt" not in shown.stdout

    early = _m2d(env, tmp_path, "download", submission_id, "result.txt")
    assert early.returncode == 1 and "no released file" in early.stderr, early.stderr
    assert not (tmp_path / "result.txt").exists()

    refused = _m2d(env, tmp_path, "release", submission_id, "--justification", " ")
    assert refused.returncode == 1 and "why" in refused.stderr
    done = _m2d(env, tmp_path, "release", submission_id, "--justification", "the accuracy, for a paper", "--json")
    assert done.returncode == 0, done.stderr
    request = json.loads(done.stdout)
    assert request["status"] == "pending" and request["counts"] == {"pending": 1} and request["files"] == []
    for name in ("m2d-reviewer", "m2d-reviewer-2"):
        stack.flask("releases", "approve", str(request["id"]), "--reviewer", _reviewer(stack, name).address)
    shown = _m2d(env, tmp_path, "export", submission_id).stdout
    assert "released" in shown and "result.txt" in shown
    result = json.loads(_m2d(env, tmp_path, "export", submission_id, "--json").stdout)["files"][0]

    # an interrupted download: the first bytes are there, m2d asks for the rest (Range)
    out = tmp_path / "got" / "result.txt"
    out.parent.mkdir()
    out.write_bytes(RESULT[:5])
    resumed = _m2d(env, tmp_path, "download", submission_id, "result.txt", "--out", out, "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["resumed_from"] == 5 and summary["verified"] and summary["sha256"] == result["sha256"]
    assert hashlib.sha256(out.read_bytes()).hexdigest() == result["sha256"]
    whole = _m2d(env, tmp_path, "download", submission_id, "result.txt")
    assert whole.returncode == 0 and "matches the manifest" in whole.stdout, whole.stderr
    assert (tmp_path / "result.txt").read_bytes() == out.read_bytes()

    # a partial file that is not this file's start: resumed bytes fail the check
    wrong = tmp_path / "wrong.txt"
    wrong.write_bytes(b"XXXXX")
    mismatch = _m2d(env, tmp_path, "download", submission_id, "result.txt", "--out", wrong)
    assert mismatch.returncode == 1 and "sha256" in mismatch.stderr, mismatch.stderr
    assert (tmp_path / "wrong.txt.bad").exists() and not wrong.exists()

    chain = _m2d(env, tmp_path, "provenance", submission_id, "--json")
    assert chain.returncode == 0, chain.stderr
    records = json.loads(chain.stdout)["records"]
    # each transfer is recorded, the one whose bytes failed the check too
    assert [r["kind"] for r in records].count("download") == 3
    text = _m2d(env, tmp_path, "provenance", submission_id).stdout
    assert "verified" in text and "manifest" in text and researcher.address in text


def test_m2d_airlock_errors_say_what_is_wrong(stack, m2d_iris, tmp_path):
    _researcher, submission_id, env = m2d_iris
    other = stack.researcher("m2d-other")
    other_env = {"M2D_URL": stack.url, "M2D_TOKEN": other.token}
    for args in (("export", submission_id), ("provenance", submission_id),
                 ("download", submission_id, "result.txt"),
                 ("release", submission_id, "--justification", "mine now")):
        done = _m2d(other_env, tmp_path, *args)
        assert done.returncode == 1 and f"no submission {submission_id}" in done.stderr, (args, done.stderr)
    unknown_path = _m2d(env, tmp_path, "download", submission_id, "nope.bin")
    assert unknown_path.returncode == 1 and "m2d export" in unknown_path.stderr
    offline = _m2d({"M2D_URL": "http://127.0.0.1:9", "M2D_TOKEN": "x"}, tmp_path, "export", "1", "--json")
    assert offline.returncode == 1 and json.loads(offline.stdout)["error"] == "no_connection"


# --- a transfer cut mid-stream, resumed with a Range ------------------------------------


class CuttingProxy:
    """A TCP proxy in front of the gateway that closes a client's connection once
    ``cut_after`` bytes of answers have passed on it, the first ``cuts`` times;
    after that it passes everything. A real cut: the client sees its socket close."""

    def __init__(self, port, cut_after, cuts=1):
        self.port, self.cut_after, self.cuts_left = port, cut_after, cuts
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, cuts=1):
        with self.lock:
            self.cuts_left = cuts

    def close(self):
        self.listener.close()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        upstream = socket.create_connection(("127.0.0.1", self.port))
        threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
        passed = 0
        with client, upstream:
            try:
                while chunk := upstream.recv(1 << 16):
                    with self.lock:
                        cut = self.cuts_left > 0 and passed + len(chunk) > self.cut_after
                        self.cuts_left -= cut
                    if cut:
                        client.sendall(chunk[:self.cut_after - passed])
                        client.shutdown(socket.SHUT_RDWR)
                        return
                    client.sendall(chunk)
                    passed += len(chunk)
            except OSError:
                return

    @staticmethod
    def _requests(client, upstream):
        try:
            while chunk := client.recv(1 << 16):
                upstream.sendall(chunk)
            upstream.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.fixture(scope="module")
def exports_done(stack, plain_runs):
    """A completed run of the exports sample (a 3 MiB model.bin among others) whose
    model.bin is released."""
    researcher, submission_id = plain_runs["exports"]
    response = researcher.api("POST", f"/submissions/{submission_id}/release-requests",
                              json={"justification": "model.bin: the trained model"})
    assert response.status_code == 201, response.text
    for name in ("rev-cut", "rev-cut-2"):
        stack.flask("releases", "approve", str(response.json()["id"]), "--reviewer", _reviewer(stack, name).address,
                    "--path", "model.bin")
    files = {f["path"]: f for f in researcher.api("GET", f"/submissions/{submission_id}/export").json()["files"]}
    assert files["model.bin"]["released"] and files["model.bin"]["size"] == 3 * 1024 * 1024
    return researcher, submission_id, files["model.bin"]


@pytest.fixture
def cutting_proxy(stack):
    proxy = CuttingProxy(stack.port, cut_after=1024 * 1024 + 333)
    yield proxy
    proxy.close()


def test_a_download_cut_mid_stream_resumes_with_a_range_to_the_same_bytes(exports_done, cutting_proxy):
    researcher, submission_id, model = exports_done
    url = f"{cutting_proxy.url}/api/v1/submissions/{submission_id}/export/model.bin"
    auth = {"Authorization": f"Bearer {researcher.token}"}
    got = bytearray()
    with pytest.raises(requests.RequestException):
        with requests.get(url, headers=auth, stream=True, timeout=60) as cut:
            assert cut.status_code == 200 and int(cut.headers["Content-Length"]) == model["size"]
            for chunk in cut.iter_content(1 << 16):
                got += chunk
    assert 0 < len(got) < model["size"]  # the socket closed mid-body, not before it nor after

    rest = requests.get(url, headers={**auth, "Range": f"bytes={len(got)}-"}, timeout=60)
    assert rest.status_code == 206, rest.text[:300]
    assert rest.headers["Content-Range"] == f"bytes {len(got)}-{model['size'] - 1}/{model['size']}"
    whole = bytes(got) + rest.content
    assert len(whole) == model["size"] and hashlib.sha256(whole).hexdigest() == model["sha256"]
    downloads = [r["payload"] for r in researcher.api("GET", f"/submissions/{submission_id}/provenance").json()[
        "records"] if r["kind"] == "download"]
    assert downloads[-2]["range"] is None and downloads[-1]["range"] == f"bytes={len(got)}-"


def test_m2d_download_cut_mid_stream_resumes_on_the_next_run(exports_done, cutting_proxy, tmp_path):
    researcher, submission_id, model = exports_done
    env = {"M2D_URL": cutting_proxy.url, "M2D_TOKEN": researcher.token}
    out = tmp_path / "model.bin"
    cut = _m2d(env, tmp_path, "download", submission_id, "model.bin")
    assert cut.returncode == 1 and "stopped after" in cut.stderr and "run the same command again" in cut.stderr, \
        cut.stderr
    kept = out.stat().st_size
    assert 0 < kept < model["size"]
    resumed = _m2d(env, tmp_path, "download", submission_id, "model.bin", "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["resumed_from"] == kept and summary["verified"] and summary["size"] == model["size"]
    assert hashlib.sha256(out.read_bytes()).hexdigest() == model["sha256"]
    direct = _m2d({**env, "M2D_URL": researcher.stack.url}, tmp_path, "download", submission_id, "model.bin",
                  "--out", tmp_path / "direct.bin")
    assert direct.returncode == 0, direct.stderr
    assert (tmp_path / "direct.bin").read_bytes() == out.read_bytes()
