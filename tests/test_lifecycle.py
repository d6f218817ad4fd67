"""The state machine against a real (SQLite) database, and the poller's decisions."""
import dataclasses
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from flask import render_template_string

from gateway.adapters.slurm import JobInfo, SlurmError
from gateway.adapters.smtp import MailError
from gateway.core import accounts, lifecycle, provenance, scheduling, workflow
from gateway.core.models import Email, Event, Submission
from gateway.core.storage import SubmissionFiles
from gateway.extensions import db
from jobs import mail, poller, tasks
from m2d.contract.states import Status

# the production database too (PostgreSQL: the integration tier)
pytestmark = pytest.mark.databases("sqlite", "postgresql")


def _submission():
    user = accounts.create_user(f"lifecycle-{uuid.uuid4().hex[:6]}@example.org", "Life Cycle")
    submission = lifecycle.create(user, "submission.zip")
    db.session.commit()
    return submission.id


def _kinds(submission_id):
    return [e.kind for e in Email.query.filter_by(submission_id=submission_id).order_by(Email.id)]


def test_a_move_writes_status_event_and_owed_email(local_app):
    sid = _submission()
    assert lifecycle.advance(sid, Status.RECEIVED, Status.BUILDING)
    assert lifecycle.advance(sid, Status.BUILDING, Status.QUEUED, slurm_job_id="42")
    submission = db.session.get(Submission, sid)
    db.session.refresh(submission)
    assert submission.status == "queued" and submission.slurm_job_id == "42"
    assert [e.status for e in submission.events] == ["received", "building", "queued"]
    assert _kinds(sid) == ["received", "queued"]


def test_a_move_from_the_wrong_state_changes_nothing(local_app):
    sid = _submission()
    assert not lifecycle.advance(sid, Status.BUILDING, Status.QUEUED)
    assert db.session.get(Submission, sid).status == "received"
    assert Event.query.filter_by(submission_id=sid).count() == 1


def test_racing_moves_only_one_wins(local_app):
    sid = _submission()
    results = []

    def move():
        with local_app.app_context():
            results.append(lifecycle.advance(sid, Status.RECEIVED, Status.BUILDING))
            db.session.remove()

    threads = [threading.Thread(target=move) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    assert Event.query.filter_by(submission_id=sid, status="building").count() == 1


def _queued_submission():
    sid = _submission()
    lifecycle.advance(sid, Status.RECEIVED, Status.BUILDING)
    lifecycle.advance(sid, Status.BUILDING, Status.QUEUED, slurm_job_id="7")
    return db.session.get(Submission, sid)


def _info(state, exit_code=0, started=True, signal=0):
    start = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc) if started else None
    end = datetime(2026, 1, 2, 3, 4, 9, tzinfo=timezone.utc) if state != "RUNNING" else None
    return JobInfo(job_id="7", state=state, exit_code=exit_code, signal=signal, start=start, end=end)


def test_an_ended_jobs_provenance_names_its_node_then_its_mlflow_runs_or_why_they_are_unknown(local_app):
    submission = _queued_submission()
    submission.user.mlflow_experiment_id = "5"
    db.session.commit()
    local_app.config["MLFLOW_ADMIN_PASSWORD"] = None  # whatever the environment says (make test sources one)
    assert poller._apply(submission, dataclasses.replace(_info("COMPLETED"), node="gpu01"))
    chain = provenance.chain(submission.id)
    assert [r.kind for r in chain] == ["job", "mlflow", "manifest"]
    job, runs = (provenance.latest(submission.id, kind) for kind in ("job", "mlflow"))
    assert (job["slurm_job_id"], job["node"], job["exit_code"]) == ("7", "gpu01", 0)
    # no MLflow admin password here: the record says so instead of leaving a gap
    assert runs["experiment_id"] == "5" and runs["run_ids"] is None and "MLFLOW_ADMIN_PASSWORD" in runs["error"]


