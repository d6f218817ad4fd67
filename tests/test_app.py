"""The web app in-process (Flask's test client on a local SQLite app): auth,
ownership, refusals, limits and pages, without Slurm, Redis or a browser."""
import io
import re
from pathlib import Path

import pytest
from werkzeug.datastructures import FileStorage
from werkzeug.test import encode_multipart

from gateway.core import lifecycle
from gateway.extensions import db

from .helpers import zips
from .helpers.stack import SAMPLES, zip_folder
from .helpers.users import log_in_session as _log_in
from .helpers.users import make_user as _user
from .helpers.users import token_header as _token


def _submission_of(user):
    submission = lifecycle.create(user, "mine.zip")
    db.session.commit()
    return submission.id


@pytest.fixture
def alice(local_app):
    return _user("alice@example.org")


@pytest.fixture
def bob(local_app):
    return _user("bob@example.org")


def test_pages_need_a_login_and_send_anonymous_users_to_it(client):
    for path in ("/", "/account", "/submissions/1"):
        response = client.get(path)
        assert response.status_code == 302 and "/login" in response.headers["Location"], path


def test_login_and_signup_pages_render_forms_with_a_csrf_token(client):
    for path in ("/login", "/signup"):
        page = client.get(path).get_data(as_text=True)
        assert '<form method="post"' in page and 'name="csrf_token"' in page, path


def test_logged_in_researcher_sees_the_upload_form_and_their_account(client, alice):
    _log_in(client, alice)
    assert "Submit code" in client.get("/").get_data(as_text=True)
    assert alice.mlflow_username in client.get("/account").get_data(as_text=True)


def test_a_form_without_its_csrf_token_is_refused(client, alice):
    _log_in(client, alice)
    response = client.post("/", data={"file": (io.BytesIO(b"PK"), "s.zip")})
    assert response.status_code == 400
    assert "CSRF" in response.get_data(as_text=True)


def test_api_without_a_token_is_401_saying_how_to_authenticate(client):
    response = client.get("/api/v1/submissions")
    assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
    assert "Authorization: Bearer" in response.json["message"]


def test_api_with_a_wrong_token_is_401(client):
    response = client.get("/api/v1/submissions", headers={"Authorization": "Bearer m2d_nope"})
    assert response.status_code == 401 and response.json["error"] == "unauthorized"


def test_an_unapproved_users_token_is_403(client, local_app):
    waiting = _user("waiting@example.org", approved=False)
    response = client.get("/api/v1/submissions", headers=_token(waiting))
    assert response.status_code == 403 and "approval" in response.json["message"]


def test_another_users_submission_is_404_on_the_api_and_the_page(client, alice, bob):
    submission_id = _submission_of(alice)
    assert client.get(f"/api/v1/submissions/{submission_id}", headers=_token(alice)).status_code == 200
    assert client.get(f"/api/v1/submissions/{submission_id}", headers=_token(bob)).status_code == 404
    assert client.post(f"/api/v1/submissions/{submission_id}/cancel", headers=_token(bob)).status_code == 404
    _log_in(client, bob)
    assert client.get(f"/submissions/{submission_id}").status_code == 404


def test_a_bad_zip_is_refused_with_its_code_and_what_to_fix(client, alice, tmp_path):
    path = zips.make_nested_zip(tmp_path / "nested.zip", folder="my-project")
    response = client.post("/api/v1/submissions", headers=_token(alice),
                           data={"file": (path.open("rb"), "nested.zip")})
    assert response.status_code == 400 and response.json["error"] == "nested_folder"
    assert "my-project" in response.json["message"]


def test_an_upload_over_the_limit_is_413_in_json_on_the_api(client, alice, local_app):
    local_app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    response = client.post("/api/v1/submissions", headers=_token(alice),
                           data={"file": (io.BytesIO(b"x" * 128 * 1024), "big.zip")})
    assert response.status_code == 413 and response.json["error"] == "too_large"
    assert "Leave data and model weights out" in response.json["message"]


def test_a_good_zip_is_received_even_without_redis(client, alice, tmp_path):
    path = zip_folder(SAMPLES / "iris", tmp_path / "iris.zip")
    response = client.post("/api/v1/submissions", headers=_token(alice),
                           data={"file": (path.open("rb"), "iris.zip")})
    assert response.status_code == 201 and response.json["status"] == "received"
    assert [e["status"] for e in response.json["events"]] == ["received"]


def test_the_submission_page_escapes_the_file_name(client, alice):
    submission = lifecycle.create(alice, "<img src=x onerror=alert(1)>.zip")
    db.session.commit()
    _log_in(client, alice)
    page = client.get(f"/submissions/{submission.id}").get_data(as_text=True)
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;.zip" in page


def test_the_api_lists_only_the_callers_submissions(client, alice, bob):
    mine, theirs = _submission_of(alice), _submission_of(bob)
    ids = [s["id"] for s in client.get("/api/v1/submissions", headers=_token(alice)).json["submissions"]]
    assert mine in ids and theirs not in ids
    assert re.fullmatch(r"m2d_[\w-]+", _token(alice)["Authorization"].split()[1])


def test_the_api_list_pages_by_cursor_and_shows_only_the_callers_own(client, alice, bob):
    for _ in range(5):
        _submission_of(alice)
    _submission_of(bob)
    headers = _token(alice)
    seen, url = [], "/api/v1/submissions?limit=2"
    while url:
        body = client.get(url, headers=headers).json
        seen += [s["id"] for s in body["submissions"]]
        url = body["next"]
    assert len(seen) == 5 and seen == sorted(seen, reverse=True)
    refused = client.get("/api/v1/submissions?limit=1000", headers=headers)
    assert refused.status_code == 400 and "1 to 100" in refused.json["message"]
    assert client.get("/api/v1/submissions?before=x", headers=headers).status_code == 400


def _bytes_written():
    return int(next(line for line in open("/proc/self/io") if line.startswith("wchar:")).split()[1])


def test_an_upload_is_written_to_disk_once_and_kept_as_the_parsers_own_file(client, alice, local_app, tmp_path):
    path = zips.make_padded_zip(tmp_path / "big.zip", 6 * 1024**2)
    size = path.stat().st_size
    headers = _token(alice)
    with path.open("rb") as upload:  # the body in memory: the test client's own spill file is not the server's
        boundary, body = encode_multipart({"file": FileStorage(upload, "big.zip")})
    before = _bytes_written()
    response = client.post("/api/v1/submissions", headers=headers, data=body,
                           content_type=f"multipart/form-data; boundary={boundary}")
    written = _bytes_written() - before
    assert response.status_code == 201
    code = Path(local_app.config["DATA_DIR"]) / "submissions" / str(response.json["id"]) / "code"
    unpacked = sum(f.stat().st_size for f in code.rglob("*") if f.is_file())
    # the request parser's file (kept as upload.zip) plus the unpacked code;
    # a second copy of the zip would add another `size`
    assert written - unpacked < 1.3 * size, (written, unpacked, size)
    assert not any((Path(local_app.config["DATA_DIR"]) / "incoming").iterdir())
