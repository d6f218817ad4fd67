"""From a state change in Slurm to the e-mail handed to SMTP: pushed events and the poll alone.

    set -a; . /opt/testbed/gateway.env; set +a
    .venv/bin/python -m bench.notify [N] [--held H] [--paths push poll]

For each path it starts a private gateway stack on a PostgreSQL database of its own:
``push`` with Slurm's pushed job events (the testbed's PrologSlurmctld and jobcomp/script
hook, jobs/events.py) and the poll every PUSHED_POLL_INTERVAL (60 s) as the backstop;
``poll`` with the poll alone, every POLL_INTERVAL (10 s). It submits N short jobs
(default 100; `sleep` 1-5 s, one CPU, no GPU, so two run at once on the testbed's node)
straight to Slurm as the job account, named as the stack's own (<prefix>-<id>), held
until each is recorded as its queued submission, then released; and, with --held H,
H more held jobs that never run, each a queued submission too, so each poll cycle
asks sacct about H + N jobs (bench/scale.py's shape). No upload, build or container:
what is timed is Slurm -> gateway -> e-mail.

For each job it takes Slurm's start and end times (the events' `at`, from sacct, whole
seconds: a delay reads up to 1 s long, 0.5 s on average) and the moment the SMTP sink
stored the "execution started" and "execution finished" e-mails (the sink names each
file by its arrival), and prints p50/p95/max of each delay.
"""
from __future__ import annotations

import argparse
import email
import email.policy
import os
import statistics
import subprocess
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from bench import percentile
from bench.scale import HeldJobs, slurm_env
from gateway.config import DEFAULTS
from tests.helpers.database import Postgres
from tests.helpers.invariants import app_of
from tests.helpers.stack import Stack, wait_for

SUBJECTS = {"running": "execution started", "completed": "execution finished"}
JOB_USER = os.environ.get("M2D_JOB_USER", "m2d-job")