def test_job_that_ran_between_two_polls_gets_started_before_finished(local_app):
    submission = _queued_submission()
    assert poller._apply(submission, _info("COMPLETED"))
    db.session.expire_all()
    assert submission.status == "completed" and submission.exit_code == 0
    assert _kinds(submission.id) == ["received", "queued", "started", "finished"]
    running = Event.query.filter_by(submission_id=submission.id, status="running").one()
    assert running.at == datetime(2026, 1, 2, 3, 4, 5)  # sacct's start time, not ours


@pytest.mark.parametrize("state", ["TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"])
def test_timeout_and_out_of_memory_are_failures_with_their_reason(local_app, state):
    submission = _queued_submission()
    poller._apply(submission, _info(state, exit_code=0))
    db.session.expire_all()
    assert submission.status == "failed" and submission.reason.startswith(state)


def test_out_of_memory_says_so_and_names_the_limit(local_app):
    local_app.config["SLURM_MEM"] = "3G"
    submission = _queued_submission()
    poller._apply(submission, _info("OUT_OF_MEMORY", exit_code=0, signal=125))
    db.session.expire_all()
    assert "ran out of memory" in submission.reason and "its limit is 3G" in submission.reason
    assert "signal" not in submission.reason  # Slurm's 0:125 marks OUT_OF_MEMORY, it is no signal


def test_a_full_export_says_so_and_names_the_limits(local_app):
    local_app.config.update(EXPORT_MAX_BYTES=2 * 1024**3, EXPORT_MAX_FILES=10_000)
    submission = _queued_submission()
    poller._apply(submission, _info("FAILED", exit_code=95))  # gateway/core/jobscript.py's EXPORT_FULL_EXIT
    db.session.expire_all()
    assert submission.status == "failed" and submission.exit_code == 95
    assert submission.reason.startswith("EXPORT_FULL: /mnt/export is over its limit of 2 GiB / 10,000 files")


def test_a_job_stopped_at_its_time_limit_to_keep_its_export_is_a_timeout(local_app):
    local_app.config["SLURM_TIME"] = "02:00:00"
    submission = _queued_submission()
    poller._apply(submission, _info("FAILED", exit_code=97))  # gateway/core/jobscript.py's TIME_UP_EXIT
    db.session.expire_all()
    assert submission.status == "failed"
    assert submission.reason == "TIMEOUT: the job ran past its time limit of 02:00:00"


def test_nonzero_exit_is_failed_with_exit_code(local_app):
    submission = _queued_submission()
    poller._apply(submission, _info("FAILED", exit_code=3))
    db.session.expire_all()
    assert submission.status == "failed" and submission.exit_code == 3
    assert submission.reason == "FAILED with exit code 3"
    assert submission.error == "(no stderr was written)"


def test_cancelled_while_pending_goes_straight_to_cancelled(local_app):
    submission = _queued_submission()
    poller._apply(submission, _info("CANCELLED", started=False))
    db.session.expire_all()
    assert submission.status == "cancelled"
    assert _kinds(submission.id) == ["received", "queued", "cancelled"]


def test_applying_the_same_view_twice_moves_once(local_app):
    submission = _queued_submission()
    assert poller._apply(submission, _info("RUNNING"))
    db.session.expire_all()
    assert not poller._apply(submission, _info("RUNNING"))
    assert _kinds(submission.id).count("started") == 1


# ================================================================ dry runs

def _dry_run_queued_submission():
    sid = _submission()
    lifecycle.advance(sid, Status.RECEIVED, Status.BUILDING)
    lifecycle.advance(sid, Status.BUILDING, Status.DRY_RUN_QUEUED, dry_run_job_id="7")
    return db.session.get(Submission, sid)


def _dry_run_logs(submission_id, out, err):
    logs = SubmissionFiles(submission_id).logs
    logs.mkdir(parents=True, exist_ok=True)
    (logs / "dryrun-7.out").write_text(out)
    (logs / "dryrun-7.err").write_text(err)


