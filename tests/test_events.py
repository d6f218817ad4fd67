"""Pushed job events (issue 24 item 3): Slurm's hook (deploy/libexec/m2d-slurm-event)
posts a job id when a job starts and ends; the gateway then asks sacct about that job
at once (jobs/events.py), and the poll, slower now, finds whatever a lost push missed."""
import os
import socket
import subprocess
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from gateway.adapters.slurm import JobInfo
from gateway.core import accounts, lifecycle
from gateway.core.models import Submission
from gateway.extensions import db
from gateway.web import events as receiver
from jobs import events
from m2d.contract.states import Status

from .helpers.stack import REPO, Stack, job_zip, wait_for

HOOK = REPO / "deploy" / "libexec" / "m2d-slurm-event"


# ------------------------------------------------------------------ the hook

def _installed_hook(tmp_path):
    """The hook as the installer makes it, posting to the gateways in tmp_path/events.d."""
    (tmp_path / "events.d").mkdir()
    hook = tmp_path / "m2d-slurm-event"
    hook.write_text(HOOK.read_text().replace("@EVENTS_DIR@", str(tmp_path / "events.d"))
                    .replace("@EVENTS_LOG@", str(tmp_path / "events.log")))
    hook.chmod(0o755)
    return hook


def _register(tmp_path, prefix, url, token="t0ken"):
    conf = tmp_path / "events.d" / f"{prefix}.curl"
    conf.write_text(f'url = "{url}"\nheader = "Authorization: Bearer {token}"\n')
    conf.chmod(0o600)


def _run_hook(hook, **env):
    # slurmctld's environment for its scripts: SLURM_* and no PATH
    return subprocess.run([str(hook)], env=env, capture_output=True, text=True, timeout=10)


def test_the_hook_returns_at_once_and_exits_0_while_the_gateway_hangs(tmp_path):
    hook = _installed_hook(tmp_path)
    with socket.socket() as hung:  # accepts connections (the kernel does) and never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        _register(tmp_path, "m2dx", f"http://127.0.0.1:{hung.getsockname()[1]}/slurm/events")
        done = _run_hook(hook, SLURM_JOB_ID="42", SLURM_JOB_NAME="m2dx-7")  # timeout=10: a hang fails here
        assert done.returncode == 0 and done.stdout == "" and done.stderr == ""
        assert not (tmp_path / "events.log").exists()  # returned while its post still waits: detached
        # the post ran detached and gave up on its own (curl --max-time), into the log
        logged = wait_for(lambda: (tmp_path / "events.log").is_file() and (tmp_path / "events.log").read_text(),
                          30, "the hook's post to time out")
    assert "job 42 -> m2dx.curl" in logged and "imed out" in logged


def test_the_hook_posts_only_to_the_gateway_whose_prefix_names_the_job_and_never_fails(tmp_path):
    hook = _installed_hook(tmp_path)
    received = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        server.settimeout(10)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/slurm/events"
        _register(tmp_path, "m2dx", url, token="right")
        _register(tmp_path, "m2dxother", url, token="wrong")
        for env in ({"SLURM_JOB_ID": "7; touch /tmp/x", "SLURM_JOB_NAME": "m2dx-1"},  # not an id: nothing
                    {"SLURM_JOB_NAME": "m2dx-1"},  # no id at all
                    {"SLURM_JOB_ID": "8", "SLURM_JOB_NAME": "other-1"},  # no gateway's job
                    {"JOBID": "9", "JOBNAME": "m2dx-12-dry"}):  # jobcomp/script's names
            assert _run_hook(hook, **env).returncode == 0
        connection, _ = server.accept()
        with connection:
            request = connection.recv(65536).decode()
            connection.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        received.append(request)
        server.settimeout(2)
        with pytest.raises(socket.timeout):  # and no other post
            server.accept()
    assert "Authorization: Bearer right" in received[0] and received[0].endswith("job_id=9")


def test_the_hook_exits_0_when_its_folder_is_missing(tmp_path):
    hook = _installed_hook(tmp_path)
    (tmp_path / "events.d").rmdir()
    assert _run_hook(hook, SLURM_JOB_ID="1", SLURM_JOB_NAME="m2d-1").returncode == 0


# -------------------------------------------------------------- the endpoint

def test_the_endpoint_takes_a_job_id_with_the_token_only(local_app, client, monkeypatch):
    pushed = []
    monkeypatch.setattr(receiver.queue, "push_job_event", pushed.append)
    assert client.post("/slurm/events", data={"job_id": "5"}).status_code == 404  # no token set: no endpoint
    local_app.config["SLURM_EVENTS_TOKEN"] = "s3cret"
    assert client.post("/slurm/events", data={"job_id": "5"}).status_code == 403
    assert client.post("/slurm/events", data={"job_id": "5"},
                       headers={"Authorization": "Bearer s3cre"}).status_code == 403
    good = {"Authorization": "Bearer s3cret"}
    for bad in ("", "5 6", "-1", "5\n", "x" * 30):
        assert client.post("/slurm/events", data={"job_id": bad}, headers=good).status_code == 400
    assert client.post("/slurm/events", data={"job_id": "5"}, headers=good).status_code == 204
    assert pushed == ["5"]


