"""The HTTP API over the running stack: authentication, ownership, and every
zip refusal answered with a 4xx that tells the researcher what to fix."""
import pytest
import requests

from .helpers import zips
from .helpers.stack import SAMPLES, zip_folder


@pytest.fixture(scope="module")
def alice(stack):
    return stack.researcher("alice")


def test_upload_without_token_is_401_saying_how_to_authenticate(stack, tmp_zip):
    with open(zips.make_valid_zip(tmp_zip), "rb") as f:
        response = requests.post(f"{stack.url}/api/v1/submissions", files={"file": f}, timeout=30)
    assert response.status_code == 401
    assert "Authorization: Bearer" in response.json()["message"]


def test_wrong_token_is_401(stack):
    response = requests.get(f"{stack.url}/api/v1/me", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert response.status_code == 401 and "not valid" in response.json()["message"]


def test_unapproved_users_token_is_403(stack):
    waiting = stack.researcher("waiting", approve=False)
    response = waiting.api("GET", "/me")
    assert response.status_code == 403 and "approval" in response.json()["message"]


def test_me_gives_mlflow_credentials_and_experiment(stack, alice):
    mlflow = alice.me()["mlflow"]
    assert mlflow["username"] and len(mlflow["password"]) >= 16
    assert mlflow["experiment_name"] == mlflow["username"]
    assert mlflow["tracking_uri"] == stack.env["M2D_MLFLOW_URL"]


def test_upload_answers_201_with_id_and_status_and_history(alice, tmp_path):
    response = alice.upload(zip_folder(SAMPLES / "fails", tmp_path / "s.zip"))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "received" and isinstance(body["id"], int)
    assert body["zip_sha256"] and len(body["zip_sha256"]) == 64
    fetched = alice.submission(body["id"])
    assert fetched["events"][0]["status"] == "received"


def test_another_users_submission_is_404(stack, alice, tmp_path):
    submission_id = alice.submit(zip_folder(SAMPLES / "fails", tmp_path / "s.zip"))
    bob = stack.researcher("bob")
    response = bob.api("GET", f"/submissions/{submission_id}")
    assert response.status_code == 404
    assert alice.api("GET", f"/submissions/{submission_id}").status_code == 200


def test_missing_file_field_is_400(alice):
    response = alice.api("POST", "/submissions", data={"nothing": "here"})
    assert response.status_code == 400 and "field 'file'" in response.json()["message"]


REFUSALS = [
    (zips.make_text_file, "not_a_zip"),
    (zips.make_truncated_zip, "not_a_zip"),
    (lambda p: zips.make_zip_without(p, "main.py"), "missing_main"),
    (lambda p: zips.make_zip_without(p, "requirements.txt"), "missing_requirements"),
    (zips.make_nested_zip, "nested_folder"),
    (zips.make_many_files_zip, "too_many_files"),
    (zips.make_absolute_path_zip, "absolute_path"),
    (zips.make_parent_path_zip, "parent_path"),
    (zips.make_symlink_zip, "symlink"),
    (zips.make_encrypted_zip, "encrypted"),
    (zips.make_huge_declared_zip, "too_big_uncompressed"),
    (zips.make_zip_bomb, "compression_ratio"),
    (lambda p: zips.make_requirements_zip(p, "--index-url https://evil.example/simple\n"),
     "bad_requirements"),
]


@pytest.mark.parametrize("make, code", REFUSALS, ids=[code for _, code in REFUSALS])
def test_each_bad_zip_is_refused_with_what_to_fix(alice, tmp_zip, make, code):
    response = alice.upload(make(tmp_zip))
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == code
    assert len(body["message"]) > 40  # a sentence that says what to do, not a code


def test_nested_folder_refusal_names_the_folder(alice, tmp_zip):
    body = alice.upload(zips.make_nested_zip(tmp_zip, folder="my-project")).json()
    assert "my-project" in body["message"]


def test_upload_over_the_size_limit_is_413(stack, alice, tmp_zip):
    limit = int(stack.env["M2D_MAX_ZIP_BYTES"])
    response = alice.upload(zips.make_padded_zip(tmp_zip, limit + 1024))
    assert response.status_code == 413
    assert response.json()["error"] == "too_large"


def test_refused_uploads_leave_nothing_behind(stack, alice, tmp_zip):
    # ids only: earlier submissions are still moving through their states
    before = [s["id"] for s in alice.api("GET", "/submissions").json()["submissions"]]
    alice.upload(zips.make_symlink_zip(tmp_zip))
    assert [s["id"] for s in alice.api("GET", "/submissions").json()["submissions"]] == before
    assert list((stack.root / "data" / "incoming").iterdir()) == []


def test_web_upload_page_needs_login(stack):
    response = requests.get(f"{stack.url}/", allow_redirects=False, timeout=30)
    assert response.status_code == 302 and "/login" in response.headers["Location"]