def test_passed_dry_run_keeps_its_log_sends_nothing_and_hands_on_to_prepare(local_app, monkeypatch):
    prepared = []
    monkeypatch.setattr(poller.queue, "enqueue_prepare", prepared.append)
    submission = _dry_run_queued_submission()
    _dry_run_logs(submission.id, "epoch 1 loss 0.5\n", "")
    assert poller._apply(submission, _info("COMPLETED"))
    db.session.expire_all()
    assert submission.status == "dry_run_passed" and submission.dry_run_exit_code == 0
    assert submission.slurm_job_id is None and submission.exit_code is None  # the real job is next
    assert "epoch 1 loss 0.5" in submission.dry_run_log
    assert [e.status for e in submission.events] == ["received", "building", "dry_run_queued",
                                                     "dry_run_running", "dry_run_passed"]
    assert _kinds(submission.id) == ["received"]  # the dry run's steps are silent
    assert prepared == [submission.id]
    assert submission.to_dict()["dry_run"]["log"] == submission.dry_run_log


def test_failed_dry_run_ends_the_submission_with_its_whole_log_in_the_email(local_app):
    local_app.config["STDERR_TAIL_LINES"] = 20
    submission = _dry_run_queued_submission()
    traceback = "".join(f"  frame {i}\n" for i in range(60)) + "RuntimeError: first batch\n"
    _dry_run_logs(submission.id, "loading\n", "Traceback (most recent call last):\n" + traceback)
    poller._apply(submission, _info("FAILED", exit_code=1))
    db.session.expire_all()
    assert submission.status == "dry_run_failed" and submission.state.terminal
    assert submission.exit_code == submission.dry_run_exit_code == 1
    assert submission.reason == "dry run FAILED with exit code 1"
    # all 60 frames, far past the real run's 20-line tail
    assert "  frame 0\n" in submission.error and "RuntimeError: first batch" in submission.error
    assert submission.error == submission.dry_run_log and "loading" in submission.error
    assert _kinds(submission.id) == ["received", "dry_run_failed"]
    _, body = mail.render(Email.query.filter_by(submission_id=submission.id, kind="dry_run_failed").one())
    assert "  frame 0\n" in body and "RuntimeError: first batch" in body and "will not be submitted" in body


TRACEBACKS = Path(__file__).parent / "data" / "tracebacks"


def _log_in(client, user):
    user.approved_at = datetime.now(timezone.utc).replace(tzinfo=None)
    db.session.commit()
    with client.session_transaction() as session:
        session["_user_id"] = user.get_id()
        session["_fresh"] = True


def test_a_failed_dry_runs_page_and_email_lead_with_the_exception_and_what_to_change(local_app, client):
    """The CLaM sample's log: GitPython's 15 lines, then the traceback of a relay
    refusal (mlflow 2.11.3, real stderr); the page and the email open on its
    last line and what to change, then the whole log; no Slurm job will come."""
    submission = _dry_run_queued_submission()
    err = (TRACEBACKS / "gitpython-warning-then-valueerror-mlflow-2.11.3.txt").read_text().split("Traceback")[0]
    err += (TRACEBACKS / "relay-refusal-mlflow-2.11.3.txt").read_text()
    _dry_run_logs(submission.id, "epoch 1\n", err)
    poller._apply(submission, _info("FAILED", exit_code=1))
    db.session.expire_all()
    last = "mlflow.exceptions.RestException: PERMISSION_DENIED: only your own experiment ('alice-dryrun')"
    _, body = mail.render(Email.query.filter_by(submission_id=submission.id, kind="dry_run_failed").one())
    assert body.index(last) < body.index("Bad git executable")  # first, before the log's warning
    assert body.index("MLFLOW_EXPERIMENT_NAME") < body.index("Bad git executable")
    _log_in(client, submission.user)
    page = client.get(f"/submissions/{submission.id}").get_data(as_text=True)
    headline = page.index('<p class="failure-headline">')
    assert headline < page.index("Bad git executable") and "only your own experiment (&#39;alice-dryrun&#39;)" in page
    assert page.index('<p class="failure-hint">') < page.index("Bad git executable")
    assert "the dry run failed, so the real job will not be submitted" in page
    assert submission.to_dict()["dry_run"]["headline"].startswith("mlflow.exceptions.RestException: PERMISSION_DENIED")


