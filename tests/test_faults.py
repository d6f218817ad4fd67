"""The fault matrix (issue 11) on the real stack: processes killed with -9 (one
process, not its group, as the OOM killer does), Redis restarted with its data
gone, the SMTP server down or hung, MLflow down at approval and during a job,
a prepare that keeps failing, a stuck submission. Submissions are in several states when each
fault hits; tests/helpers/invariants.py judges the outcome (none lost, no second Slurm
job, each email exactly once and in order, each submission in its right final
state).

The stack is private (tests.helpers.stack.PrivateStack): its own Redis and SMTP sink,
which these tests stop, wipe and pause, and short recovery settings
(SWEEP_AFTER 5 s); its jobs reach MLflow through a proxy of its own, which
they stop. Slurm's daemons are the testbed's, shared: their faults are
in test_slurm_faults.py, run last.
"""
import json
import os
import re
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests

from gateway.core.storage import SubmissionFiles

from .helpers import invariants
from .helpers.stack import SAMPLES, PrivateStack, free_port, job_zip, wait_for, zip_folder

ADMIN = f"admin-{uuid.uuid4().hex[:6]}@example.org"
ADMIN_PASSWORD = "fault matrix admin password"
BUILD_WORKERS = ("worker-build-1", "worker-build-2")


@pytest.fixture(scope="module")
def private(testbed):
    stack = PrivateStack(M2D_STUCK_AFTER="received=20", M2D_PREPARE_ATTEMPTS="3",
                         M2D_PREPARE_BACKOFF="2").start()
    stack.flask("users", "create", ADMIN, "--name", "Ad Min", "--admin", "--approve", "--password", ADMIN_PASSWORD)
    yield stack
    stack.stop()


def admin_mails(stack, submission_id, kind_in_subject):
    return [m for m in stack.mails_to(ADMIN)
            if f"Submission {submission_id}:" in m["Subject"] and kind_in_subject in m["Subject"]]


def admin_page(stack, path):
    session = requests.Session()
    token = lambda page: re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # noqa: E731
    login = session.get(f"{stack.url}/login", timeout=30)
    answer = session.post(f"{stack.url}/login", timeout=30, data={
        "csrf_token": token(login.text), "email": ADMIN, "password": ADMIN_PASSWORD})
    assert answer.ok, answer.text
    return session.get(f"{stack.url}{path}", timeout=30).text


def stuck_section(page):
    """The admin page's list of stuck submissions ("" when there is none)."""
    found = re.search(r'<section class="alerts".*?</section>', page, re.S)
    return found.group(0) if found else ""


def test_idle_workers_killed_lose_no_work_a_stuck_submission_alerts_once_and_a_failing_prepare_ends(
        private, tmp_path):
    researcher = private.researcher("idle", dry_run=False)
    for name in BUILD_WORKERS:  # idle: rq's scheduler child may live on, holding the dead worker's wait
        private.kill(name)
    stuck = researcher.submit(job_zip(tmp_path, 2, "stuck.zip"))
    unreadable = researcher.submit(job_zip(tmp_path, 2, "unreadable.zip"))
    code = SubmissionFiles(unreadable, root=private.env["M2D_DATA_DIR"]).code
    code.chmod(0)  # its prepare cannot read requirements.txt: not Slurm's fault, not the code's

    # nobody builds: past received's 20 s, the admins hear of it, once
    wait_for(lambda: admin_mails(private, stuck, "stuck in received"), 120, "the stuck alert email")
    assert f"#{stuck}<" in stuck_section(admin_page(private, "/admin/submissions"))
    for name in BUILD_WORKERS:
        private.respawn(name)
    researcher.wait_until(stuck, "completed", timeout=300)
    assert len(admin_mails(private, stuck, "stuck")) == 1  # moved on: never again for that episode
    assert f"#{stuck}<" not in stuck_section(admin_page(private, "/admin/submissions"))

    failed = researcher.wait_until(unreadable, "failed", timeout=300)
    code.chmod(0o750)  # so the stack's clean-up may remove it
    assert failed["reason"] == "the gateway could not prepare the job"
    assert failed["error"].startswith("Preparing the job failed 3 times; the last error was: PermissionError")
    wait_for(lambda: admin_mails(private, unreadable, "preparing its job failed"), 60, "the prepare_failed email")

    # the mail (and poll) worker, idle, killed; what it owed goes out once it is back
    wait_for(lambda: not private.running_horses("worker-mail"), 30, "the mail worker to be idle", interval=0.05)
    private.kill("worker-mail")
    after = researcher.submit(job_zip(tmp_path, 2, "after.zip"))
    time.sleep(3)
    private.respawn("worker-mail")
    invariants.check(private, {stuck: "completed", unreadable: "failed", after: "completed"})
    assert [m["Subject"].split(": ", 1)[1] for m in researcher.mails(after)] == [
        "code received", "queued for execution", "execution started", "execution finished"]


