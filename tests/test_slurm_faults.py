"""Slurm's own daemons down (issue 11's fault matrix), on a private stack.

slurmctld and slurmdbd are the testbed's and shared, so these stop them only
briefly, restart them at once (deploy/testbed/slurm.sh stop-daemon /
start-daemon), and run last in the suite (marked ``last``, see conftest): nothing else
should be submitting meanwhile. Judged by tests/helpers/invariants.py like the others.
"""
import subprocess
import time

import pytest

from .helpers import invariants
from .helpers.stack import REPO, PrivateStack, job_zip, wait_for

pytestmark = pytest.mark.last  # stops the shared daemons: after everything else (conftest)
SLURM_SH = REPO / "deploy" / "testbed" / "slurm.sh"


def slurm_daemon(action, name, testbed):
    subprocess.run(["bash", str(SLURM_SH), f"{action}-daemon", name, testbed["env"]["M2D_TESTBED_DIR"]],
                   check=True, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def private(testbed):
    stack = PrivateStack().start()
    yield stack
    stack.stop()


def test_slurmctld_down_at_submit_is_retried_with_backoff_and_submitted_once_back(private, testbed, tmp_path):
    researcher = private.researcher("slurmctld", dry_run=False)
    slurm_daemon("stop", "slurmctld", testbed)
    try:
        sid = researcher.submit(job_zip(tmp_path, 2))
        # Slurm's refusal was taken for a passing outage: rq tries again (PREPARE_RETRY_SECONDS)
        wait_for(lambda: any("scheduled for retry" in (private.logs / f"{w}.log").read_text()
                             for w in ("worker-build-1", "worker-build-2")), 120, "the prepare to be retried later")
        assert researcher.submission(sid)["status"] == "building"
    finally:
        slurm_daemon("start", "slurmctld", testbed)
    invariants.check(private, {sid: "completed"})
    assert [e["status"] for e in researcher.submission(sid)["events"]].count("queued") == 1


def test_slurmdbd_down_the_poller_waits_and_never_marks_a_job_lost(private, testbed, tmp_path):
    researcher = private.researcher("slurmdbd", dry_run=False)
    sid = researcher.submit(job_zip(tmp_path, 8))
    researcher.wait_until(sid, "running", timeout=300)
    slurm_daemon("stop", "slurmdbd", testbed)
    try:
        time.sleep(15)  # the job ends meanwhile; sacct cannot say so
        assert researcher.submission(sid)["status"] == "running"
    finally:
        slurm_daemon("start", "slurmdbd", testbed)
    invariants.check(private, {sid: "completed"})
