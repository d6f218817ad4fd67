"""Queued submissions draining through Slurm under a per-researcher limit.

    set -a; . /opt/testbed/gateway.env; set +a
    .venv/bin/python -m bench.drain [N] [--users U] [--max-running R]

Starts a private gateway stack (its own Redis and SMTP sink) whose researchers
may each run R jobs at once (M2D_SLURM_MAX_RUNNING, default 1: Slurm's MaxJobs
on each researcher's account), with jobs of one CPU and no GPU, so the
testbed's one node runs as many at once as it has cores. U researchers
(default 3) submit N trivial jobs in all (default 1,000; no requirements, so
the image is built once and reused; no dry runs), in the order least kind to
fairness: all of the first researcher's, then all of the second's, and so on.
Then it waits until every one has ended and prints, from Slurm's own start and
end times (the submissions' events):

- throughput: jobs a minute from the first start to the last end;
- the limit: the most jobs of one researcher running at one moment (<= R);
- fairness: each researcher's share of the starts in each tenth of the drain
  (1/U each is fair; first come, first served would give the first researcher
  all of the early ones), and the longest run of consecutive starts by one
  researcher.

At about 40 jobs a minute on the 2-core testbed (N=150, docs/benchmarks.md) 1,000 take some 25
minutes: pass a smaller N. Before every job is in Slurm the gateway's prepare queue
(first come, first served) decides whose jobs Slurm can choose from; the output says
when that was.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from tests.helpers.stack import PrivateStack, zip_folder

TRIVIAL = "print('done', flush=True)\n"


def slurm_times(researcher, submission_id: int) -> tuple[datetime, datetime, datetime]:
    """When the submission's job was handed to Slurm (queued), and Slurm's start
    and end of it (its running and final events)."""
    events = researcher.submission(submission_id)["events"]
    at = {e["status"]: datetime.fromisoformat(e["at"]).astimezone(timezone.utc) for e in events}
    return at["running"], at.get("completed") or at["failed"], at["queued"]


def most_at_once(intervals: list[tuple[datetime, datetime]]) -> int:
    """The most intervals open at one moment (an end at the same second as a
    start is taken first: Slurm's times are whole seconds)."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("count", nargs="?", type=int, default=1000)
    parser.add_argument("--users", type=int, default=3)
    parser.add_argument("--max-running", type=int, default=1)
    args = parser.parse_args()
    stack = PrivateStack(M2D_SLURM_MAX_RUNNING=str(args.max_running), M2D_SLURM_GPUS="0", M2D_SLURM_CPUS="1",
                         M2D_SLURM_MEM="512M", M2D_DAILY_SUBMISSIONS=str(args.count + 1),
                         M2D_POLL_INTERVAL="2").start()
    try:
        researchers = [stack.researcher(f"drain{n}", dry_run=False) for n in range(args.users)]
        share = [args.count // args.users + (n < args.count % args.users) for n in range(args.users)]
        with tempfile.TemporaryDirectory(prefix="bench-drain-") as tmp:
            (Path(tmp) / "code").mkdir()
            (Path(tmp) / "code" / "main.py").write_text(TRIVIAL)
            (Path(tmp) / "code" / "requirements.txt").write_text("")
            trivial = zip_folder(Path(tmp) / "code", Path(tmp) / "trivial.zip")
            # the image, once, before the clock starts: the drain is Slurm's part
            first = researchers[0].submit(trivial)
            researchers[0].wait_until(first, "completed", timeout=900)
            started = time.monotonic()
            submitted = [(r, [r.submit(trivial) for _ in range(n)]) for r, n in zip(researchers, share)]
        uploaded = time.monotonic() - started
        print(f"{args.count} submissions of {args.users} researchers uploaded in {uploaded:.0f} s "
              f"(load average {os.getloadavg()[0]:.1f}); draining, limit {args.max_running} running each")
        for researcher, ids in submitted:
            for sid in ids:
                state = researcher.wait_until(sid, {"completed", "failed", "cancelled"},
                                              timeout=600 + 30 * args.count)
                assert state["status"] == "completed", state
        wall = time.monotonic() - started
        jobs = [(n, *slurm_times(r, sid)) for n, (r, ids) in enumerate(submitted) for sid in ids]
    finally:
        stack.stop()
    report(jobs, args, wall)


def report(jobs: list[tuple[int, datetime, datetime, datetime]], args, wall: float) -> None:
    first = min(start for _, start, _, _ in jobs)
    last = max(end for _, _, end, _ in jobs)
    span = (last - first).total_seconds()
    print(f"drained in {span:.0f} s of Slurm time (first start to last end; {wall:.0f} s from the first "
          f"upload to the last final state): {len(jobs) / span * 60:.1f} jobs/min; load average "
          f"{os.getloadavg()[0]:.1f}")
    # before this, the gateway's prepare queue (first come, first served) decides whose jobs Slurm has
    in_slurm = (max(queued for *_, queued in jobs) - first).total_seconds()
    print(f"every job was in Slurm {in_slurm:.0f} s after the first start")
    limit = max(most_at_once([(s, e) for u, s, e, _ in jobs if u == user]) for user in range(args.users))
    print(f"most jobs of one researcher running at once: {limit} (limit {args.max_running}); "
          f"of all: {most_at_once([(s, e) for _, s, e, _ in jobs])}")
    order = [user for user, *_ in sorted(jobs, key=lambda j: (j[1], j[2]))]
    longest = run = 1
    for before, now in zip(order, order[1:]):
        run = run + 1 if now == before else 1
        longest = max(longest, run)
    print(f"longest run of consecutive starts by one researcher: {longest} "
          f"(first come, first served: {max(Counter(order).values())})")
    print("share of the starts in each tenth of the drain (researcher 0 submitted first):")
    print("tenth " + " ".join(f"{'r' + str(u):>6}" for u in range(args.users)))
    tenth = -(-len(order) // 10)  # ten windows, the last one maybe shorter
    for k in range(0, len(order), tenth):
        window = Counter(order[k:k + tenth])
        total = sum(window.values())
        print(f"{k // tenth + 1:>5} " + " ".join(f"{window[u] / total:>6.2f}" for u in range(args.users)))


if __name__ == "__main__":
    main()
