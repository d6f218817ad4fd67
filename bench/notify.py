"""From a state change in Slurm to the email handed to SMTP, on the testbed.

    set -a; . /opt/testbed/gateway.env; set +a
    .venv/bin/python -m bench.notify [N] [--poll SECONDS]

Starts a private gateway stack with the default poll interval (POLL_INTERVAL,
10 s; --poll to try another), submits the iris sample N times (default 100;
without dry runs, so each submission is one Slurm job) and waits for all of
them. For each job it takes Slurm's own start and end times (the events' `at`,
from sacct) and the moment the SMTP sink stored the "execution started" and
"execution finished" emails (the sink names each file by its arrival time),
and prints p50/p95/max of the delay for each. With a poll interval of P the
delay is about P/2 on average and at most P plus a cycle and the mail worker's
turn.
"""
from __future__ import annotations

import argparse
import email
import email.policy
import os
import statistics
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from bench import percentile
from gateway.config import DEFAULTS
from tests.helpers.stack import SAMPLES, Stack, zip_folder

SUBJECTS = {"running": "execution started", "completed": "execution finished"}


def arrivals(address: str) -> dict[tuple[str, str], datetime]:
    """(submission id, status) -> when the sink stored that email."""
    found = {}
    for path in Path(os.environ["M2D_MAIL_DIR"]).glob("*.eml"):
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        if message["To"] != address:
            continue
        stamp = datetime.strptime(path.name.split("-")[0], "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=timezone.utc)
        for status, words in SUBJECTS.items():
            if message["Subject"].endswith(words):
                submission = message["Subject"].split("Submission ", 1)[1].split(":", 1)[0]
                found[(submission, status)] = stamp
    return found


def summary(delays: list[float]) -> str:
    delays = sorted(delays)
    return (f"p50 {statistics.median(delays):5.1f} s  p95 {percentile(delays, 95):5.1f} s  max {delays[-1]:5.1f} s  "
            f"({len(delays)} emails)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("count", nargs="?", type=int, default=100)
    parser.add_argument("--poll", type=int, default=DEFAULTS["POLL_INTERVAL"])
    args = parser.parse_args()
    stack = Stack(M2D_POLL_INTERVAL=str(args.poll), M2D_DAILY_SUBMISSIONS=str(args.count + 1)).start()
    try:
        researcher = stack.researcher("notify", dry_run=False)
        with tempfile.TemporaryDirectory(prefix="bench-notify-") as tmp:
            iris = zip_folder(SAMPLES / "iris", Path(tmp) / "iris.zip")
            ids = [researcher.submit(iris) for _ in range(args.count)]
        for submission_id in ids:
            researcher.wait_until(submission_id, {"completed", "failed"}, timeout=600 + 60 * args.count)
        researcher.wait_for_mails(ids[-1], 4, timeout=120)
        stored = arrivals(researcher.address)
        delays = {status: [] for status in SUBJECTS}
        for submission_id in ids:
            events = {e["status"]: e for e in researcher.submission(submission_id)["events"]}
            for status in SUBJECTS:
                if status in events and (str(submission_id), status) in stored:
                    at = datetime.fromisoformat(events[status]["at"]).astimezone(timezone.utc)
                    delays[status].append((stored[(str(submission_id), status)] - at).total_seconds())
        if not all(delays.values()):
            raise SystemExit(f"no delays matched: emails {sorted(stored)}, events of {ids[0]}: "
                             f"{researcher.submission(ids[0])['events']}")
        print(f"{args.count} iris jobs, poll interval {args.poll} s:")
        print(f"  job started in Slurm -> 'execution started' email stored: {summary(delays['running'])}")
        print(f"  job ended in Slurm   -> 'execution finished' email stored: {summary(delays['completed'])}")
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
