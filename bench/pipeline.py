"""Where a submission's time goes, on the testbed.

    set -a; . /opt/testbed/gateway.env; set +a
    .venv/bin/python -m bench.pipeline [N]

Starts a private gateway stack (as the tests do), submits the iris sample N times
(default 3) one after another and prints, per submission, the upload's HTTP time
and the seconds between its events. The first run may include the environment
build; later ones reuse the image.
"""
import sys
import time
from datetime import datetime

from tests.helpers.stack import SAMPLES, Stack, zip_folder

STAGES = ["received", "building", "queued", "running", "completed"]


def main(count):
    stack = Stack().start()
    try:
        researcher = stack.researcher("bench")
        zip_path = zip_folder(SAMPLES / "iris", stack.root / "iris.zip")
        print("run  upload_s  " + "  ".join(f"{a}->{b}" for a, b in zip(STAGES, STAGES[1:])) + "  total_s")
        for run in range(1, count + 1):
            started = time.monotonic()
            submission_id = researcher.submit(zip_path)
            upload = time.monotonic() - started
            result = researcher.wait_until(submission_id, {"completed", "failed", "build_failed"})
            at = {e["status"]: datetime.fromisoformat(e["recorded_at"]) for e in result["events"]}
            steps = [(at[b] - at[a]).total_seconds() if a in at and b in at else float("nan")
                     for a, b in zip(STAGES, STAGES[1:])]
            total = time.monotonic() - started
            print(f"{run:>3}  {upload:8.3f}  " + "  ".join(f"{s:>{len(a) + len(b) + 2}.1f}"
                  for s, (a, b) in zip(steps, zip(STAGES, STAGES[1:]))) + f"  {total:7.1f}")
    finally:
        stack.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
