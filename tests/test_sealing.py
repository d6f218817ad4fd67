"""Hostile submissions through the real gateway (issue 6, "Proof, in make test"):
each attack ends blocked and leaves the host as it was.

Four jobs, submitted at once and sharing one environment image (the iris
sample's requirements):
  hostile-probe            tries many attacks and prints `BLOCKED name detail` or
                           `OPEN name detail` per attempt; the test reads the job's
                           stdout on the host and then checks the host side itself
                           (dataset, MLflow, processes, credentials)
  hostile-memory           allocates 3 GiB under the stack's 2G limit
  hostile-own-credentials  sets MLflow's URL and a wrong login itself, the way the
                           hospital's public sample does
  iris                     the platform's own sample
"""
import base64
import hashlib
import json
import os
import secrets
import subprocess
import urllib.parse
from pathlib import Path

import pytest
import requests

from m2d.contract.states import TERMINAL

from .helpers.stack import SAMPLES, wait_for, zip_folder

FINAL = {status.value for status in TERMINAL}  # a dry run that fails ends the submission too
JOB_ACCOUNT = "m2d-job"
SLEEPER = f"600.{secrets.randbelow(10**6):06d}"  # `sleep 600.NNNNNN`: names this run's sleepers only


# --------------------------------------------------------------- MLflow, as admin
def mlflow_admin(method, path, **kwargs):
    auth = (os.environ.get("M2D_MLFLOW_ADMIN_USERNAME", "admin"), os.environ["M2D_MLFLOW_ADMIN_PASSWORD"])
    return requests.request(method, f"{os.environ['M2D_MLFLOW_URL']}{path}", auth=auth, timeout=30, **kwargs)


