"""Stuck submissions and failing prepares (gateway.core.alerts): the decisions, and
their rows on a real (SQLite) database. The email itself, through the real
workers and SMTP: tests/test_faults.py."""
import uuid
from datetime import datetime, timedelta

import pytest

from gateway.adapters.apptainer import NoSpace
from gateway.adapters.slurm import SlurmError
from gateway.config import ConfigError
from gateway.core import accounts, alerts, lifecycle, workflow
from gateway.core.models import Alert, Email, Submission
from gateway.extensions import db
from jobs import mail, poller, tasks
from m2d.contract.states import Status

from .helpers.users import log_in, make_user

T0 = datetime(2026, 12, 3, 12, 0, 0)
LIMITS = {Status.RECEIVED: timedelta(minutes=15), Status.RUNNING: timedelta(hours=25)}


def test_a_status_past_its_limit_is_stuck_and_one_within_is_not():
    assert alerts.is_stuck(Status.RECEIVED, T0, T0 + timedelta(minutes=16), LIMITS)
    assert not alerts.is_stuck(Status.RECEIVED, T0, T0 + timedelta(minutes=14), LIMITS)
    assert not alerts.is_stuck(Status.RUNNING, T0, T0 + timedelta(hours=24), LIMITS)


def test_a_status_without_a_limit_is_never_stuck():
    assert not alerts.is_stuck(Status.QUEUED, T0, T0 + timedelta(days=365), LIMITS)


def test_the_backoff_doubles_and_stops_at_an_hour():
    assert [alerts.backoff(n, 60).total_seconds() for n in (1, 2, 3, 4, 5)] == [60, 120, 240, 480, 960]
    assert alerts.backoff(20, 60) == timedelta(hours=1)


def test_thresholds_are_read_from_the_setting_and_a_bad_one_is_refused():
    assert alerts.thresholds({"STUCK_AFTER": {"received": "900"}}) == {Status.RECEIVED: timedelta(seconds=900)}
    with pytest.raises(ConfigError, match="M2D_STUCK_AFTER has recieved=900: expected a status"):
        alerts.thresholds({"STUCK_AFTER": {"recieved": "900"}})
    with pytest.raises(ConfigError, match="whole seconds"):
        alerts.thresholds({"STUCK_AFTER": {"received": "15m"}})
    with pytest.raises(ConfigError, match="a final status"):
        alerts.thresholds({"STUCK_AFTER": {"completed": "60"}})


def test_the_default_limits_cover_every_status_that_waits_on_the_gateway(local_app):
    limits = alerts.thresholds(local_app.config)
    assert {Status.RECEIVED, Status.BUILDING, Status.DRY_RUN_PASSED, Status.QUEUED, Status.RUNNING} <= set(limits)


# ------------------------------------------------------------- on a database

def _admin():
    return accounts.create_user(f"admin-{uuid.uuid4().hex[:6]}@example.org", "Ad Min", is_admin=True)


def _submission():
    user = accounts.create_user(f"alerts-{uuid.uuid4().hex[:6]}@example.org", "Al Erts")
    submission = lifecycle.create(user, "submission.zip")
    db.session.commit()
    return submission.id


def _age(submission_id, seconds):
    """Its last change ``seconds`` ago."""
    submission = db.session.get(Submission, submission_id)
    submission.updated_at = submission.updated_at - timedelta(seconds=seconds)
    db.session.commit()


def _alert_mails(submission_id):
    return Email.query.filter(Email.submission_id == submission_id, Email.alert_id.isnot(None)).all()


def test_a_stuck_submission_raises_one_alert_and_one_email_per_admin_once(local_app):
    first, second = _admin(), _admin()
    sid = _submission()
    _age(sid, 3600)
    assert alerts.raise_stuck() == 1
    assert alerts.raise_stuck() == 0  # the next cycle: the same episode
    alert = Alert.query.filter_by(submission_id=sid).one()
    assert alert.kind == "stuck" and alert.status == "received" and alert.open
    assert sorted(e.recipient for e in _alert_mails(sid)) == sorted([first.email, second.email])
    subject, body = mail.render(_alert_mails(sid)[0])
    assert subject == f"[m2d] Submission {sid}: stuck in received"
    assert "no change for 60 minutes in received (limit: 15 minutes, M2D_STUCK_AFTER)" in body


def test_a_submission_that_moves_on_and_sticks_again_is_a_new_episode(local_app):
    _admin()
    sid = _submission()
    _age(sid, 3600)
    alerts.raise_stuck()
    assert lifecycle.advance(sid, Status.RECEIVED, Status.BUILDING)
    assert alerts.open_alerts() == []  # it moved: no longer flagged
    _age(sid, 2 * 3600)  # building's limit is an hour
    assert alerts.raise_stuck() == 1
    assert [a.status for a in Alert.query.filter_by(submission_id=sid).order_by(Alert.id)] == ["received", "building"]
    assert len(_alert_mails(sid)) == 2


def test_a_fresh_submission_raises_nothing(local_app):
    _admin()
    sid = _submission()
    assert alerts.raise_stuck() == 0
    assert Alert.query.filter_by(submission_id=sid).count() == 0


