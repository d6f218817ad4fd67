"""A job on the testbed is sealed: deploy/testbed/probe-sealing.sh submits a
hostile job and a memory hog as the gateway would (m2d -> sudo -> m2d-job) and
checks every way out.  Needs root and the running testbed (about 10 s)."""
import os
import subprocess
from pathlib import Path

PROBE = Path(__file__).resolve().parent.parent / "deploy" / "testbed" / "probe-sealing.sh"


def test_a_hostile_job_finds_every_way_out_closed(testbed):
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "HOME")}
    env["M2D_TESTBED_DIR"] = testbed["env"]["M2D_TESTBED_DIR"]
    proc = subprocess.run(["bash", str(PROBE)], capture_output=True, text=True,
                          env=env, timeout=400)
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert proc.returncode == 0 and "ALL PASS" in proc.stdout, \
        "\n".join(failed) or proc.stdout[-3000:] + proc.stderr[-3000:]
