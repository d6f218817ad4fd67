"""A compute node that loses its power mid-job (deploy/testbed/slurm.sh
power-off: its slurmd, everything in its namespace and its jobs' cgroups
killed at once): slurmctld finds the node silent after SlurmdTimeout, the job
ends NODE_FAIL and is not started again (JobRequeue=0), and the researcher
gets the failure e-mail saying it was the node, not the code.  The node is the
testbed's fault node, in no partition but its own, so the other tests' jobs
keep their nodes meanwhile and this runs beside them."""
import pytest

from .helpers import nodes
from .helpers.stack import SAMPLES, Stack, zip_folder


@pytest.fixture(scope="module")
def fault_node(testbed):
    return nodes.fault_node()


@pytest.fixture(scope="module")
def node_stack(fault_node):
    running = Stack(M2D_SLURM_PARTITION=fault_node[0]).start()
    yield running
    running.stop()


def test_a_node_stopped_mid_job_ends_it_node_fail_with_its_email(node_stack, fault_node, tmp_path):
    node, namespace = fault_node
    someone = node_stack.researcher("unlucky")
    submission_id = someone.submit(zip_folder(SAMPLES / "sleeps", tmp_path / "sleeps.zip"))
    started = someone.wait_until(submission_id, "running", timeout=300)
    assert nodes.node_of(started["slurm_job_id"]) == node
    nodes.power("off", node)
    try:
        ended = someone.wait_until(submission_id, {"failed", "completed", "cancelled"}, timeout=240)
    finally:
        nodes.power("on", node)
    assert ended["status"] == "failed" and ended["reason"].startswith("NODE_FAIL"), ended
    mails = someone.wait_for_mails(submission_id, 4)
    assert mails[-1]["Subject"].endswith("execution failed")
    body = mails[-1].get_content()
    assert "NODE_FAIL: the compute node running the job failed" in body, body
    # the node is back in service for whatever runs next
    assert nodes.in_node(namespace, ["scontrol", "ping"]).returncode == 0