def test_workers_and_the_poller_killed_mid_task_lose_nothing_and_double_nothing(private, tmp_path):
    plain = private.researcher("midtask", dry_run=False)
    careful = private.researcher("midtask-dry", dry_run=True)
    long = plain.submit(job_zip(tmp_path, 15, "long.zip"))
    # a prepare, mid-way (image, MLflow, sbatch): its retry finds the job it made, if it made one
    _, horse = private.any_horse(BUILD_WORKERS)
    os.kill(horse, 9)
    dry = careful.submit(job_zip(tmp_path, 10, "dry.zip"))
    short = plain.submit(job_zip(tmp_path, 2, "short.zip"))
    plain.wait_until(long, "running", timeout=300)

    # the poll worker mid-cycle (sacct, the moves, the sweep); then the poller's clock
    private.running("worker-poll", "poll")
    private.kill("worker-poll")
    private.kill("poller")
    time.sleep(2)
    private.respawn("worker-poll")
    private.respawn("poller")

    # a send hung on a silent SMTP server, killed: its claim expires, it is sent once
    private.smtp.pause()
    try:
        hung = wait_for(lambda: _hung_horse(private), 120, "a send to hang on the paused SMTP server")
        os.kill(hung, 9)
    finally:
        private.smtp.resume()
    invariants.check(private, {long: "completed", dry: "completed", short: "completed"})


def _hung_horse(stack):
    """A send of the mail worker still running after a second and a half (waiting on SMTP)."""
    pid = stack.horse_running("worker-mail", "send_mail")
    time.sleep(1.5)
    still = pid in stack.running_horses("worker-mail") and stack.task_of("worker-mail") == "jobs.tasks.send_mail"
    return pid if still else None


def test_a_web_worker_killed_mid_upload_leaves_nothing_and_the_researcher_gets_an_error(private, tmp_path):
    researcher = private.researcher("upload")
    incoming = Path(private.env["M2D_DATA_DIR"]) / "incoming"
    body, boundary = _multipart(os.urandom(4 * 1024 * 1024))
    with socket.create_connection(("127.0.0.1", private.port), timeout=30) as conn:
        conn.sendall((f"POST /api/v1/submissions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      f"Authorization: Bearer {researcher.token}\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:1024 * 1024])
        worker = private.web_worker_reading_upload()
        os.kill(worker, 9)
        answer = b""
        try:
            conn.sendall(body[1024 * 1024:])
            answer = conn.recv(4096)
        except OSError:
            pass
    assert not answer.startswith(b"HTTP/1.1 201"), answer[:200]
    assert list(incoming.iterdir()) == []  # the anonymous file went with the worker
    assert researcher.api("GET", "/submissions").json()["submissions"] == []  # nothing half-created
    assert researcher.mails() == []
    # gunicorn's master has started another worker: the next upload is whole
    done = researcher.submit(job_zip(tmp_path, 2))
    invariants.check(private, {done: "completed"})


def _multipart(payload):
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.zip\"\r\n"
            "Content-Type: application/zip\r\n\r\n").encode()
    return head + payload + f"\r\n--{boundary}--\r\n".encode(), boundary


def test_redis_restarted_with_its_data_gone_loses_no_work(private, tmp_path):
    researcher = private.researcher("redis", dry_run=False)
    careful = private.researcher("redis-dry", dry_run=True)
    running = researcher.submit(job_zip(tmp_path, 15, "running.zip"))
    researcher.wait_until(running, "running", timeout=300)
    in_dry_run = careful.submit(job_zip(tmp_path, 2, "dry.zip"))
    fresh = researcher.submit(job_zip(tmp_path, 2, "fresh.zip"))  # its messages are in Redis, not yet taken
    private.restart_redis_empty(down_for=2)
    during = researcher.submit(job_zip(tmp_path, 2, "during.zip"))
    assert private.respawn_dead() == []  # rq workers and the poller ride out the outage
    invariants.check(private, {running: "completed", in_dry_run: "completed", fresh: "completed",
                               during: "completed"})


def test_smtp_down_for_a_while_delays_emails_but_sends_each_once_in_order(private, tmp_path):
    researcher = private.researcher("smtp", dry_run=False)
    private.smtp.stop()
    try:
        first = researcher.submit(job_zip(tmp_path, 2, "first.zip"))
        second = researcher.submit(job_zip(tmp_path, 2, "second.zip"))
        for sid in (first, second):
            researcher.wait_until(sid, "completed", timeout=300)  # the work goes on without mail
        time.sleep(5)  # a few more failed tries
    finally:
        private.smtp.start()
    invariants.check(private, {first: "completed", second: "completed"})
    for sid in (first, second):
        assert [m["Subject"].split(": ", 1)[1] for m in researcher.mails(sid)] == [
            "code received", "queued for execution", "execution started", "execution finished"]


def test_mlflow_down_at_approval_is_a_clear_error_and_approving_again_works(private):
    researcher = private.researcher("mlflow", approve=False)
    closed = f"http://127.0.0.1:{free_port()}"
    result = private.flask_result("users", "approve", researcher.address, env={"M2D_MLFLOW_URL": closed})
    assert result.returncode != 0
    assert "MLflow" in result.stderr and closed.removeprefix("http://") in result.stderr, result.stderr
    assert researcher.api("GET", "/me").status_code == 403  # not approved, not half-approved
    private.flask("users", "approve", researcher.address)  # MLflow answers again: the admin retries
    assert researcher.api("GET", "/me").status_code == 200