def test_the_admin_page_lists_the_stuck_submission_until_it_moves(local_app, client):
    admin = make_user("boss@example.org", admin=True)
    sid = _submission()
    _age(sid, 3600)
    alerts.raise_stuck()
    log_in(client, admin.email)
    page = client.get("/admin/submissions").get_data(as_text=True)
    assert "Stuck (1)" in page and f"#{sid}" in page and "no change for 60 minutes in received" in page
    assert lifecycle.advance(sid, Status.RECEIVED, Status.BUILDING)
    assert "Stuck (" not in client.get("/admin/submissions").get_data(as_text=True)


def test_a_prepare_failing_for_another_reason_than_slurm_is_retried_with_backoff_then_fails(local_app, monkeypatch):
    local_app.config.update(PREPARE_ATTEMPTS=3, PREPARE_BACKOFF=60)
    admin = _admin()
    sid = _submission()

    def broken(submission_id, retries_left):
        raise PermissionError(13, "Permission denied", "/srv/m2d/data/submissions/1/code/requirements.txt")

    monkeypatch.setattr(workflow, "_prepare", broken)
    tasks.prepare(sid)  # recorded, not raised: the sweep owns the retry
    submission = db.session.get(Submission, sid)
    db.session.refresh(submission)
    assert submission.status == "received" and submission.prepare_failures == 1
    assert "PermissionError" in submission.prepare_error
    failed_at = submission.prepare_failed_at
    assert not alerts.prepare_due(submission, failed_at + timedelta(seconds=59), 60)
    assert alerts.prepare_due(submission, failed_at + timedelta(seconds=60), 60)

    tasks.prepare(sid)
    db.session.refresh(submission)
    assert submission.prepare_failures == 2
    assert not alerts.prepare_due(submission, submission.prepare_failed_at + timedelta(seconds=119), 60)

    tasks.prepare(sid)  # the third: it ends
    db.session.refresh(submission)
    assert submission.status == "failed" and submission.reason == "the gateway could not prepare the job"
    assert submission.error.startswith("Preparing the job failed 3 times; the last error was: PermissionError")
    kinds = [(e.kind, e.recipient) for e in Email.query.filter_by(submission_id=sid).order_by(Email.id)]
    assert kinds == [("received", ""), ("failed", ""), ("prepare_failed", admin.email)]
    _, body = mail.render(Email.query.filter_by(submission_id=sid, kind="failed").one())
    assert "not a problem with your code" in body and "Preparing the job failed 3 times" in body


def test_failures_of_an_earlier_status_do_not_count(local_app):
    sid = _submission()
    submission = db.session.get(Submission, sid)
    submission.prepare_failures, submission.prepare_failed_at = 4, submission.updated_at
    db.session.commit()
    assert lifecycle.advance(sid, Status.RECEIVED, Status.BUILDING)
    db.session.refresh(submission)
    assert alerts.failures_now(submission) == 0
    assert alerts.prepare_due(submission, submission.updated_at, 60)


def test_the_sweep_waits_out_the_backoff_before_queueing_a_failed_prepare_again(local_app, monkeypatch):
    queued = []
    monkeypatch.setattr(poller.queue, "enqueue_prepare", queued.append)
    local_app.config.update(SWEEP_AFTER=60, PREPARE_BACKOFF=600)
    sid = _submission()
    _age(sid, 120)
    poller._sweep()
    assert queued == [sid]  # lost message: handed on again
    queued.clear()
    alerts.prepare_failed(sid, OSError(28, "No space left on device"))
    poller._sweep()
    assert queued == []  # within its 10 minutes' pause
    submission = db.session.get(Submission, sid)
    submission.prepare_failed_at -= timedelta(seconds=601)
    db.session.commit()
    poller._sweep()
    assert queued == [sid]


def test_a_poll_whose_sacct_fails_moves_nothing_and_still_sweeps(local_app, monkeypatch):
    queued = []
    monkeypatch.setattr(poller.queue, "enqueue_prepare", queued.append)
    waiting = _submission()
    _age(waiting, 120)
    running = _submission()
    assert lifecycle.advance(running, Status.RECEIVED, Status.BUILDING)
    assert lifecycle.advance(running, Status.BUILDING, Status.QUEUED, slurm_job_id="77")

    class AccountingDown:
        def statuses(self, job_ids):
            raise SlurmError("sacct: error: Problem talking to the database: Connection refused", cmd=["sacct"])

        def pending_reasons(self, job_ids):
            return {}

    assert poller.poll_once(AccountingDown()) == 0
    assert db.session.get(Submission, running).status == "queued"  # not lost, not failed: it waits
    assert queued == [waiting]  # the sweep went on


def test_a_build_stopped_by_a_full_disk_is_a_failed_prepare_not_a_failed_build(local_app, monkeypatch):
    sid = _submission()

    def full(submission_id, files):
        raise NoSpace("no space left in the image folder /srv/m2d/images: an administrator frees space")

    monkeypatch.setattr(workflow, "_build", full)
    tasks.prepare(sid)
    submission = db.session.get(Submission, sid)
    db.session.refresh(submission)
    assert submission.status == "building" and submission.prepare_failures == 1  # retried later, not build_failed
    assert "no space left in the image folder" in submission.prepare_error