def arrivals(address: str, since: str = "") -> dict[tuple[int, str], datetime]:
    """(submission id, status) -> when the sink stored that e-mail (``since``: a file name, stored after it)."""
    found = {}
    for path in Path(os.environ["M2D_MAIL_DIR"]).glob("*.eml"):
        if path.name < since:
            continue
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        if message["To"] != address:
            continue
        stamp = datetime.strptime(path.name.split("-")[0], "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=timezone.utc)
        for status, words in SUBJECTS.items():
            if message["Subject"].endswith(words):
                submission = int(message["Subject"].split("Submission ", 1)[1].split(":", 1)[0])
                found[(submission, status)] = stamp
    return found


def summary(delays: list[float]) -> str:
    delays = sorted(delays)
    return (f"p50 {statistics.median(delays):5.1f} s  p95 {percentile(delays, 95):5.1f} s  max {delays[-1]:5.1f} s  "
            f"({len(delays)} e-mails)")


def queued_submissions(stack: Stack, address: str, job_ids: list[str | None]) -> list[int]:
    """One queued submission of ``address`` per job id (None: its id comes later), in the stack's database."""
    from gateway.core.models import Submission, User, utcnow
    from gateway.extensions import db
    from m2d.contract.states import Status
    app = app_of(stack)
    with app.app_context():
        user = User.query.filter_by(email=address).one()
        now = utcnow()
        rows = [Submission(user_id=user.id, status=Status.QUEUED.value, slurm_job_id=job_id, filename="bench.zip",
                           created_at=now, updated_at=now) for job_id in job_ids]
        db.session.add_all(rows)
        db.session.commit()
        ids = [row.id for row in rows]
        db.session.remove()
        db.engine.dispose()
    return ids


def record_jobs(stack: Stack, jobs: dict[int, str]) -> None:
    from sqlalchemy import update

    from gateway.core.models import Submission
    from gateway.extensions import db
    app = app_of(stack)
    with app.app_context():
        for sid, job_id in jobs.items():
            db.session.execute(update(Submission).where(Submission.id == sid).values(slurm_job_id=job_id))
        db.session.commit()
        db.session.remove()
        db.engine.dispose()


def moments(stack: Stack, sids: list[int]) -> list[tuple[int, str, datetime]]:
    """(submission, status, Slurm's moment of it) of each started and ended event."""
    from gateway.core.models import Event
    from gateway.extensions import db
    app = app_of(stack)
    with app.app_context():
        rows = db.session.query(Event.submission_id, Event.status, Event.at).filter(
            Event.submission_id.in_(sids), Event.status.in_(list(SUBJECTS))).all()
        db.session.remove()
        db.engine.dispose()
    return rows


def as_job_account(script: str) -> str:
    return subprocess.run(["setpriv", f"--reuid={JOB_USER}", f"--regid={JOB_USER}", "--init-groups", "--",
                           "bash", "-c", script], capture_output=True, text=True, env=slurm_env(), cwd="/tmp",
                          check=True, timeout=900).stdout


def one_path(path: str, count: int, held: int, database: Postgres) -> dict[str, list[float]]:
    settings = {"M2D_SQLALCHEMY_DATABASE_URI": database.url(database.create()),
                "M2D_POLL_INTERVAL": str(DEFAULTS["POLL_INTERVAL"]),
                "M2D_PUSHED_POLL_INTERVAL": str(DEFAULTS["PUSHED_POLL_INTERVAL"])}
    stack = Stack(events=path == "push", **settings).start()
    try:
        # not approved: no MLflow account, so a job's end costs no MLflow lookup (what is timed is Slurm -> e-mail)
        address = f"notify-{path}-{uuid.uuid4().hex[:8]}@example.org"
        stack.flask("users", "create", address, "--name", "Notify")
        with HeldJobs(JOB_USER, loops=4) as load:
            if held:
                load.submit(held)
                queued_submissions(stack, address, load.ids)
            sids = queued_submissions(stack, address, [None] * count)
            prefix = stack.env["M2D_SLURM_JOB_PREFIX"]
            sbatch = "\n".join(
                f"sbatch --parsable --hold --job-name={prefix}-{sid} --output=/dev/null --chdir=/tmp "
                f"--cpus-per-task=1 --mem=100M --time=00:05:00 --wrap='sleep {1 + n % 5}' || exit 1"
                for n, sid in enumerate(sids))
            jobs = dict(zip(sids, (line.split(";")[0] for line in as_job_account(sbatch).split())))
            load.ids.extend(jobs.values())  # cancelled with the held ones if anything goes wrong
            record_jobs(stack, jobs)
            started, since = time.monotonic(), datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
            subprocess.run(["scontrol", "release", ",".join(jobs.values())], env=slurm_env(), check=True, timeout=120)
            wait_for(lambda: len([k for k in arrivals(address, since) if k[0] in jobs]) >= 2 * count,
                     300 + 10 * count, f"{2 * count} e-mails")
            print(f"  {path}: {count} jobs ran and mailed in {time.monotonic() - started:.0f} s "
                  f"({held} held jobs beside them)")
        stored = arrivals(address, since)
        delays = {status: [] for status in SUBJECTS}
        for sid, status, at in moments(stack, sids):
            if (sid, status) in stored:
                delays[status].append((stored[(sid, status)] - at.replace(tzinfo=timezone.utc)).total_seconds())
        return delays
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("count", nargs="?", type=int, default=100)
    parser.add_argument("--held", type=int, default=0, help="held jobs beside them, each an active submission")
    parser.add_argument("--paths", nargs="+", default=["push", "poll"], choices=["push", "poll"])
    args = parser.parse_args()
    database = Postgres.from_environment()
    results = {}
    try:
        for path in args.paths:
            results[path] = one_path(path, args.count, args.held, database)
    finally:
        for name in list(database.created):
            database.drop(name)
    print(f"\n{args.count} short jobs, {args.held} held beside them; load average {os.getloadavg()[0]:.1f}")
    for path, delays in results.items():
        pace = (f"pushed events, poll every {DEFAULTS['PUSHED_POLL_INTERVAL']} s" if path == "push"
                else f"poll alone, every {DEFAULTS['POLL_INTERVAL']} s")
        print(f"{path} ({pace}):")
        print(f"  job started in Slurm -> 'execution started' e-mail stored: {summary(delays['running'])}")
        print(f"  job ended in Slurm   -> 'execution finished' e-mail stored: {summary(delays['completed'])}")


if __name__ == "__main__":
    main()
