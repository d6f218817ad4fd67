"""The poller and the mailer against real Slurm, Redis and SMTP: a job that
starts and ends between polls, seen by several pollers and mailers at once,
still produces each email exactly once, "started" before "finished"."""
import subprocess
import threading

from gateway.adapters.slurm.cli_scheduler import CliScheduler
from gateway.core import lifecycle
from gateway.core.models import Event, User
from gateway.extensions import db
from jobs import mail, poller
from m2d.contract.states import Status

from .helpers.stack import wait_for


def _finished_job():
    job_id = subprocess.run(["sbatch", "--parsable", "--job-name=m2d-poller-race", "--output=/dev/null",
                             "--wrap", "sleep 1"], capture_output=True, text=True, check=True,
                            timeout=30).stdout.strip().split(";")[0]
    scheduler = CliScheduler()
    wait_for(lambda: (info := scheduler.statuses([job_id]).get(job_id)) and info.finished, 60,
             f"Slurm job {job_id} to finish")
    return job_id


def _in_threads(app, count, work):
    def run():
        with app.app_context():
            try:
                work()
            finally:
                db.session.remove()
    threads = [threading.Thread(target=run) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_racing_pollers_and_mailers_send_each_email_once_in_order(stack, app):
    researcher = stack.researcher("race")
    # a job that has already run before the gateway ever polled it
    job_id = _finished_job()
    user = User.query.filter_by(email=researcher.address).one()
    submission = lifecycle.create(user, "race.zip")
    db.session.commit()
    sid = submission.id
    lifecycle.advance(sid, Status.RECEIVED, Status.BUILDING)
    lifecycle.advance(sid, Status.BUILDING, Status.QUEUED, slurm_job_id=job_id)

    # three pollers here, plus the stack's own poller and mail worker
    _in_threads(app, 3, poller.poll_once)
    _in_threads(app, 3, lambda: mail.send_owed(sid))

    mails = researcher.wait_for_mails(sid, 4)
    subjects = [m["Subject"].split(": ", 1)[1] for m in researcher.mails(sid)]
    assert subjects == ["code received", "queued for execution", "execution started",
                        "execution finished"]
    db.session.rollback()
    statuses = [e.status for e in Event.query.filter_by(submission_id=sid).order_by(Event.id)]
    assert statuses == ["received", "building", "queued", "running", "completed"]
    assert "started running at" in mails[2].get_content()