# A training script that meets two MLflow outages (the test stops the stack's
# MLflow proxy when the job says it waits for one): during the first it logs a
# metric and waits for MLflow to come back; the second lasts past its end.
OUTAGE_JOB = """
import sys, time
import mlflow
from mlflow.exceptions import MlflowException

def mlflow_down(run_id):
    started = time.monotonic()
    try:
        mlflow.get_run(run_id)
    except MlflowException as e:
        return time.monotonic() - started, str(e)
    return None

def wait(until, what):
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if found := until():
            return found
        time.sleep(0.5)
    sys.exit(f"timed out waiting for {what}")

run_id = mlflow.start_run().info.run_id
mlflow.log_metric("before", 1.0)
print("run", run_id, "- waiting for an outage", flush=True)
seconds, message = wait(lambda: mlflow_down(run_id), "an outage")
print(f"the call failed after {seconds:.2f} s: {message}", flush=True)
mlflow.log_metric("during", 2.0)
print("logged during the outage", flush=True)
wait(lambda: mlflow_down(run_id) is None, "MLflow to be back")
print("MLflow is back - waiting for the second outage", flush=True)
wait(lambda: mlflow_down(run_id), "the second outage")
mlflow.log_metric("lost", 3.0)
print("ending the run during the outage", flush=True)
mlflow.end_run()
"""


def test_mlflow_down_during_a_job_is_a_quick_clear_error_what_was_logged_arrives_when_it_is_back_and_the_job_ends(
        private, tmp_path, mlflow_url, admin_auth):
    researcher = private.researcher("mlflow-job", dry_run=False)
    sid = researcher.submit(zip_folder(SAMPLES / "sleeps", tmp_path / "outage.zip", extra={"main.py": OUTAGE_JOB}))
    logs = SubmissionFiles(sid, root=private.env["M2D_DATA_DIR"]).logs

    def job_says(words):
        return lambda: any(words in path.read_text() for path in logs.glob("slurm-*.out"))
    try:
        wait_for(job_says("waiting for an outage"), 300, "the job to start its run")
        private.mlflow.stop()
        wait_for(job_says("logged during the outage"), 120, "the job to see the outage")
        private.mlflow.start()
        wait_for(job_says("waiting for the second outage"), 120, "the job to see MLflow back")
        private.mlflow.stop()
        ended = researcher.wait_until(sid, ("failed", "completed"), timeout=300)
    finally:
        if private.mlflow.proc.poll() is not None:
            private.mlflow.start()
    out = next(logs.glob("slurm-*.out")).read_text()
    seconds = float(re.search(r"the call failed after ([0-9.]+) s: (.*)", out).group(1))
    assert seconds < 5, out  # at once, not after the client's minutes of retries
    assert "MLflow is not reachable from the relay" in out and "Your job goes on" in out
    # the job's own code let the last error through: it failed, with the reason in its stderr tail
    assert ended["status"] == "failed" and ended["reason"] == "FAILED with exit code 1"
    assert "MLflow is not reachable from the relay" in ended["error"]
    assert "1 logged values (metrics, params, tags) never reached MLflow and are lost" in ended["error"]
    run_id = re.search(r"run (\w+) - waiting", out).group(1)
    run = requests.get(f"{mlflow_url}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, auth=admin_auth,
                       timeout=30).json()["run"]
    assert {m["key"]: m["value"] for m in run["data"]["metrics"]} == {"before": 1.0, "during": 2.0}
    stats = json.loads(next(logs.glob("slurm-*.relay.json")).read_text())
    assert stats["undelivered"] == 1
    invariants.check(private, {sid: "failed"})


def test_a_full_export_folder_fails_the_job_with_the_disks_own_words(private, tmp_path):
    researcher = private.researcher("export", dry_run=False)
    fills = ("import time\ntime.sleep(2)\n"
             "with open('/mnt/export/weights.bin', 'wb') as f:\n"
             "    for _ in range(64):\n        f.write(b'w' * 1024 * 1024)\n")
    sid = researcher.submit(zip_folder(SAMPLES / "sleeps", tmp_path / "fills.zip", extra={"main.py": fills}))
    export = SubmissionFiles(sid, root=private.env["M2D_DATA_DIR"]).export
    mode = export.stat()  # a filesystem of 2 MB in its place, before the job starts: the same owner and mode
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=2m,uid={mode.st_uid},gid={mode.st_gid},"
                    f"mode={mode.st_mode & 0o7777:o}", "m2d-test-export", str(export)], check=True)
    try:
        failed = researcher.wait_until(sid, ("failed", "completed"), timeout=300)
        # /mnt/export (an image of the job's own) took it all; copying it out did not
        assert failed["status"] == "failed" and failed["reason"] == "FAILED with exit code 96", failed
        assert "No space left on device" in failed["error"] and "platform problem" in failed["error"]
        invariants.check(private, {sid: "failed"})
    finally:
        subprocess.run(["umount", "-l", str(export)], check=True)
