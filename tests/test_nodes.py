"""A cluster, not one machine: the testbed's compute nodes are slurmds in
network namespaces of their own (deploy/testbed/nodes.sh), and a node reaches
only what a site's compute node reaches of the gateway host: slurmctld and
MLflow's port.  Jobs land on each node, run sealed there, log to MLflow
through the relay by the site's address, and their export and logs come back
through the shared filesystem; a cancel reaches them there."""
import os
import urllib.parse
from pathlib import Path

import pytest
import requests

from .helpers import nodes
from .helpers.stack import SAMPLES, Stack, zip_folder


@pytest.fixture(scope="module")
def namespaces(testbed):
    return nodes.namespaces()


@pytest.fixture(scope="module")
def node_stacks(namespaces):
    """One stack per node, its jobs sent there (a partition per node:
    deploy/testbed/slurm.sh)."""
    stacks = {}
    try:
        for node in namespaces:
            stacks[node] = Stack(M2D_SLURM_PARTITION=node).start()
        yield stacks
    finally:
        for running in stacks.values():
            running.stop()


def port_of(url):
    return urllib.parse.urlsplit(url).port


def test_a_node_reaches_slurmctld_and_mlflow_and_nothing_else_of_the_gateway_host(namespaces, stack):
    gateway = nodes.gateway_address()
    dbd_conf = Path(os.environ["SLURM_CONF"]).with_name("slurmdbd.conf")
    # what listens on this host and must stay out of a node's reach
    closed = {"redis": port_of(os.environ["M2D_REDIS_URL"]),
              "postgresql": port_of(os.environ["M2D_TEST_POSTGRES_URL"]),
              "the gateway's web port": stack.port,
              "smtp": int(os.environ["M2D_SMTP_PORT"]),
              "slurmdbd": int(nodes.slurm_setting("AccountingStoragePort")),
              "slurmdbd's mariadb": int(nodes.slurm_setting("StoragePort", dbd_conf))}
    for name, port in closed.items():
        assert nodes.reach_here("127.0.0.1", port) == "open", f"{name} is not listening here: the test proves nothing"
    for node, namespace in namespaces.items():
        for name, port in closed.items():
            for address in [*nodes.host_addresses(), "127.0.0.1"]:
                answer = nodes.reach(namespace, address, port)
                assert answer.startswith("closed"), f"{node} reached {name} at {address}:{port}"
        # MLflow by the site's address; the node's own loopback has no MLflow
        mlflow_port = port_of(os.environ["M2D_MLFLOW_JOB_URL"])
        assert nodes.reach(namespace, gateway, mlflow_port, http=True) == "200"
        assert nodes.reach(namespace, "127.0.0.1", mlflow_port).startswith("closed")
        # slurmctld: Slurm's own tools on the node (hostname = node name) see it
        ping = nodes.in_node(namespace, ["scontrol", "ping"])
        assert ping.returncode == 0 and "is UP" in ping.stdout, ping


def test_jobs_run_on_each_node_sealed_with_mlflow_by_address_and_export_back(node_stacks, tmp_path):
    zip_path = zip_folder(SAMPLES / "iris", tmp_path / "iris.zip")
    people = {node: running.researcher(f"iris-{node}") for node, running in node_stacks.items()}
    ids = {node: someone.submit(zip_path) for node, someone in people.items()}  # at once: both nodes busy
    job_url = os.environ["M2D_MLFLOW_JOB_URL"]
    for node, someone in people.items():
        done = someone.wait_until(ids[node], {"completed", "failed", "build_failed", "dry_run_failed"})
        assert done["status"] == "completed", done
        assert nodes.node_of(done["slurm_job_id"]) == node
        folder = node_stacks[node].root / "data" / "submissions" / str(done["id"])
        # it ran there, in the container (the batch script's first line says where)
        err = "".join(p.read_text() for p in (folder / "logs").glob("*.err"))
        assert f"job {done['slurm_job_id']} on {node}," in err, err
        # the relay on the node reached MLflow by this host's address on the bridge
        assert f"--upstream {job_url}" in (folder / "job" / "job.sbatch").read_text()
        account = someone.me()["mlflow"]
        experiment = requests.get(f"{os.environ['M2D_MLFLOW_URL']}/api/2.0/mlflow/experiments/get-by-name",
                                  params={"experiment_name": account["experiment_name"]}, timeout=30,
                                  auth=(account["username"], account["password"]))
        runs = requests.post(f"{os.environ['M2D_MLFLOW_URL']}/api/2.0/mlflow/runs/search", timeout=30,
                             json={"experiment_ids": [experiment.json()["experiment"]["experiment_id"]]},
                             auth=(account["username"], account["password"])).json()["runs"]
        assert [{m["key"]: m["value"] for m in run["data"]["metrics"]} for run in runs] == [
            {"accuracy": 1.0, "dataset-exists": 1.0}]
        # the export came back through the shared filesystem, to this submission alone
        assert (folder / "export" / "result.txt").read_text() == "accuracy=1.0\n"


def test_cancelling_a_job_on_a_node_stops_it_there(node_stacks, tmp_path):
    node, running = list(node_stacks.items())[-1]
    someone = running.researcher("sleeps")
    submission_id = someone.submit(zip_folder(SAMPLES / "sleeps", tmp_path / "sleeps.zip"))
    started = someone.wait_until(submission_id, "running", timeout=300)
    assert nodes.node_of(started["slurm_job_id"]) == node
    response = someone.api("POST", f"/submissions/{submission_id}/cancel")
    assert response.status_code == 202, response.text
    result = someone.wait_until(submission_id, {"cancelled", "completed", "failed"}, timeout=120)
    assert result["status"] == "cancelled"
    assert [m["Subject"].split(": ", 1)[1] for m in someone.wait_for_mails(submission_id, 4)][-1] == "cancelled"


def test_memory_and_cores_are_limited_per_node_by_that_nodes_cgroups(namespaces, tmp_path):
    """A job over its --mem on either node ends OUT_OF_MEMORY, confined in that
    node's own cgroups (slurm_NODE) to the cores it asked for."""
    jobs = {}
    for node in namespaces:
        out = tmp_path / f"{node}.out"
        script = ("grep -E ':(memory|cpuset):' /proc/self/cgroup; nproc; "
                  "python3 -c 'x = bytearray(400 * 2**20); print(len(x))'")
        submitted = nodes.sbatch(["--partition", node, "--mem=64M", "--cpus-per-task=1", f"--output={out}",
                                  "--wrap", script])
        jobs[node] = (submitted, out)
    for node, (job_id, out) in jobs.items():
        state = nodes.wait_job(job_id)
        assert state == "OUT_OF_MEMORY", (node, state, out.read_text())
        text = out.read_text()
        assert f":memory:/slurm_{node}/uid_0/job_{job_id}/" in text and f":cpuset:/slurm_{node}/" in text, text
        assert [line for line in text.splitlines() if line.isdigit()][:1] == ["1"], text  # nproc: one core
        assert nodes.node_of(job_id) == node
