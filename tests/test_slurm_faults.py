"""Slurm's own daemons down (issue 11's fault matrix), on a private stack.

The stack is on the testbed's fault cluster (deploy/testbed/fault-cluster.sh),
a Slurm of its own whose slurmctld and slurmdbd these stop and start again
(fault-cluster.sh stop-daemon / start-daemon): the rest of the suite, on the testbed's
cluster, runs on meanwhile. Judged by tests/helpers/invariants.py like the others.
"""
import os
import subprocess
import time

import pytest

from .helpers import invariants, nodes
from .helpers.stack import REPO, PrivateStack, job_zip, wait_for

FAULT_CLUSTER_SH = REPO / "deploy" / "testbed" / "fault-cluster.sh"


def slurm_daemon(action, name):
    subprocess.run(["bash", str(FAULT_CLUSTER_SH), f"{action}-daemon", name, os.environ["M2D_TESTBED_DIR"]],
                   check=True, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def private(testbed):
    stack = PrivateStack(**nodes.fault_cluster()).start()
    yield stack
    stack.stop()


def test_slurmctld_down_at_submit_is_retried_with_backoff_and_submitted_once_back(private, tmp_path):
    researcher = private.researcher("slurmctld", dry_run=False)
    slurm_daemon("stop", "slurmctld")
    try:
        sid = researcher.submit(job_zip(tmp_path, 2))
        # Slurm's refusal was taken for a passing outage: rq tries again (PREPARE_RETRY_SECONDS)
        wait_for(lambda: any("scheduled for retry" in (private.logs / f"{w}.log").read_text()
                             for w in ("worker-build-1", "worker-build-2")), 120, "the prepare to be retried later")
        assert researcher.submission(sid)["status"] == "building"
    finally:
        slurm_daemon("start", "slurmctld")
    invariants.check(private, {sid: "completed"})
    assert [e["status"] for e in researcher.submission(sid)["events"]].count("queued") == 1


def test_slurmdbd_down_the_poller_waits_and_never_marks_a_job_lost(private, tmp_path):
    researcher = private.researcher("slurmdbd", dry_run=False)
    sid = researcher.submit(job_zip(tmp_path, 8))
    researcher.wait_until(sid, "running", timeout=300)
    slurm_daemon("stop", "slurmdbd")
    try:
        time.sleep(15)  # the job ends meanwhile; sacct cannot say so
        assert researcher.submission(sid)["status"] == "running"
    finally:
        slurm_daemon("start", "slurmdbd")
    invariants.check(private, {sid: "completed"})
