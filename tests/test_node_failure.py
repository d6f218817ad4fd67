"""A compute node that loses its power mid-job (deploy/testbed/slurm.sh
power-off: its slurmd, everything in its namespace and its jobs' cgroups
killed at once): slurmctld finds the node silent after SlurmdTimeout, the job
ends NODE_FAIL and is not started again (JobRequeue=0), and the researcher
gets the failure e-mail saying it was the node, not the code.  It takes a node
away from everyone for a minute, so it runs last."""
import pytest

from .helpers import nodes
from .helpers.stack import SAMPLES, Stack, zip_folder

pytestmark = pytest.mark.last


@pytest.fixture(scope="module")
def last_node(testbed):
    return list(nodes.namespaces())[-1]


@pytest.fixture(scope="module")
def node_stack(last_node):
    running = Stack(M2D_SLURM_PARTITION=last_node).start()
    yield running
    running.stop()


def test_a_node_stopped_mid_job_ends_it_node_fail_with_its_email(node_stack, last_node, tmp_path):
    someone = node_stack.researcher("unlucky")
    submission_id = someone.submit(zip_folder(SAMPLES / "sleeps", tmp_path / "sleeps.zip"))
    started = someone.wait_until(submission_id, "running", timeout=300)
    assert nodes.node_of(started["slurm_job_id"]) == last_node
    nodes.power("off", last_node)
    try:
        ended = someone.wait_until(submission_id, {"failed", "completed", "cancelled"}, timeout=240)
    finally:
        nodes.power("on", last_node)
    assert ended["status"] == "failed" and ended["reason"].startswith("NODE_FAIL"), ended
    mails = someone.wait_for_mails(submission_id, 4)
    assert mails[-1]["Subject"].endswith("execution failed")
    body = mails[-1].get_content()
    assert "NODE_FAIL: the compute node running the job failed" in body, body
    # the node is back in service for whatever runs next
    assert nodes.in_node(nodes.namespaces()[last_node], ["scontrol", "ping"]).returncode == 0