def experiment_id(name):
    response = mlflow_admin("GET", "/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name})
    response.raise_for_status()
    return response.json()["experiment"]["experiment_id"]


def runs_in(experiment):
    response = mlflow_admin("POST", "/api/2.0/mlflow/runs/search", json={"experiment_ids": [experiment]})
    response.raise_for_status()
    return response.json().get("runs", [])


def metrics_of(run):
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


# ------------------------------------------------------------------- the host
def dataset_snapshot():
    """Every entry of the host's dataset folder: kind, mode, size, mtime, content hash."""
    root = Path(os.environ["M2D_DATASET_DIR"])
    snapshot = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        snapshot[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    st = root.stat()
    snapshot["."] = (st.st_mode, st.st_mtime_ns)
    return snapshot


def host_addresses():
    """The host's own non-loopback addresses: MLflow, Slurm and the rest are reachable on them from the host."""
    return subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True).stdout.split()


def job_output(stack, submission, stream="out"):
    """What the real job wrote, on the host."""
    logs = stack.root / "data" / "submissions" / str(submission["id"]) / "logs"
    return (logs / f"slurm-{submission['slurm_job_id']}.{stream}").read_text(errors="replace")


def all_output(stack, submission, stream="out"):
    """What every job of the submission wrote, the dry run on the synthetic twin included."""
    logs = stack.root / "data" / "submissions" / str(submission["id"]) / "logs"
    return {path.name: path.read_text(errors="replace") for path in sorted(logs.glob(f"*.{stream}"))}


def sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


def sleepers():
    """This run's `sleep 600.NNNNNN` processes of the job account, on the host."""
    found = subprocess.run(["pgrep", "-u", JOB_ACCOUNT, "-a", "-f", f"sleep {SLEEPER}"],
                           capture_output=True, text=True)
    return found.stdout.strip()


# ---------------------------------------------------------------- the four jobs
@pytest.fixture(scope="module")
def sealing(stack, tmp_path_factory):
    """All four submissions, uploaded at once; each test waits for the one it needs."""
    folder = tmp_path_factory.mktemp("sealing")
    tag = f"m2dprobe{secrets.token_hex(4)}"
    # The real job's sealing: these skip the dry run (its script differs only in
    # binds, limits, experiment and M2D_DRY_RUN: tests/test_jobscript.py).
    owner, bystander = stack.researcher("hostile", dry_run=False), stack.researcher("bystander")
    iris_user = stack.researcher("iris", dry_run=False)
    hospital_user = stack.researcher("hospital", dry_run=False)

    # another researcher's experiment and run, for the probe to reach for
    other = bystander.me()["mlflow"]
    other_experiment = experiment_id(other["experiment_name"])
    created = requests.post(f"{os.environ['M2D_MLFLOW_URL']}/api/2.0/mlflow/runs/create",
                            json={"experiment_id": other_experiment}, auth=(other["username"], other["password"]),
                            timeout=30)
    created.raise_for_status()
    other_run = created.json()["run"]["info"]["run_id"]

    mine = owner.me()["mlflow"]
    redis_password = urllib.parse.urlsplit(os.environ["M2D_REDIS_URL"]).password
    secret_values = [mine["password"], base64.b64encode(f"{mine['username']}:{mine['password']}".encode()).decode(),
                     other["password"], os.environ["M2D_MLFLOW_ADMIN_PASSWORD"], stack.env["M2D_SECRET_KEY"],
                     *([redis_password] if redis_password else [])]
    canary = Path(f"/root/{tag}-canary")
    canary.write_text("the host's /root\n")
    data = stack.root / "data"
    device = os.stat("/").st_dev
    config = {
        "tag": tag,
        "secret_sha256": [sha256(v) for v in secret_values],
        "host_addresses": host_addresses(),
        "host_root_device": [os.major(device), os.minor(device)],
        "host_file_sha256": {path: hashlib.sha256(Path(path).read_bytes()).hexdigest()
                             for path in ("/etc/shadow", "/etc/sudoers", "/etc/munge/munge.key") if Path(path).is_file()},
        "host_secret_paths": [str(canary), str(data / "gateway.db"), str(data / "secrets"),
                              str(data / "submissions"), str(stack.root / "logs")],
        "gateway_port": stack.port,
        "other_experiment_id": other_experiment,
        "other_experiment_name": other["experiment_name"],
        "other_run_id": other_run,
        "registered_model_name": f"{tag}-model",
        "sleeper_seconds": SLEEPER,
    }
    hospital = hospital_user.me()["mlflow"]
    hospital_main = (SAMPLES / "hostile-own-credentials" / "main.py").read_text()
    hospital_main = (hospital_main.replace('"OWNER"', json.dumps(hospital["username"]))
                     .replace('"http://127.0.0.1:5001"', json.dumps(hospital["tracking_uri"])))

    before = dataset_snapshot()
    ids = {
        "probe": owner.submit(zip_folder(SAMPLES / "hostile-probe", folder / "probe.zip",
                                         extra={"probe.json": json.dumps(config)})),
        "memory": owner.submit(zip_folder(SAMPLES / "hostile-memory", folder / "memory.zip")),
        "own-credentials": hospital_user.submit(zip_folder(SAMPLES / "hostile-own-credentials",
                                                           folder / "own.zip", extra={"main.py": hospital_main})),
        "iris": iris_user.submit(zip_folder(SAMPLES / "iris", folder / "iris.zip")),
    }
    users = {"probe": owner, "memory": owner, "own-credentials": hospital_user, "iris": iris_user}
    finished = {}

    def result(name):
        if name not in finished:
            finished[name] = users[name].wait_until(ids[name], FINAL, timeout=900)
        return finished[name]

    yield {"result": result, "users": users, "config": config, "before": before, "owner": mine,
           "other": other, "other_run": other_run, "secrets": secret_values, "canary": canary}
    canary.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def probe(stack, sealing):
    submission = sealing["result"]("probe")
    assert submission["status"] == "completed", (submission, job_output(stack, submission, "err")[-3000:]
                                                 if submission.get("slurm_job_id") else "")
    outputs = all_output(stack, submission)  # the real job's, and the dry run's if there was one
    verdicts = {}
    for log_name, stdout in outputs.items():
        not_ready = [line for line in stdout.splitlines() if line.startswith("NOT-READY")]
        assert not not_ready and "READY dataset-is-mounted" in stdout, (log_name, not_ready or stdout[-3000:])
        for line in stdout.splitlines():
            verdict, _, rest = line.partition(" ")
            if verdict in ("BLOCKED", "OPEN"):
                name, _, detail = rest.partition(" ")
                if verdicts.get(name, ("BLOCKED",))[0] == "BLOCKED":
                    verdicts[name] = (verdict, f"{log_name}: {detail}")
    stdout = job_output(stack, submission)
    return {"submission": submission, "stdout": stdout, "outputs": outputs, "verdicts": verdicts}


# The attacks that must have been tried (the probe tries more, e.g. every port on
# every address); each must be in the probe's output as BLOCKED.
ATTEMPTS = [
    "capabilities-effective-zero", "no-new-privs", "not-root",
    "dataset-remount-bind-rw", "dataset-remount-rw", "dataset-bind-elsewhere", "dataset-write-new-file",
    "dataset-append-existing-file", "dataset-mkdir", "dataset-chmod", "dataset-rename", "dataset-unlink",
    "dataset-write-from-own-user-namespace",
    "mknod-host-disk:/tmp", "mknod-host-disk:/mnt/export", "mount-tmpfs", "mount-proc", "open-host-block-devices",
    "read-host-secret:/opt/testbed/secrets", "read-host-secret:/opt/testbed/gateway.env",
    "read-host-secret:/opt/testbed/mlflow", "read-host-secret:/etc/shadow", "host-processes-invisible",
    "only-loopback-interface", "udp-out:1.1.1.1:53", "dns:pypi.org", "connect:1.1.1.1:53", "connect:8.8.8.8:443",
    *(f"connect:127.0.0.1:{port}" for port in (6379, 6380, 8025, 25, 3306, 3307, 6817, 6818, 6819, 5000, 5010)),
    "env-has-no-credential-names", "env-has-no-mlflow-password", "proc-has-no-credentials",
    "files-hold-no-mlflow-password",
    "raw:log-inputs", "raw:registered-model-create", "raw:model-version-create", "raw:logged-model-create",
    "raw:artifact-upload", "raw:artifact-list", "raw:oversized-param", "raw:oversized-param-in-batch",
    "raw:oversized-tag", "raw:oversized-body", "raw:other-experiment-get", "raw:other-experiment-by-name",
    "raw:other-experiment-create-run", "raw:other-run-get", "raw:other-run-log-metric", "raw:other-run-update",
    "raw:other-run-smuggled-beside-own", "raw:experiment-create", "raw:runs-search", "raw:runs-search-ajax",
    "raw:runs-search-dotdot", "raw:users-get", "raw:users-create", "raw:traces", "raw:graphql",
    "client:log-input", "client:registered-model-create", "client:artifact-upload", "client:artifact-list",
    "client:oversized-param", "client:oversized-param-in-batch", "client:other-experiment-get",
    "client:other-experiment-create-run", "client:other-run-log-metric", "client:other-run-get",
    "client:search-runs",
]


def test_a_hostile_probe_finds_every_way_out_closed(stack, sealing, probe):
    config = sealing["config"]
    expected = [*ATTEMPTS, f"connect:127.0.0.1:{stack.port}",
                *(f"read-host-secret:{path}" for path in config["host_secret_paths"]),
                *(f"connect:{address}:{port}" for address in config["host_addresses"]
                  for port in (5001, 6379, 6380, 8025, 3306, 3307, 6817, stack.port))]
    verdicts = probe["verdicts"]
    opened = [f"{name}: {detail}" for name, (verdict, detail) in verdicts.items() if verdict == "OPEN"]
    assert not opened, "the probe got through:\n" + "\n".join(opened)
    assert not [name for name in expected if name not in verdicts], probe["stdout"][-5000:]
    assert "DONE probe" in probe["stdout"]


def test_the_probe_left_the_dataset_and_the_hosts_files_as_they_were(stack, sealing, probe):
    assert dataset_snapshot() == sealing["before"]
    tag = sealing["config"]["tag"]
    assert sealing["canary"].read_text() == "the host's /root\n"
    leftovers = [str(p) for top in (Path(os.environ["M2D_DATASET_DIR"]), Path("/opt/testbed/mlflow"),
                                    stack.root) for p in top.rglob(f"*{tag}*")]
    assert not leftovers


def test_mlflow_keeps_nothing_the_relay_refused(sealing, probe):
    tag = sealing["config"]["tag"]
    model = mlflow_admin("GET", "/api/2.0/mlflow/registered-models/get", params={"name": f"{tag}-model"})
    assert model.status_code == 404, model.text
    smuggled = mlflow_admin("GET", "/api/2.0/mlflow/experiments/get-by-name",
                            params={"experiment_name": f"{tag}-smuggled"})
    assert smuggled.status_code == 404, smuggled.text
    user = mlflow_admin("GET", "/api/2.0/mlflow/users/get", params={"username": tag})
    assert user.status_code == 404, user.text
    # the other researcher's experiment: still only its own run, untouched
    other_runs = runs_in(experiment_id(sealing["other"]["experiment_name"]))
    assert [r["info"]["run_id"] for r in other_runs] == [sealing["other_run"]]
    assert other_runs[0]["info"]["status"] == "RUNNING" and not metrics_of(other_runs[0])
    # the owner's runs: no datasets, no oversized values, no artifacts
    own_runs = runs_in(experiment_id(sealing["owner"]["experiment_name"]))
    assert own_runs
    for run in own_runs:
        assert not run.get("inputs", {}).get("dataset_inputs"), run["info"]["run_id"]
        assert all(len(p["value"]) <= 6000 for p in run["data"].get("params", []))
        assert all(len(t["value"]) <= 8000 for t in run["data"].get("tags", []))
        assert not any(t["key"] == "big-tag" for t in run["data"].get("tags", []))
        artifacts = Path(run["info"]["artifact_uri"])
        assert not (artifacts.exists() and any(artifacts.iterdir())), artifacts
    # and an honest metric after all those refusals still arrived
    assert any(metrics_of(r).get("probe-survived") == 1.0 for r in own_runs)


def test_no_credential_reaches_the_job_its_logs_or_its_emails(stack, sealing, probe):
    submission = probe["submission"]
    secrets_ = sealing["secrets"]
    hashes = {sha256(v) for v in secrets_}
    seen = {line.split()[-1] for text in probe["outputs"].values() for line in text.splitlines()
            if line.startswith(("ENVHASH", "PROCHASH"))}
    assert seen, "the probe printed no hashes of its environment"
    assert not hashes & seen
    texts = {**probe["outputs"], **all_output(stack, submission, "err"),
             "API": json.dumps(sealing["users"]["probe"].submission(submission["id"])),
             "emails": "\n".join(str(m) for m in sealing["users"]["probe"].mails(submission["id"]))}
    for where, text in texts.items():
        for value in secrets_:
            assert value not in text, f"a secret is in the job's {where}"


def test_no_process_outlives_its_job(sealing, probe):
    assert "READY sleepers-running" in probe["stdout"]  # both were running when main.py went on
    wait_for(lambda: not sleepers(), 15, "the job's `sleep` processes to be gone")


def test_a_memory_hog_fails_with_an_out_of_memory_email(stack, sealing):
    submission = sealing["result"]("memory")
    # the dry run has the same limit, so the hog usually fails there, before the real job
    assert submission["status"] in ("failed", "dry_run_failed"), submission
    assert not any("still alive" in text for text in all_output(stack, submission).values())
    user = sealing["users"]["memory"]
    failed = wait_for(lambda: [m for m in user.mails(submission["id"]) if m["Subject"].endswith("failed")], 60,
                      "the failure email")
    body = failed[-1].get_content()
    assert "ran out of memory" in body, body
    assert "2G" in body or "2048 MB" in body, body


def test_the_iris_sample_still_logs_its_metrics_to_the_owners_experiment(sealing):
    submission = sealing["result"]("iris")
    assert submission["status"] == "completed", submission
    account = sealing["users"]["iris"].me()["mlflow"]
    runs = runs_in(experiment_id(account["experiment_name"]))
    assert len(runs) == 1
    assert metrics_of(runs[0]) == {"accuracy": 1.0, "dataset-exists": 1.0}


def test_a_sample_that_sets_its_own_mlflow_url_and_credentials_still_logs_to_the_owners_experiment(sealing):
    submission = sealing["result"]("own-credentials")
    assert submission["status"] == "completed", submission
    account = sealing["users"]["own-credentials"].me()["mlflow"]
    runs = runs_in(experiment_id(account["experiment_name"]))
    assert len(runs) == 1
    assert metrics_of(runs[0]) == {"accuracy": 1.0, "loss": pytest.approx(1 / 3)}
    assert {p["key"]: p["value"] for p in runs[0]["data"]["params"]} == {"style": "hospital-sample"}
    assert runs[0]["info"]["status"] == "FINISHED"
