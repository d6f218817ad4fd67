"""`flask status` on the real stack: submissions per state, each active job
beside what squeue/sacct say (a disagreement marked with its reason), the
workers alive and the queues."""
import os
import signal
import subprocess

import pytest

from .helpers.stack import SAMPLES, Stack, wait_for, zip_folder


@pytest.fixture(scope="module")
def own_stack(testbed):
    """A stack of this module's own: the test stops its poller."""
    running = Stack().start()
    yield running
    running.stop()


def row_of(output, job_id):
    return next(line for line in output.splitlines() if f"  {job_id}  " in line)


def slurm(*argv):
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout


def test_status_shows_each_job_beside_slurms_view_and_flags_where_they_disagree(own_stack, tmp_path):
    stack = own_stack
    researcher = stack.researcher("status", dry_run=False)
    submission_id = researcher.submit(zip_folder(SAMPLES / "sleeps", tmp_path / "sleeps.zip"))
    job_id = researcher.wait_until(submission_id, "running")["slurm_job_id"]

    agreeing = stack.flask("status")
    row = row_of(agreeing, job_id)
    assert row.startswith(" ") and str(submission_id) in row and "running" in row and "RUNNING" in row
    assert "running 1" in agreeing.splitlines()[0]
    assert "Workers alive: 4" in agreeing  # two build workers, one for mail, one for polls
    assert "build " in agreeing and "waiting" in agreeing

    # Slurm moves on without the gateway: no poller, no poll worker
    for name in ("poller", "worker-poll"):
        os.killpg(stack.procs[name].pid, signal.SIGTERM)
        stack.procs[name].wait(timeout=60)
    slurm("scancel", job_id)
    # and a job under the gateway's prefix that no submission made
    stray = slurm("sbatch", "--parsable", f"--job-name={stack.env['M2D_SLURM_JOB_PREFIX']}-999999",
                  "--partition=debug", "--mem=64M", "--time=00:05:00", "--output=/dev/null",
                  "--wrap=sleep 120").strip().split(";")[0]
    try:
        flagged = wait_for(lambda: "ended (CANCELLED)" in (out := stack.flask("status")) and stray in out and out,
                           60, "status to see the cancelled job and the stray one")
        row = row_of(flagged, job_id)
        assert row.startswith("!") and "running" in row
        assert "Slurm says it ended (CANCELLED); the poller has not recorded it" in row
        stray_row = row_of(flagged, stray)
        assert stray_row.startswith("!") and "the gateway has it as no submission of its own" in stray_row
        assert "2 not agreeing" in flagged
        assert "Workers alive: 3" in flagged
    finally:
        slurm("scancel", stray)
