"""Admin commands started as root run as the gateway's account (the owner of
DATA_DIR): `flask releases approve` as root once wrote the released copy
root:root 0600 and the owner's download answered HTTP 500."""
import os
import subprocess
import sys

from .helpers.stack import REPO, SAMPLES, zip_folder


def flask_as_root(stack, *args, env=None):
    assert os.geteuid() == 0  # the tests run as root; Stack.flask runs commands as the gateway's account
    return subprocess.run([sys.executable, "-m", "flask", "--app", "gateway", *args], cwd=REPO,
                          env=stack.env | (env or {}), capture_output=True, text=True, timeout=120)


def test_a_release_approved_as_root_is_downloaded_by_its_owner(stack, tmp_path):
    researcher = stack.researcher("root-approval", dry_run=False)
    submission_id = researcher.submit(zip_folder(SAMPLES / "iris", tmp_path / "iris.zip"))
    assert researcher.wait_until(submission_id, {"completed", "failed", "build_failed"})["status"] == "completed"
    asked = researcher.api("POST", f"/submissions/{submission_id}/release-requests",
                           json={"justification": "result.txt: the accuracy, for a paper"})
    assert asked.status_code == 201, asked.text
    for name in ("root-reviewer", "root-reviewer-2"):  # two approvals release a file (the default)
        reviewer = stack.researcher(name)
        stack.flask("users", "grant-reviewer", reviewer.address)
        approved = flask_as_root(stack, "releases", "approve", str(asked.json()["id"]), "--reviewer",
                                 reviewer.address)
        assert approved.returncode == 0, approved.stdout + approved.stderr

    download = researcher.api("GET", f"/submissions/{submission_id}/export/result.txt")
    assert download.status_code == 200, download.text
    assert download.content == b"accuracy=1.0\n"
    assert f"running as {stack.env.get('M2D_USER', 'm2d')}" in approved.stderr


def test_as_root_without_setpriv_the_command_refuses_and_says_how(stack):
    refused = flask_as_root(stack, "users", "list", env={"PATH": "/nonexistent"})
    assert refused.returncode == 1
    assert "not as root" in refused.stderr and "su -s /bin/sh" in refused.stderr
