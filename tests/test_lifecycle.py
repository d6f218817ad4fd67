"""The state machine against a real (SQLite) database, and the poller's decisions."""
import threading
from datetime import datetime, timezone

import pytest

from gateway import accounts, lifecycle
from gateway.adapters.slurm import JobInfo
from gateway.extensions import db
from gateway.models import Email, Event, Submission
from gateway.states import Status
from jobs import poller


def _submission():
    user = accounts.create_user("lifecycle@example.org", "Life Cycle")
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
    poller._apply(submission, _info("OUT_OF_MEMORY", exit_code=0))
    db.session.expire_all()
    assert "ran out of memory" in submission.reason and "its limit is 3G" in submission.reason


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
