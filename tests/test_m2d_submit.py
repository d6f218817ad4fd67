"""`m2d` against the running stack: logging in, submitting the iris sample and
waiting for it to complete, cancelling, and the errors a researcher can meet
(a bad token, an unknown submission, a zip the platform refuses)."""
import json
import stat

import pytest

from .helpers import zips
from .helpers.client import m2d
from .helpers.stack import REPO

IRIS = REPO / "m2d" / "samples" / "iris"
SLEEPS = REPO / "tests" / "samples" / "sleeps"


@pytest.fixture
def researcher(stack):
    return stack.researcher("m2d-user")


@pytest.fixture
def logged_in(stack, researcher, tmp_path):
    """The environment of a researcher who ran `m2d login` (its own config folder)."""
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    done = m2d("login", "--url", stack.url, "--token", researcher.token, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return env


def test_login_checks_the_token_and_keeps_it_readable_only_by_its_owner(stack, researcher, logged_in, tmp_path):
    path = tmp_path / "config" / "m2d" / "config.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"url": stack.url, "token": researcher.token}


def test_submitted_iris_sample_completes_and_wait_exits_0(researcher, logged_in, tmp_path):
    done = m2d("submit", IRIS, "--json", env=logged_in, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    submission_id = json.loads(done.stdout)["id"]
    waited = m2d("wait", submission_id, "--timeout", 900, env=logged_in, cwd=tmp_path, timeout=960)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "completed" in waited.stdout
    assert researcher.submission(submission_id)["status"] == "completed"
    listed = json.loads(m2d("status", "--json", env=logged_in, cwd=tmp_path).stdout)
    assert [s["id"] for s in listed["submissions"]] == [submission_id]


def test_cancelled_submission_makes_wait_exit_1(researcher, logged_in, tmp_path):
    submission_id = json.loads(m2d("submit", SLEEPS, "--json", env=logged_in, cwd=tmp_path).stdout)["id"]
    cancelled = m2d("cancel", submission_id, env=logged_in, cwd=tmp_path)
    assert cancelled.returncode == 0, cancelled.stderr
    waited = m2d("wait", submission_id, "--timeout", 120, env=logged_in, cwd=tmp_path, timeout=180)
    assert waited.returncode == 1
    assert researcher.submission(submission_id)["status"] == "cancelled"


def test_a_zip_the_platform_refuses_is_not_uploaded(researcher, logged_in, tmp_path):
    zips.make_zip_without(tmp_path / "bad.zip", "main.py")
    done = m2d("submit", tmp_path / "bad.zip", env=logged_in, cwd=tmp_path)
    assert done.returncode == 1
    assert "no main.py at its root" in done.stderr
    assert researcher.api("GET", "/submissions").json()["submissions"] == []


def test_a_wrong_token_is_refused_with_how_to_log_in_again(stack, tmp_path):
    env = {"M2D_URL": stack.url, "M2D_TOKEN": "not-a-token", "XDG_CONFIG_HOME": str(tmp_path / "config")}
    done = m2d("status", env=env, cwd=tmp_path)
    assert done.returncode == 1
    assert "not valid" in done.stderr and "m2d login" in done.stderr


def test_an_unknown_submission_is_an_error_naming_it(logged_in, tmp_path):
    done = m2d("status", 999999, "--json", env=logged_in, cwd=tmp_path)
    assert done.returncode == 1
    answer = json.loads(done.stdout)
    assert answer["error"] == "not_found" and "999999" in answer["message"]