def test_a_failed_dry_runs_headline_is_escaped_and_found_in_its_own_stderr_file(local_app, client):
    """Code that sends its stderr to /mnt/export (the hospital's sample does) leaves
    the traceback in export-dryrun/; what it wrote is shown as text, never markup."""
    submission = _dry_run_queued_submission()
    _dry_run_logs(submission.id, "", "")
    export = SubmissionFiles(submission.id).root / "export-dryrun"
    export.mkdir(parents=True, exist_ok=True)
    (export / "error.txt").write_text('Traceback (most recent call last):\n  File "/code/main.py", line 3\n'
                                      'ValueError: <img src=x onerror=alert(1)>\n')
    poller._apply(submission, _info("FAILED", exit_code=1))
    db.session.expire_all()
    _log_in(client, submission.user)
    page = client.get(f"/submissions/{submission.id}").get_data(as_text=True)
    assert "<code>ValueError: &lt;img src=x onerror=alert(1)&gt;</code>" in page
    assert "<img src=x" not in page


def test_a_dry_run_log_is_capped_at_its_end(local_app):
    local_app.config["DRY_RUN_LOG_BYTES"] = 100
    submission = _dry_run_queued_submission()
    _dry_run_logs(submission.id, "x" * 1000, "y" * 50 + "\nthe end\n")
    poller._apply(submission, _info("FAILED", exit_code=1))
    db.session.expire_all()
    assert "[... the first 900 bytes left out ...]" in submission.dry_run_log
    assert submission.dry_run_log.endswith("the end\n") and len(submission.dry_run_log) < 400


def test_a_dry_run_timeout_names_the_dry_runs_limit(local_app):
    local_app.config["DRY_RUN_TIME"] = "00:03:00"
    submission = _dry_run_queued_submission()
    poller._apply(submission, _info("TIMEOUT"))
    db.session.expire_all()
    assert submission.status == "dry_run_failed"
    assert "time limit of 00:03:00" in submission.dry_run_reason and "M2D_DRY_RUN" in submission.dry_run_reason


def test_a_dry_run_cancelled_while_pending_cancels_the_submission(local_app):
    submission = _dry_run_queued_submission()
    poller._apply(submission, _info("CANCELLED", started=False))
    db.session.expire_all()
    assert submission.status == "cancelled" and submission.slurm_job_id is None
    assert _kinds(submission.id) == ["received", "cancelled"]


def test_cancel_between_the_dry_run_and_the_real_job_ends_it_at_once(local_app, monkeypatch):
    sid, slurm = _passed_dry_run(monkeypatch)  # (its Slurm: make unit once ran the testbed's squeue here)
    tasks.cancel(sid)
    db.session.expire_all()
    assert db.session.get(Submission, sid).status == "cancelled"
    assert _kinds(sid) == ["received", "cancelled"]
    # no real job was ever recorded: Slurm is asked for one under its name, in case a prepare died after sbatch
    assert slurm.looked_up == [f"m2d-{sid}"] and slurm.cancelled == []


def test_the_poller_asks_slurm_about_the_dry_run_then_the_real_job(local_app):
    dry = _dry_run_queued_submission()
    real = _submission()
    lifecycle.advance(real, Status.RECEIVED, Status.BUILDING)
    lifecycle.advance(real, Status.BUILDING, Status.QUEUED, slurm_job_id="8")
    real = db.session.get(Submission, real)

    class Scheduler:
        asked = []

        def statuses(self, job_ids):
            self.asked.append(sorted(job_ids))
            return {}

        def pending_reasons(self, job_ids):
            return {}

    poller.poll_once(Scheduler())
    assert Scheduler.asked == [["7", "8"]]
    assert poller._job_id(dry) == "7" and poller._job_id(real) == "8"


