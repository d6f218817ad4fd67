"""The testbed's compute nodes (deploy/testbed/nodes.sh): each a slurmd in a
network namespace of its own on a private bridge.  What a node can reach,
asked from inside its namespace, and what sacct says about where a job ran."""
import os
import re
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
import socket, sys, urllib.request
host, port, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    if kind == "http":
        print(urllib.request.urlopen(f"http://{host}:{port}/health", timeout=5).status)
    else:
        socket.create_connection((host, port), timeout=3).close()
        print("open")
except OSError as e:
    print(f"closed {e}")
"""


def namespaces():
    """{node: network namespace} of the multi-node testbed (gateway.env), or an
    error that says how to get it."""
    spec = os.environ.get("M2D_TESTBED_NODE_NAMESPACES")
    if not spec:
        raise RuntimeError("the testbed has no compute nodes of their own (M2D_TESTBED_NODE_NAMESPACES is not "
                           "set): start it with M2D_TESTBED_NODES=2 (the default) and source its gateway.env")
    return dict(pair.split("=", 1) for pair in spec.split(","))


def fault_node():
    """(node, network namespace) of the testbed's node outside the default
    partition, which a test may cut the power of while other tests' jobs run."""
    spec = os.environ.get("M2D_TESTBED_FAULT_NODE")
    if not spec:
        raise RuntimeError("the testbed has no fault node (M2D_TESTBED_FAULT_NODE is not set): remake it with "
                           "deploy/testbed/up.sh (M2D_TESTBED_NODES=2, the default) and source its gateway.env")
    node, namespace = spec.split("=", 1)
    return node, namespace


def fault_cluster():
    """The settings of a stack on the testbed's fault cluster
    (deploy/testbed/fault-cluster.sh): its SLURM_CONF and Slurm wrapper."""
    folder = os.environ.get("M2D_TESTBED_FAULT_CLUSTER")
    if not folder:
        raise RuntimeError("the testbed has no fault cluster (M2D_TESTBED_FAULT_CLUSTER is not set): start it with "
                           "M2D_TESTBED_FAULTS=1 deploy/testbed/up.sh (make test does) on a multi-node testbed (the default) "
                           "and source its gateway.env")
    saved = dict(line.split("=", 1) for line in (Path(folder) / "testbed.env").read_text().splitlines()
                 if "=" in line and not line.startswith("#"))
    return {"SLURM_CONF": f"{folder}/slurm/etc/slurm.conf", "M2D_SLURM_WRAPPER": saved["M2D_SLURM_WRAPPER"]}


def in_node(namespace, argv, **kwargs):
    """``argv`` run in the node's network namespace (as root, this host's files)."""
    return subprocess.run(["nsenter", f"--net=/run/netns/{namespace}", *argv], capture_output=True, text=True,
                          timeout=60, **kwargs)


def reach(namespace, host, port, http=False):
    """From the node: "open" (a TCP connection), "200" (MLflow's /health with
    ``http``), or "closed <why>"."""
    return in_node(namespace, [sys.executable, "-c", _PROBE, host, str(port), "http" if http else "tcp"]
                   ).stdout.strip()


def reach_here(host, port):
    """The same from this host (the gateway's side)."""
    return subprocess.run([sys.executable, "-c", _PROBE, host, str(port), "tcp"], capture_output=True, text=True,
                          timeout=60).stdout.strip()


def gateway_address():
    """This host's address on the nodes' bridge: the one in the jobs' MLflow URL."""
    return urllib.parse.urlsplit(os.environ["M2D_MLFLOW_JOB_URL"]).hostname


def slurm_setting(name, conf=None):
    """A value of slurm.conf (or slurmdbd.conf beside it)."""
    path = Path(conf or os.environ["SLURM_CONF"])
    found = re.search(rf"^{name}=(\S+)", path.read_text(), re.MULTILINE)
    return found.group(1) if found else None


def host_addresses():
    """This host's IPv4 addresses, the bridge's included."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    return sorted({m.group(1) for m in re.finditer(r"inet (\d+\.\d+\.\d+\.\d+)/", out)})


def node_of(job_id):
    """sacct's NodeList of a job."""
    return subprocess.run(["sacct", "-X", "-n", "-P", "-o", "NodeList", "-j", str(job_id)], capture_output=True,
                          text=True, timeout=30, check=True).stdout.strip()


def power(action, node):
    """deploy/testbed/slurm.sh power-off|power-on NODE: a node's power cut and return."""
    subprocess.run([str(REPO / "deploy" / "testbed" / "slurm.sh"), f"power-{action}", node,
                    os.environ["M2D_TESTBED_DIR"]], check=True, timeout=180)


def sbatch(args):
    """A plain job, submitted as root (the testbed's testacct): its id."""
    # --chdir: the job's folder is otherwise the submitter's, and an xdist worker's may be a
    # test's tmp folder already gone (slurmstepd then writes an error into the output)
    done = subprocess.run(["sbatch", "--parsable", "--chdir=/tmp", *args], capture_output=True, text=True,
                          timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def wait_job(job_id, timeout=120):
    """The job's final state in sacct."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", str(job_id)], capture_output=True,
                               text=True, timeout=30).stdout.strip().split(" ")[0]
        if state and state not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING"):
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not end within {timeout} s")
