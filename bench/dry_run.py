"""The time a dry run adds to a submission, on the testbed.

    set -a; . /opt/testbed/gateway.env; set +a
    .venv/bin/python -m bench.dry_run [N] [SAMPLE]

Starts a private gateway stack (as the tests do) and submits SAMPLE (iris, the
default, or clam: m2d/samples/NAME) N times (default 2) for a researcher with
dry runs and N times for one without
(`flask users dry-run --skip`), alternately, one at a time, after one warm-up
submission that builds the environment image. Prints each submission's upload
to completed time, the dry run's own span (building -> dry_run_passed) and the
wait until the real job queued, then the median difference: what the dry run
adds.
"""
import statistics
import sys
import time
from datetime import datetime

from tests.helpers.stack import SAMPLES, Stack, zip_folder

FINAL = {"completed", "failed", "build_failed", "dry_run_failed", "cancelled"}


def run_once(researcher, zip_path):
    started = time.monotonic()
    submission_id = researcher.submit(zip_path)
    result = researcher.wait_until(submission_id, FINAL)
    total = time.monotonic() - started
    if result["status"] != "completed":
        raise SystemExit(f"submission {submission_id} ended {result['status']}: {result.get('error')}")
    at = {e["status"]: datetime.fromisoformat(e["recorded_at"]) for e in result["events"]}
    dry = (at["dry_run_passed"] - at["building"]).total_seconds() if "dry_run_passed" in at else 0.0
    handoff = (at["queued"] - at["dry_run_passed"]).total_seconds() if "dry_run_passed" in at else 0.0
    return total, dry, handoff


def main(count, sample="iris"):
    stack = Stack().start()
    try:
        with_dry = stack.researcher("bench-dry")
        without = stack.researcher("bench-plain", dry_run=False)
        zip_path = zip_folder(SAMPLES / sample, stack.root / f"{sample}.zip")
        started = time.monotonic()
        run_once(without, zip_path)  # builds (or finds) the image; not counted
        print(f"{sample}: warm-up (image built or found) {time.monotonic() - started:.1f} s")
        totals = {"with dry run": [], "without": []}
        print("run  kind           total_s  dry_run_s  passed->queued_s")
        for run in range(1, count + 1):
            for kind, researcher in (("with dry run", with_dry), ("without", without)):
                total, dry, handoff = run_once(researcher, zip_path)
                totals[kind].append(total)
                print(f"{run:>3}  {kind:<13} {total:8.1f}  {dry:9.1f}  {handoff:16.1f}")
        added = statistics.median(totals["with dry run"]) - statistics.median(totals["without"])
        print(f"the dry run adds {added:.1f} s to a submission (median of {count}: "
              f"{statistics.median(totals['with dry run']):.1f} s with, "
              f"{statistics.median(totals['without']):.1f} s without)")
    finally:
        stack.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2, sys.argv[2] if len(sys.argv) > 2 else "iris")