def test_the_page_shows_the_dry_runs_log_and_its_export_files(local_app):
    submission = _dry_run_queued_submission()
    _dry_run_logs(submission.id, "epoch 1 loss 0.5\n", "")
    export = SubmissionFiles(submission.id).root / "export-dryrun"
    export.mkdir()
    (export / "result.txt").write_text("accuracy=0.5\n")
    poller._apply(submission, _info("COMPLETED"))
    db.session.expire_all()
    with local_app.test_request_context():
        html = render_template_string('{% include "_dry_run.html" %}', submission=submission)
    assert "Dry run" in html and "epoch 1 loss 0.5" in html
    assert "result.txt" in html and "accuracy=0.5" in html


# ------------------------------------- a cancel against the passed dry run's real job

def _passed_dry_run(monkeypatch):
    """A submission whose dry run passed, the image cached, and a Slurm that
    records what it is asked (the interleaving is forced, no timing)."""
    submission = _dry_run_queued_submission()
    lifecycle.advance(submission.id, Status.DRY_RUN_QUEUED, Status.DRY_RUN_RUNNING)
    lifecycle.advance(submission.id, Status.DRY_RUN_RUNNING, Status.DRY_RUN_PASSED)
    code = SubmissionFiles(submission.id).code
    code.mkdir(parents=True, exist_ok=True)
    (code / "requirements.txt").write_text("")

    class Images:
        def ensure(self, *requirements, **options):
            return object()

    class Slurm:
        def __init__(self):
            self.submitted, self.cancelled, self.named, self.looked_up = [], [], {}, []

        def cancel(self, job_id):
            self.cancelled.append(job_id)

        def find(self, name, since):
            self.looked_up.append(name)
            return self.named.get(name)

    slurm = Slurm()
    monkeypatch.setattr(workflow.ImageBuilder, "from_config", lambda config: Images())
    monkeypatch.setattr(scheduling, "scheduler", lambda: slurm)
    return submission.id, slurm


def test_a_cancel_arriving_while_the_real_job_is_sbatched_scancels_it(local_app, monkeypatch):
    sid, slurm = _passed_dry_run(monkeypatch)

    def sbatch(submission_id, files, image, dry_run=False):
        # the researcher's cancel lands inside sbatch: it ends the submission,
        # and leaves the job to the prepare that holds it (rq retries its lookup)
        with pytest.raises(workflow.SubmissionBusy):
            tasks.cancel(submission_id)
        slurm.submitted.append("99")
        slurm.named[f"m2d-{submission_id}"] = "99"
        return "99"

    monkeypatch.setattr(workflow, "_submit", sbatch)
    tasks.prepare(sid)
    db.session.expire_all()
    submission = db.session.get(Submission, sid)
    assert submission.status == "cancelled" and submission.slurm_job_id == "99"  # recorded, for the record
    assert slurm.submitted == ["99"] and slurm.cancelled == ["99"]  # the job it made is gone
    # never queued: Slurm's job was never the submission's
    assert [e.status for e in submission.events][-2:] == ["dry_run_passed", "cancelled"]
    tasks.cancel(sid)  # rq's retry: nothing left to look for
    assert slurm.cancelled == ["99"]


def test_a_passed_dry_runs_submission_is_queued_only_once_slurm_has_its_job(local_app, monkeypatch):
    sid, slurm = _passed_dry_run(monkeypatch)
    seen = []

    def sbatch(submission_id, files, image, dry_run=False):
        seen.append((workflow._status(submission_id), Email.query.filter_by(submission_id=sid, kind="queued").count()))
        if len(seen) == 1:
            raise SlurmError("sbatch: error: Unable to open file .../job/job.sbatch")
        return "100"

    monkeypatch.setattr(workflow, "_submit", sbatch)
    monkeypatch.setattr(tasks, "get_current_job", lambda: type("RqJob", (), {"retries_left": 2})())
    with pytest.raises(SlurmError):  # rq tries again later
        tasks.prepare(sid)
    db.session.expire_all()
    assert db.session.get(Submission, sid).status == "dry_run_passed"  # not queued: Slurm has nothing
    tasks.prepare(sid)  # rq's retry
    db.session.expire_all()
    submission = db.session.get(Submission, sid)
    assert seen == [(Status.DRY_RUN_PASSED, 0), (Status.DRY_RUN_PASSED, 0)]
    assert submission.status == "queued" and submission.slurm_job_id == "100"
    assert Email.query.filter_by(submission_id=sid, kind="queued").count() == 1
    assert [e.status for e in submission.events].count("queued") == 1