# ---------------------------------------------------------------- the check

class _Slurm:
    """sacct's answers, in turn per job (a decision test: what the push leads to)."""

    def __init__(self, **answers):
        self.answers, self.asked = answers, []

    def statuses(self, ids):
        self.asked.append(sorted(ids))
        return {i: self.answers[i].pop(0) for i in ids if self.answers.get(i)}


def _info(job_id, state):
    start = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc) if state != "PENDING" else None
    end = datetime(2026, 1, 2, 3, 4, 9, tzinfo=timezone.utc) if state not in ("PENDING", "RUNNING") else None
    return JobInfo(job_id=job_id, state=state, exit_code=0 if end else None, signal=0, start=start, end=end)


def _queued(job_id):
    user = accounts.create_user(f"events-{uuid.uuid4().hex[:6]}@example.org", "Events")
    submission = lifecycle.create(user, "submission.zip")
    db.session.commit()
    lifecycle.advance(submission.id, Status.RECEIVED, Status.BUILDING)
    lifecycle.advance(submission.id, Status.BUILDING, Status.QUEUED, slurm_job_id=job_id)
    return submission.id


def test_a_pushed_job_moves_as_sacct_says_and_is_checked_again_while_sacct_trails(local_app):
    sid = _queued("71")
    _queued("72")  # pushed, never changes: checked again, then left to the poll
    # 71: PrologSlurmctld's push, sacct still says PENDING; the recheck sees it ran and ended
    slurm = _Slurm(**{"71": [_info("71", "PENDING"), _info("71", "COMPLETED")],
                      "72": [_info("72", "PENDING")] * 9})
    clock = [1000.0]
    watcher = events.Watcher(slurm, clock=lambda: clock[0])
    watcher.due = {"71": (0.0, 0), "72": (0.0, 0), "99": (0.0, 0)}  # 99: no job of ours
    watcher.check_due()
    assert db.session.get(Submission, sid).status == "queued"  # sacct trails slurmctld: not yet
    assert set(watcher.due) == {"71", "72"}
    for delay in events.RECHECKS:
        clock[0] += delay
        watcher.check_due()
    db.session.expire_all()
    assert db.session.get(Submission, sid).status == "completed"
    assert watcher.due == {}
    assert slurm.asked[:2] == [["71", "72"], ["71", "72"]]  # one sacct call a round; 99 is not asked about
    assert slurm.asked[2:] == [["72"]] * (len(events.RECHECKS) - 1)  # then left to the poll


# ------------------------------------------------------ against the testbed

@pytest.fixture(scope="module")
def pushed(testbed):
    """Pushes on, the poll 10 minutes apart: what moves in this test is what Slurm pushed."""
    stack = Stack(events=True, M2D_PUSHED_POLL_INTERVAL="600").start()
    yield stack
    stack.stop()


def _subjects(researcher, sid):
    return [m["Subject"].split(": ", 1)[1] for m in researcher.mails(sid)]


def test_pushed_events_carry_a_job_through_its_dry_run_and_its_run_long_before_a_poll(pushed, tmp_path):
    researcher = pushed.researcher("pushed")
    sid = researcher.submit(job_zip(tmp_path, 2))
    # the poll is 600 s away: each move below is a pushed event's (dry run ended ->
    # the real job's sbatch; started; ended)
    researcher.wait_until(sid, "completed", timeout=300)
    researcher.wait_for_mails(sid, 4)
    time.sleep(2)  # room for a duplicate to show
    assert _subjects(researcher, sid) == ["code received", "queued for execution", "execution started",
                                          "execution finished"]
    log = (pushed.logs / "poller.log").read_text()
    assert "checking pushed job events between" in log


def test_lost_pushes_cost_time_not_a_state_the_poll_finds_every_change(testbed, tmp_path):
    stack = Stack(events=True, M2D_PUSHED_POLL_INTERVAL="3").start()
    try:
        stack.drop_events()  # the hook finds no gateway for these jobs: every push is lost
        researcher = stack.researcher("lost", dry_run=False)
        sid = researcher.submit(job_zip(tmp_path, 2))
        researcher.wait_until(sid, "completed", timeout=300)
        researcher.wait_for_mails(sid, 4)
        time.sleep(2)
        assert _subjects(researcher, sid) == ["code received", "queued for execution", "execution started",
                                              "execution finished"]
    finally:
        stack.stop()
    assert not os.path.exists(stack.events_conf)


def test_the_testbeds_slurm_runs_the_hook_for_every_job(testbed):
    conf = Path(os.environ["M2D_TESTBED_DIR"]) / "slurm" / "etc" / "slurm.conf"
    settings = dict(line.split("=", 1) for line in conf.read_text().splitlines() if "=" in line and line[0] != "#")
    assert settings["PrologSlurmctld"] == settings["JobCompLoc"] == "/usr/local/libexec/m2d/m2d-slurm-event"
    assert settings["JobCompType"] == "jobcomp/script" and "EpilogSlurmctld" not in settings
    assert Path(settings["PrologSlurmctld"]).stat().st_uid == 0