def test_a_cancel_before_the_real_jobs_claim_means_no_real_job_at_all(local_app, monkeypatch):
    sid, slurm = _passed_dry_run(monkeypatch)
    monkeypatch.setattr(workflow, "_submit", lambda *a, **k: pytest.fail("sbatch for a cancelled submission"))
    tasks.cancel(sid)
    tasks.prepare(sid)  # the poller's hand-on, after the cancel won
    db.session.expire_all()
    assert db.session.get(Submission, sid).status == "cancelled" and slurm.cancelled == []


def test_a_prepare_that_died_after_the_claim_resumes_and_records_the_job(local_app, monkeypatch):
    sid, slurm = _passed_dry_run(monkeypatch)
    lifecycle.advance(sid, Status.DRY_RUN_PASSED, Status.QUEUED)  # claimed, then the worker died
    monkeypatch.setattr(workflow, "_submit", lambda *a, **k: "100")  # finds (or makes) the job by name
    tasks.prepare(sid)
    db.session.expire_all()
    submission = db.session.get(Submission, sid)
    assert submission.status == "queued" and submission.slurm_job_id == "100" and slurm.cancelled == []


def test_a_cancel_after_the_prepare_died_between_sbatch_and_the_record_scancels_the_job_by_name(
        local_app, monkeypatch):
    sid, slurm = _passed_dry_run(monkeypatch)
    lifecycle.advance(sid, Status.DRY_RUN_PASSED, Status.QUEUED)  # claimed
    slurm.named[f"m2d-{sid}"] = "101"  # sbatch ran, then the worker died: no id recorded
    tasks.cancel(sid)
    db.session.expire_all()
    submission = db.session.get(Submission, sid)
    assert submission.status == "cancelled" and slurm.cancelled == ["101"]
    assert submission.slurm_job_id == "101"


def test_a_cancel_during_the_build_has_the_worker_look_for_a_job_by_name(local_app, monkeypatch):
    asked = []
    monkeypatch.setattr(lifecycle.queue, "enqueue_cancel", asked.append)
    sid = _submission()
    lifecycle.advance(sid, Status.RECEIVED, Status.BUILDING)
    assert lifecycle.cancel(db.session.get(Submission, sid)) == Status.CANCELLED
    assert asked == [sid]  # a prepare that died after its sbatch left a job only the name finds


class _Server:
    """A mail server that takes the message, then fails (``after``) or fails before taking it."""

    def __init__(self, fail=None):
        self.fail, self.taken = fail, []

    def send(self, to, subject, body, message_id=None, accepted=None):
        if self.fail == "before":
            raise MailError("connection refused")
        self.taken.append(message_id)
        accepted()
        if self.fail == "goodbye":
            raise MailError("connection reset during QUIT")


def test_an_email_is_marked_sent_the_moment_the_server_took_it_even_if_the_goodbye_fails(local_app):
    sid = _submission()
    server = _Server(fail="goodbye")
    assert mail.send_owed(sid, server) == 1
    row = Email.query.filter_by(submission_id=sid).one()
    assert row.sent_at is not None
    assert mail.send_owed(sid, _Server()) == 0  # nothing owed: never a second copy


def test_an_email_the_server_never_took_is_released_for_the_next_try(local_app):
    sid = _submission()
    with pytest.raises(MailError):
        mail.send_owed(sid, _Server(fail="before"))
    row = Email.query.filter_by(submission_id=sid).one()
    db.session.refresh(row)
    assert row.sent_at is None and row.claimed_at is None and "connection refused" in row.last_error
    assert mail.send_owed(sid, _Server()) == 1
