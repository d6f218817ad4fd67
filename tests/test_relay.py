"""The MLflow relay (singularity/relay.py) between the real mlflow client and the testbed's
real MLflow server (basic auth, NO_PERMISSIONS by default). Each test starts its own
relay and shim as subprocesses, as the batch script and the container do:

    set -a; . /opt/testbed/gateway.env; set +a; .venv/bin/python -m pytest tests/test_relay.py
"""

import concurrent.futures
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import mlflow
import pytest
import requests
import sqlalchemy
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from gateway.adapters.mlflow import MlflowAdmin
from m2d import container, tracking

from .helpers.relay import API, RELAY, RELAY_PYTHON, RelayProcesses, free_port, identifier_index, wait_for_file
from .helpers.relay import relay as relay_module


class Accounts:
    """Researcher accounts made for this session, removed at its end."""

    def __init__(self, url, admin_auth):
        self.url, self.admin_auth = url, admin_auth
        self.admin = MlflowAdmin(url, admin_auth.username, admin_auth.password)
        self.session_tag = uuid.uuid4().hex[:8]
        self.made = []

    def new(self, name, dry_run=False):
        account = self.admin.provision(f"m2d-relay-{self.session_tag}-{name}", dry_run=dry_run)
        self.made.append(account)
        return account

    def remove_all(self):
        for account in self.made:
            if account.dry_run_experiment_id:
                requests.post(f"{self.url}{API}/experiments/delete", auth=self.admin_auth, timeout=10,
                              json={"experiment_id": account.dry_run_experiment_id})
            requests.delete(f"{self.url}{API}/users/delete", json={"username": account.username},
                            auth=self.admin_auth, timeout=10)
            requests.post(f"{self.url}{API}/experiments/delete", json={"experiment_id": account.experiment_id},
                          auth=self.admin_auth, timeout=10)


@pytest.fixture(scope="session")
def accounts(mlflow_url, admin_auth):
    made = Accounts(mlflow_url, admin_auth)
    yield made
    made.remove_all()


@pytest.fixture(scope="session")
def owner(accounts):
    return accounts.new("owner")


@pytest.fixture(scope="session")
def dry_owner(accounts):
    """An owner with a dry-run experiment ("<name>-dryrun") beside the real one."""
    return accounts.new("dry", dry_run=True)


@pytest.fixture(scope="session")
def stranger(accounts):
    return accounts.new("stranger")



@pytest.fixture
def start_relay(tmp_path, mlflow_url):
    started = []

    def start(account, *extra_args, upstream=None, dry_run=False):
        relay = RelayProcesses(tmp_path / f"relay{len(started)}", account, upstream or mlflow_url, *extra_args,
                               dry_run=dry_run)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


@pytest.fixture
def relay(start_relay, owner):
    return start_relay(owner)


@pytest.fixture
def job_env(monkeypatch, relay, owner):
    """The mlflow client's settings inside a job: the shim's URL, the own experiment,
    no credentials (the relay adds them)."""
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", relay.url)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", owner.experiment_name)
    mlflow.set_tracking_uri(relay.url)
    yield relay
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def admin_get(mlflow_url, admin_auth, path, **params):
    response = requests.get(f"{mlflow_url}{API}{path}", params=params, auth=admin_auth, timeout=10)
    response.raise_for_status()
    return response.json()


def upstream_run(mlflow_url, admin_auth, run_id):
    """The run as MLflow has it, read with the admin's credentials."""
    run = admin_get(mlflow_url, admin_auth, "/runs/get", run_id=run_id)["run"]
    data = run.get("data", {})
    return {"info": run["info"], "inputs": run.get("inputs", {}),
            "metrics": {m["key"]: m["value"] for m in data.get("metrics", [])},
            "params": {p["key"]: p["value"] for p in data.get("params", [])},
            "tags": {t["key"]: t["value"] for t in data.get("tags", [])}}


def metric_history(mlflow_url, admin_auth, run_id, key):
    history = admin_get(mlflow_url, admin_auth, "/metrics/get-history", run_id=run_id, metric_key=key)
    return sorted((m["step"], m["value"]) for m in history.get("metrics", []))


def within(seconds, call, *args, **kwargs):
    """Run `call` with a bound on its time: a refusal the client retries would hang."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(call, *args, **kwargs).result(timeout=seconds)


def raises_within(seconds, call, *args, **kwargs) -> MlflowException:
    def attempt():
        try:
            call(*args, **kwargs)
        except MlflowException as e:
            return e
        return None

    error = within(seconds, attempt)
    assert error is not None, f"{call.__name__} was not refused"
    return error


def test_metrics_params_and_tags_logged_by_a_job_reach_mlflow(job_env, mlflow_url, admin_auth, owner):
    with mlflow.start_run() as run:
        mlflow.log_param("learning_rate", "0.01")
        mlflow.set_tag("model", "resnet")
        for step in range(5):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        mlflow.log_metrics({"accuracy": 0.9, "auc": 0.8}, step=4)
        mlflow.log_params({"epochs": "5", "batch_size": "32"})
        run_id = run.info.run_id
        # A read of the run sends the buffer first, so the job sees what it logged.
        assert MlflowClient().get_run(run_id).data.metrics["loss"] == pytest.approx(0.2)

    upstream = upstream_run(mlflow_url, admin_auth, run_id)
    assert upstream["info"]["experiment_id"] == owner.experiment_id
    assert upstream["info"]["status"] == "FINISHED"
    assert upstream["params"] == {"learning_rate": "0.01", "epochs": "5", "batch_size": "32"}
    assert upstream["tags"]["model"] == "resnet"
    assert upstream["metrics"]["accuracy"] == 0.9 and upstream["metrics"]["auc"] == 0.8
    assert metric_history(mlflow_url, admin_auth, run_id, "loss") == [(s, 1.0 / (s + 1)) for s in range(5)]


def test_credentials_the_client_sends_are_dropped_and_the_owners_are_used(job_env, monkeypatch, mlflow_url,
                                                                         admin_auth, owner, stranger):
    # Wrong ones, and a stranger's real ones: neither may change whose run it is.
    for username, password in (("admin", "not-the-password"), (stranger.username, stranger.password)):
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", username)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        with mlflow.start_run() as run:
            mlflow.log_metric("loss", 0.5)
        upstream = upstream_run(mlflow_url, admin_auth, run.info.run_id)
        assert upstream["info"]["experiment_id"] == owner.experiment_id
        assert upstream["metrics"] == {"loss": 0.5}


def test_log_inputs_is_refused_and_nothing_reaches_mlflow(job_env, mlflow_url, admin_auth):
    with mlflow.start_run() as run:
        dataset = Dataset(name="clam", digest="abc123", source_type="local", source='{"uri": "/mnt/dataset"}')
        error = raises_within(20, MlflowClient().log_inputs, run.info.run_id, [DatasetInput(dataset=dataset)])
    assert error.error_code == "PERMISSION_DENIED"
    assert "export" in error.message  # the refusal says what is allowed and why
    assert not upstream_run(mlflow_url, admin_auth, run.info.run_id)["inputs"].get("dataset_inputs")
    assert "refused POST /api/2.0/mlflow/runs/log-inputs" in job_env.log()


def test_artifact_calls_are_refused(job_env):
    with mlflow.start_run() as run:
        pass
    for method, path in (("GET", f"{API}/artifacts/list?run_id={run.info.run_id}"),
                         ("GET", "/api/2.0/mlflow-artifacts/artifacts"),
                         ("PUT", "/api/2.0/mlflow-artifacts/artifacts/x/model.pt")):
        response = requests.request(method, job_env.url + path, data=b"weights" if method == "PUT" else None,
                                    timeout=10)
        assert response.status_code == 403, path
        assert response.json()["error_code"] == "PERMISSION_DENIED"


def test_creating_a_registered_model_is_refused_and_nothing_reaches_mlflow(job_env, mlflow_url, admin_auth):
    name = f"m2d-relay-model-{uuid.uuid4().hex[:8]}"
    error = raises_within(20, MlflowClient().create_registered_model, name)
    assert error.error_code == "PERMISSION_DENIED"
    found = requests.get(f"{mlflow_url}{API}/registered-models/get", params={"name": name}, auth=admin_auth,
                         timeout=10)
    assert found.status_code == 404


def test_searches_are_refused(job_env, owner):
    error = raises_within(20, MlflowClient().search_runs, [owner.experiment_id])
    assert error.error_code == "PERMISSION_DENIED"
    error = raises_within(20, MlflowClient().search_experiments)
    assert error.error_code == "PERMISSION_DENIED"


def test_user_apis_are_refused_and_nothing_reaches_mlflow(job_env, mlflow_url, admin_auth, owner):
    made_up = f"m2d-relay-intruder-{uuid.uuid4().hex[:8]}"
    calls = [("POST", f"{API}/users/create", {"username": made_up, "password": "x" * 16}),
             ("GET", f"{API}/users/get?username={owner.username}", None),
             ("PATCH", f"{API}/users/update-password", {"username": owner.username, "password": "y" * 16}),
             ("POST", "/api/3.0/mlflow/users/permissions/grant",
              {"username": owner.username, "resource_type": "experiment", "resource_id": "0",
               "permission": "MANAGE"})]
    for method, path, body in calls:
        response = requests.request(method, job_env.url + path, json=body, timeout=10)
        assert response.status_code == 403, path
    assert requests.get(f"{mlflow_url}{API}/users/get", params={"username": made_up}, auth=admin_auth,
                        timeout=10).status_code == 404
    # The owner's password still works: it was not changed.
    assert requests.get(f"{mlflow_url}{API}/experiments/get", params={"experiment_id": owner.experiment_id},
                        auth=(owner.username, owner.password), timeout=10).ok


def test_another_users_experiment_is_refused_and_nothing_reaches_mlflow(job_env, mlflow_url, admin_auth, stranger):
    client = MlflowClient()
    for call, args in ((client.get_experiment, (stranger.experiment_id,)),
                       (client.get_experiment_by_name, (stranger.experiment_name,)),
                       (client.create_run, (stranger.experiment_id,)),
                       (client.create_experiment, ("m2d-relay-new-experiment",))):
        assert raises_within(20, call, *args).error_code == "PERMISSION_DENIED", call.__name__
    runs = requests.post(f"{mlflow_url}{API}/runs/search", json={"experiment_ids": [stranger.experiment_id]},
                         auth=admin_auth, timeout=10).json()
    assert not runs.get("runs")


def test_a_run_this_relay_did_not_create_is_refused_and_nothing_changes(job_env, mlflow_url, admin_auth, owner):
    # A run in the owner's own experiment, made directly: the job may still not touch it.
    created = requests.post(f"{mlflow_url}{API}/runs/create", auth=(owner.username, owner.password), timeout=10,
                            json={"experiment_id": owner.experiment_id, "start_time": int(time.time() * 1000)})
    created.raise_for_status()
    other_run = created.json()["run"]["info"]["run_id"]
    client = MlflowClient()
    for call, args in ((client.log_metric, (other_run, "loss", 0.1)),
                       (client.log_param, (other_run, "lr", "1")),
                       (client.set_tag, (other_run, "note", "x")),
                       (client.log_batch, (other_run, [Metric("loss", 0.2, int(time.time() * 1000), 0)])),
                       (client.set_terminated, (other_run, "FAILED")),
                       (client.get_run, (other_run,)),
                       (client.delete_tag, (other_run, "mlflow.runName"))):
        assert raises_within(20, call, *args).error_code == "PERMISSION_DENIED", call.__name__
    # Both ids must be the relay's: its own run_id does not open someone else's run_uuid.
    with mlflow.start_run() as run:
        mixed = requests.post(f"{job_env.url}{API}/runs/update", timeout=10,
                              json={"run_id": run.info.run_id, "run_uuid": other_run, "status": "KILLED"})
        assert mixed.status_code == 403
    time.sleep(1.5)  # a buffered value would have been sent by now
    upstream = upstream_run(mlflow_url, admin_auth, other_run)
    assert upstream["info"]["status"] == "RUNNING"
    assert upstream["metrics"] == {} and upstream["params"] == {}
    assert "note" not in upstream["tags"] and "mlflow.runName" in upstream["tags"]


def test_an_oversized_param_is_refused_at_once_without_client_retries(job_env, mlflow_url, admin_auth):
    with mlflow.start_run() as run:
        started = time.monotonic()
        # (the fluent API's active run is per thread; raises_within calls from another)
        error = raises_within(20, MlflowClient().log_param, run.info.run_id, "notes", "x" * 6001)
        assert time.monotonic() - started < 10  # the client's retries back off 2, 4, 8... s
        assert error.get_http_status_code() in (400, 413)
        assert "6000" in error.message
        mlflow.log_param("notes", "x" * 6000)  # the limit itself is fine
    assert upstream_run(mlflow_url, admin_auth, run.info.run_id)["params"] == {"notes": "x" * 6000}


def test_an_oversized_body_is_read_and_answered_413(job_env):
    with mlflow.start_run() as run:
        body = {"run_id": run.info.run_id, "tags": [{"key": "blob", "value": "x" * 2_000_000}]}
        response = requests.post(f"{job_env.url}{API}/runs/log-batch", json=body, timeout=10)
    assert response.status_code == 413
    assert response.json()["error_code"] == "RESOURCE_LIMIT_EXCEEDED"


def test_changing_a_param_is_refused_as_mlflow_would(job_env, mlflow_url, admin_auth):
    with mlflow.start_run() as run:
        mlflow.log_param("lr", "0.1")
        mlflow.log_param("lr", "0.1")  # the same value again is fine
        error = raises_within(20, MlflowClient().log_param, run.info.run_id, "lr", "0.2")
    assert error.error_code == "INVALID_PARAMETER_VALUE"
    assert upstream_run(mlflow_url, admin_auth, run.info.run_id)["params"] == {"lr": "0.1"}


def test_caps_on_runs_and_on_params_and_tags_per_run(start_relay, owner, mlflow_url, admin_auth):
    relay = start_relay(owner, "--max-params-per-run", "3", "--max-tags-per-run", "12", "--max-runs", "1")
    client = MlflowClient(relay.url)
    run_id = client.create_run(owner.experiment_id).info.run_id
    assert raises_within(20, client.create_run, owner.experiment_id).error_code == "RESOURCE_LIMIT_EXCEEDED"
    client.log_batch(run_id, params=[Param(f"p{i}", "v") for i in range(3)])
    error = raises_within(20, client.log_param, run_id, "p3", "v")
    assert error.error_code == "RESOURCE_LIMIT_EXCEEDED"
    tags_so_far = len(client.get_run(run_id).data.tags)
    for i in range(12 - tags_so_far):
        client.set_tag(run_id, f"t{i}", "v")
    assert raises_within(20, client.set_tag, run_id, "one-too-many", "v").error_code == "RESOURCE_LIMIT_EXCEEDED"
    client.set_tag(run_id, "t0", "changed")  # an existing tag can still change
    client.set_terminated(run_id)
    upstream = upstream_run(mlflow_url, admin_auth, run_id)
    assert sorted(upstream["params"]) == ["p0", "p1", "p2"]
    assert upstream["tags"]["t0"] == "changed" and "one-too-many" not in upstream["tags"]


def test_the_request_rate_limit_refuses_with_400_not_429(start_relay, owner):
    relay = start_relay(owner, "--rate", "0.01", "--burst", "3")
    answers = [requests.get(f"{relay.url}{API}/experiments/get-by-name", timeout=10,
                            params={"experiment_name": owner.experiment_name}).status_code for _ in range(6)]
    assert answers[:3] == [200, 200, 200]
    assert set(answers[3:]) == {400}


def test_an_unreachable_mlflow_is_a_quick_clear_400(start_relay, owner, monkeypatch):
    relay = start_relay(owner, upstream=f"http://127.0.0.1:{free_port()}")
    error = raises_within(20, MlflowClient(relay.url).get_experiment_by_name, owner.experiment_name)
    assert "MLflow is not reachable from the relay" in error.message
    # The client maps the error code to 503 itself; on the wire it is a 400 it does not retry.
    answer = requests.get(f"{relay.url}{API}/experiments/get-by-name", timeout=10,
                          params={"experiment_name": owner.experiment_name})
    assert answer.status_code == 400


def test_no_credential_appears_in_the_processes_environment_or_command_line(relay, owner, admin_auth):
    for process in (relay.shim, relay.relay):
        for name in ("environ", "cmdline"):
            exposed = Path(f"/proc/{process.pid}/{name}").read_bytes()
            assert owner.password.encode() not in exposed
            assert admin_auth.password.encode() not in exposed
    assert owner.password not in relay.log()


def test_buffered_metrics_are_all_in_mlflow_after_the_relay_gets_sigterm(start_relay, owner, mlflow_url,
                                                                          admin_auth):
    # A flush interval longer than the test: only the shutdown can send them.
    relay = start_relay(owner, "--flush-interval", "600")
    client = MlflowClient(relay.url)
    run_id = client.create_run(owner.experiment_id).info.run_id
    for step in range(1500):  # more than one log-batch holds
        client.log_metric(run_id, "loss", step / 1000, step=step)
    client.log_param(run_id, "optimizer", "adam")
    assert upstream_run(mlflow_url, admin_auth, run_id)["metrics"] == {}  # still buffered
    relay.relay.send_signal(signal.SIGTERM)
    assert relay.relay.wait(timeout=30) == 0
    assert metric_history(mlflow_url, admin_auth, run_id, "loss") == [(s, s / 1000) for s in range(1500)]
    assert upstream_run(mlflow_url, admin_auth, run_id)["params"] == {"optimizer": "adam"}
    assert not (relay.job_dir / "mlflow.sock").exists()


def test_a_job_whose_relay_stopped_gets_a_clear_400_from_the_shim(start_relay, owner):
    relay = start_relay(owner)
    relay.relay.send_signal(signal.SIGTERM)
    assert relay.relay.wait(timeout=30) == 0
    error = raises_within(20, MlflowClient(relay.url).get_experiment_by_name, owner.experiment_name)
    assert "MLflow relay is not running" in error.message


def test_runs_carry_the_platform_tags_which_the_job_cannot_set_or_delete(start_relay, owner, mlflow_url, admin_auth,
                                                                         monkeypatch):
    relay = start_relay(owner, "--run-tag", "m2d.submission_id=42", "--run-tag", "m2d.slurm_job_id=4242")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", owner.experiment_name)
    mlflow.set_tracking_uri(relay.url)
    try:
        refused = raises_within(10, mlflow.start_run, tags={"m2d.slurm_job_id": "1"})
        assert "m2d.* are the platform's" in str(refused)
        with mlflow.start_run() as run:
            for forge in (lambda: mlflow.set_tag("m2d.slurm_job_id", "1"),
                          lambda: MlflowClient().delete_tag(run.info.run_id, "m2d.slurm_job_id"),
                          lambda: MlflowClient().log_batch(run.info.run_id, tags=[RunTag("m2d.submission_id", "7")])):
                assert "m2d.* are the platform's" in str(raises_within(10, forge))
            mlflow.set_tag("m2d-like", "mine")  # only the "m2d." prefix is the platform's
        tags = upstream_run(mlflow_url, admin_auth, run.info.run_id)["tags"]
        assert tags["m2d.submission_id"] == "42" and tags["m2d.slurm_job_id"] == "4242" and tags["m2d-like"] == "mine"
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)


def test_the_relay_writes_how_many_calls_it_refused_as_it_stops(start_relay, owner, tmp_path):
    """The poller adds this count to m2d_relay_refusals_total when the job ends."""
    stats = tmp_path / "slurm-1.relay.json"
    relay = start_relay(owner, "--stats-file", str(stats))
    for path in (f"{API}/artifacts/list", "/api/2.0/mlflow-artifacts/artifacts", f"{API}/registered-models/create"):
        assert requests.post(relay.url + path, json={}, timeout=10).status_code in (400, 403), path
    relay.stop()
    assert json.loads(stats.read_text()) == {"refused": 3, "undelivered": 0}


def the_hospitals_way(client_env_name):
    """What the hospital's samples do: the experiment named after the MLflow user,
    start_run without `with`, params, metrics with and without step, end_run."""
    mlflow.set_experiment(client_env_name)
    run = mlflow.start_run()
    mlflow.log_params({"lr": "0.001", "epochs": "2"})
    for epoch in range(2):
        mlflow.log_metrics({"train_loss": 1.0 / (epoch + 1)}, step=epoch)
    mlflow.log_metrics({"test_auc": 0.75})
    mlflow.end_run()
    return run.info.run_id


def test_a_dry_run_answers_the_owners_real_experiment_name_with_its_own_experiment(
        start_relay, dry_owner, monkeypatch, mlflow_url, admin_auth):
    relay = start_relay(dry_owner, "--experiment-alias", dry_owner.experiment_name, dry_run=True)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", dry_owner.dry_run_experiment_name)
    mlflow.set_tracking_uri(relay.url)
    try:
        run_id = within(60, the_hospitals_way, dry_owner.experiment_name)
        # the dry run's own name is answered too
        assert MlflowClient().get_experiment_by_name(
            dry_owner.dry_run_experiment_name).experiment_id == dry_owner.dry_run_experiment_id
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
    upstream = upstream_run(mlflow_url, admin_auth, run_id)
    assert upstream["info"]["experiment_id"] == dry_owner.dry_run_experiment_id
    assert upstream["info"]["status"] == "FINISHED"
    assert upstream["params"] == {"lr": "0.001", "epochs": "2"}
    assert metric_history(mlflow_url, admin_auth, run_id, "train_loss") == [(0, 1.0), (1, 0.5)]
    assert upstream["metrics"]["test_auc"] == 0.75
    real_runs = requests.post(f"{mlflow_url}{API}/runs/search", json={"experiment_ids": [dry_owner.experiment_id]},
                              auth=admin_auth, timeout=10).json()
    assert not real_runs.get("runs"), "a dry run logged into the real experiment"


def test_a_real_run_answers_the_owners_experiment_name(job_env, owner, mlflow_url, admin_auth):
    run_id = within(60, the_hospitals_way, owner.experiment_name)
    upstream = upstream_run(mlflow_url, admin_auth, run_id)
    assert upstream["info"]["experiment_id"] == owner.experiment_id
    assert metric_history(mlflow_url, admin_auth, run_id, "train_loss") == [(0, 1.0), (1, 0.5)]


def test_creating_the_own_experiment_is_answered_it_exists_and_other_names_say_why_not(job_env, owner):
    client = MlflowClient()
    exists = raises_within(20, client.create_experiment, owner.experiment_name)
    assert exists.error_code == "RESOURCE_ALREADY_EXISTS"
    other = raises_within(20, client.get_experiment_by_name, "someone-else")
    assert "experiments/get-by-name asked for experiment 'someone-else', which is not yours" in other.message


# ---------------------------------------------------------------- the byte budget (issue 21, finding 2)
# Every way a job stored arbitrary bytes in MLflow now ends at the budget, read back
# from MLflow's store and counted (units of the budget: tests/test_relay_budget.py).

BUDGET = relay_module.DEFAULT_TEXT_BUDGET  # 1,000,000 bytes of text
# MLflow's tracking store: PostgreSQL as deploy/testbed/mlflow.sh runs it (up.sh writes its
# URL into gateway.env), or the SQLite file of a testbed made before that
MLFLOW_STORE = os.environ.get("M2D_TEST_MLFLOW_STORE_URL") or \
    f"sqlite:///file:{Path(os.environ.get('M2D_TESTBED_DIR', '/opt/testbed')) / 'mlflow' / 'mlflow.db'}?mode=ro&uri=true"
# Tags the relay itself puts on a run (not the job's bytes), and the run name's tag (counted as the name).
RELAYS_OWN_TAGS = {"mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.runName"}


def utf8(*texts) -> int:
    return sum(len(text.encode()) for text in texts)


def stored(run_ids):
    """(bytes of text, metric points) that MLflow holds from these runs, read back from
    its store (MLFLOW_STORE): run names, user ids, params, the job's
    tags, each metric key once, every point. (Over REST, a metric's points take one
    call each, and MLflow's basic auth costs 300 ms a call.)"""
    engine = sqlalchemy.create_engine(MLFLOW_STORE, poolclass=sqlalchemy.pool.NullPool)

    def size(column):  # in bytes of UTF-8
        return f"octet_length({column})" if engine.dialect.name == "postgresql" else f"length(CAST({column} AS BLOB))"

    own_tags = ",".join(repr(k) for k in sorted(RELAYS_OWN_TAGS))
    with engine.connect() as store:
        def one(sql):
            statement = sqlalchemy.text(sql).bindparams(sqlalchemy.bindparam("ids", expanding=True))
            return store.execute(statement, {"ids": list(run_ids)}).scalar() or 0
        text = one(f"SELECT sum({size('name')} + {size('user_id')}) FROM runs WHERE run_uuid IN :ids")
        text += one(f"SELECT sum({size('key')} + {size('value')}) FROM params WHERE run_uuid IN :ids")
        text += one(f"SELECT sum({size('key')} + {size('value')}) FROM tags WHERE run_uuid IN :ids "
                    f"AND key NOT LIKE 'm2d.%' AND key NOT IN ({own_tags})")
        text += one(f"SELECT sum({size('key')}) FROM (SELECT DISTINCT run_uuid, key FROM metrics "
                    "WHERE run_uuid IN :ids) AS keys")
        points = one("SELECT count(*) FROM metrics WHERE run_uuid IN :ids")
    engine.dispose()
    return text, points


def refused_over_budget(error, text_budget=BUDGET):
    assert error.error_code == "RESOURCE_LIMIT_EXCEEDED", error.message  # a 400 on the wire, not retried
    # names the budget and what is left of it
    assert f"{text_budget:,} bytes of text" in error.message and "are left" in error.message, error.message


# ---------------------------------------------------------------- the findings, on the real stack


def test_a_run_name_and_user_id_past_mlflows_limits_never_reach_mlflow(start_relay, owner, mlflow_url, admin_auth):
    relay = start_relay(owner)
    # 900,000 characters: under the relay's body limit, so only the name's own cap stops it
    answer = requests.post(f"{relay.url}{API}/runs/create", timeout=30,
                           json={"experiment_id": owner.experiment_id, "run_name": "n" * 900_000})
    assert answer.status_code == 400 and answer.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "at most 250 characters" in answer.json()["message"]
    client = MlflowClient(relay.url)
    error = raises_within(20, client.create_run, owner.experiment_id, run_name="n" * 251)
    assert "at most 250 characters" in error.message
    # user_id of 100,001 characters and MLflow's own tags, forged: the owner's and the relay's are stored
    answer = requests.post(f"{relay.url}{API}/runs/create", timeout=30, json={
        "experiment_id": owner.experiment_id, "run_name": "r" * 250, "user_id": "u" * 100_001,
        "tags": [{"key": "mlflow.user", "value": "x" * 8000}, {"key": "mlflow.source.name", "value": "y" * 8000}]})
    assert answer.status_code == 200, answer.text
    run_id = answer.json()["run"]["info"]["run_id"]
    error = raises_within(20, client.update_run, run_id, name="m" * 251)
    assert "at most 250 characters" in error.message
    client.update_run(run_id, name="renamed")
    run = upstream_run(mlflow_url, admin_auth, run_id)
    assert run["info"]["user_id"] == owner.username
    assert run["info"]["run_name"] == "renamed"
    assert run["tags"]["mlflow.user"] == owner.username and run["tags"]["mlflow.source.name"] == "main.py"
    runs = requests.post(f"{mlflow_url}{API}/runs/search", json={"experiment_ids": [owner.experiment_id],
                         "max_results": 1000}, auth=admin_auth, timeout=30).json().get("runs", [])
    assert max(len(r["info"].get("run_name", "")) for r in runs) <= 250
    assert max(len(r["info"].get("user_id", "")) for r in runs) <= 250


def test_mlflows_own_tags_are_the_relays_and_the_job_cannot_set_or_delete_them(start_relay, owner, mlflow_url,
                                                                             admin_auth, monkeypatch):
    relay = start_relay(owner)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", owner.experiment_name)
    mlflow.set_tracking_uri(relay.url)
    # the experiment MLFLOW_EXPERIMENT_NAME names, not one an earlier test selected (restored after)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    try:
        assert "MLflow's own" in str(raises_within(20, mlflow.start_run, description="x" * 8000))
        with mlflow.start_run(run_name="epochs") as run:  # the client's own context tags are replaced
            client = MlflowClient()
            for forge in (lambda: mlflow.set_tag("mlflow.source.name", "x" * 8000),
                          lambda: client.log_batch(run.info.run_id, tags=[RunTag("mlflow.note.content", "x")]),
                          lambda: client.delete_tag(run.info.run_id, "mlflow.user")):
                assert "MLflow's own" in str(raises_within(20, forge))
            with mlflow.start_run(nested=True) as child:  # a parent that is this job's run is fine
                mlflow.log_metric("loss", 0.5)
        parent, nested = (upstream_run(mlflow_url, admin_auth, r.info.run_id) for r in (run, child))
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
    assert parent["info"]["run_name"] == "epochs"
    assert {k: v for k, v in parent["tags"].items() if k.startswith("mlflow.")} == {
        "mlflow.user": owner.username, "mlflow.source.name": "main.py", "mlflow.source.type": "JOB",
        "mlflow.runName": "epochs"}
    assert nested["tags"]["mlflow.parentRunId"] == run.info.run_id and nested["metrics"] == {"loss": 0.5}


def test_500_params_of_6000_characters_stop_at_the_budget(start_relay, owner, mlflow_url, admin_auth):
    relay = start_relay(owner)
    client = MlflowClient(relay.url)
    run_id = client.create_run(owner.experiment_id).info.run_id
    accepted, error = 0, None
    for batch in range(5):
        try:
            client.log_batch(run_id, params=[Param(f"p{batch}-{i:02}", "x" * 6000) for i in range(100)])
            accepted += 100
        except Exception as e:  # noqa: BLE001 (the refusal is checked below)
            error = e
            break
    refused_over_budget(error)
    assert accepted == 100  # 600 kB taken, the next 600 kB would pass 1 MB
    client.set_terminated(run_id)
    text, _ = stored([run_id])
    assert 600_000 < text <= BUDGET


def test_a_tag_overwritten_in_a_loop_stops_at_the_budget(start_relay, owner, mlflow_url, admin_auth):
    relay = start_relay(owner)
    client = MlflowClient(relay.url)
    run_id = client.create_run(owner.experiment_id).info.run_id
    writes = 0
    while True:
        try:
            within_seconds = time.monotonic()
            client.set_tag(run_id, "blob", f"{writes:08}" + "x" * 7992)
            assert time.monotonic() - within_seconds < 30  # answered, not held (a loaded machine is slow)
            writes += 1
        except Exception as e:  # noqa: BLE001
            refused_over_budget(e)
            break
        assert writes <= 200, "the overwrites never stopped"
    # each write of 4 + 8,000 bytes counted, though MLflow keeps only the last one
    assert 120 <= writes and writes * 8004 <= BUDGET
    assert raises_within(20, client.set_tag, run_id, "blob", "x" * 8000).error_code == "RESOURCE_LIMIT_EXCEEDED"
    client.set_terminated(run_id)
    assert upstream_run(mlflow_url, admin_auth, run_id)["tags"]["blob"].startswith(f"{writes - 1:08}")


def test_distinct_250_character_metric_keys_stop_at_the_budget(start_relay, owner, mlflow_url, admin_auth):
    relay = start_relay(owner)
    client = MlflowClient(relay.url)
    run_id = client.create_run(owner.experiment_id).info.run_id
    now, batches = int(time.time() * 1000), 0
    while True:
        metrics = [Metric(f"{batches:04}-{i:04}-".ljust(250, "k"), 2.0 ** -i, now, 0) for i in range(1000)]
        try:
            client.log_batch(run_id, metrics=metrics)
            batches += 1
        except Exception as e:  # noqa: BLE001
            refused_over_budget(e)
            break
        assert batches <= 5, "distinct keys were never refused"
    assert batches == 3  # 750 kB of keys; a fourth 250 kB does not fit
    client.set_terminated(run_id)
    text, points = stored([run_id])
    assert points == 3000 and 750_000 <= text <= BUDGET


def test_times_and_steps_mlflow_would_refuse_are_refused_by_the_relay_and_nothing_is_split(start_relay, owner,
                                                                                          mlflow_url, admin_auth):
    relay = start_relay(owner)
    client = MlflowClient(relay.url)
    run_id = client.create_run(owner.experiment_id).info.run_id
    now = int(time.time() * 1000)
    good = [{"key": "loss", "value": 0.5, "timestamp": now, "step": i} for i in range(999)]
    for bad, why in (({"timestamp": -1}, "not negative"), ({"step": 2**63}, "64-bit"), ({"value": "nan"}, "NaN"),
                     ({"value": 10**400}, "64-bit float"), ({"timestamp": "1e3"}, "whole number")):
        answer = requests.post(f"{relay.url}{API}/runs/log-batch", timeout=30, json={
            "run_id": run_id, "metrics": good + [{"key": "loss", "value": 1.0, "timestamp": now, "step": 0, **bad}]})
        assert answer.status_code == 400 and why in answer.json()["message"], (bad, answer.text)
    error = raises_within(20, client.log_metric, run_id, "loss", 0.1, timestamp=-5)
    assert error.error_code == "INVALID_PARAMETER_VALUE" and "not negative" in error.message
    client.log_batch(run_id, metrics=[Metric("odd", v, now, s) for s, v in enumerate(
        (float("nan"), float("inf"), float("-inf")))] + [Metric("odd", 1.0, 0, -(2**63))])
    client.set_terminated(run_id)
    history = metric_history(mlflow_url, admin_auth, run_id, "odd")
    assert len(history) == 4 and metric_history(mlflow_url, admin_auth, run_id, "loss") == []
    assert "MLflow refused" not in relay.log()  # no batch was refused upstream, so none was split


def test_a_sustained_exfiltration_loop_stops_at_the_budget_as_read_back_from_mlflow(start_relay, owner, mlflow_url,
                                                                                    admin_auth):
    """Every kind of write at its largest, in a loop over new runs, until all of them are
    refused: what MLflow then holds (and what was written, overwrites included) is within
    the budget. A smaller point budget than the default keeps the test short."""
    points_budget = 5000
    relay = start_relay(owner, "--metric-budget", str(points_budget))
    client = MlflowClient(relay.url)
    now, run_ids, written_text, written_points, refusals = int(time.time() * 1000), [], 0, 0, set()
    started = time.monotonic()
    for round_ in range(400):
        attempts = []
        if round_ % 20 == 0:
            name = f"{round_:04}".ljust(250, "n")
            attempts.append(("run", lambda name=name: run_ids.append(
                client.create_run(owner.experiment_id, run_name=name).info.run_id), utf8(name), 0))
        if run_ids:
            run_id, n = run_ids[-1], round_
            tags = [RunTag(f"t{i:02}", f"{n:06}".ljust(8000, "t")) for i in range(90)]
            attempts.append(("tags", lambda run_id=run_id, tags=tags: client.log_batch(run_id, tags=tags),
                             sum(utf8(t.key, t.value) for t in tags), 0))
            params = [Param(f"p{n:04}-{i}", "x" * 6000) for i in range(5)]
            attempts.append(("params", lambda run_id=run_id, params=params: client.log_batch(run_id, params=params),
                             sum(utf8(p.key, p.value) for p in params), 0))
            metrics = [Metric(f"m{n:04}", 1.0 / (i + 1), now + i, i) for i in range(1000)]
            attempts.append(("metrics", lambda run_id=run_id, metrics=metrics: client.log_batch(run_id, metrics=metrics),
                             utf8(f"m{n:04}"), 1000))
        for kind, attempt, text, points in attempts:
            try:
                attempt()
                written_text += text
                written_points += points
            except Exception as e:  # noqa: BLE001
                refused_over_budget(e)
                refusals.add(kind)
        if refusals >= {"tags", "params", "metrics"}:
            break
    assert refusals >= {"tags", "params", "metrics"}, "the loop was never stopped"
    assert time.monotonic() - started < 120
    assert 0.95 * BUDGET < written_text <= BUDGET and written_points == points_budget
    relay.stop()  # sends what it still holds
    text, points = stored(run_ids)
    assert text <= BUDGET and points <= points_budget
    assert points == points_budget  # all of it arrived (tags overwritten in MLflow hold less than was written)
    assert "refusing calls over the budget" in relay.log() and relay.log().count("over the budget") <= 2


def test_calls_to_mlflow_are_held_to_the_jobs_share_of_the_server(start_relay, owner):
    relay = start_relay(owner, "--upstream-rate", "2", "--upstream-burst", "2")
    client = MlflowClient(relay.url)
    started = time.monotonic()
    for _ in range(8):  # 2 at once, then 2 a second: 3 s at least
        client.get_experiment(owner.experiment_id)
    assert time.monotonic() - started >= 2.9
    # log calls are answered by the relay and batched: not held. At a share of one call
    # in 10 s, held ones would take 1,000 s; a loaded machine's few seconds are far from it
    batching = start_relay(owner, "--upstream-rate", "0.1", "--upstream-burst", "1")
    client = MlflowClient(batching.url)
    run_id = client.create_run(owner.experiment_id).info.run_id
    started = time.monotonic()
    for step in range(100):
        client.log_metric(run_id, "loss", 1 / (step + 1), step=step)
    assert time.monotonic() - started < 100

    slow = start_relay(owner, "--upstream-rate", "0.01", "--upstream-burst", "1", "--upstream-wait", "1")
    client = MlflowClient(slow.url)
    client.get_experiment(owner.experiment_id)
    error = raises_within(20, client.get_experiment, owner.experiment_id)
    assert error.error_code == "REQUEST_LIMIT_EXCEEDED" and "share of the platform's MLflow" in error.message


def test_batches_the_relay_sends_wait_for_the_jobs_share_too(start_relay, owner, mlflow_url, admin_auth):
    # Only a read of the run sends its buffer here; 3,000 points are 3 batches. Each
    # call upstream takes a turn at 1 every 4 s: the 3 batches and the read need 3 turns
    # more than the bucket holds, 12 s at least (sent at once, they took under 10 s).
    relay = start_relay(owner, "--upstream-rate", "0.25", "--upstream-burst", "1", "--upstream-wait", "30",
                        "--flush-interval", "600")
    client = MlflowClient(relay.url)
    run_id = client.create_run(owner.experiment_id).info.run_id
    now = int(time.time() * 1000)
    for batch in range(3):
        client.log_batch(run_id, metrics=[Metric("loss", 1.0, now, batch * 1000 + i) for i in range(1000)])
    started = time.monotonic()
    within(60, client.get_run, run_id)
    assert time.monotonic() - started >= 11
    assert len(metric_history(mlflow_url, admin_auth, run_id, "loss")) == 3000


def test_m2d_runs_relay_enforces_the_same_budget(owner, tmp_path):
    """`m2d run` (Apptainer mode) starts the relay through m2d.container._start_relay:
    the same file with the same defaults, so the same budget."""
    run_dir, private = tmp_path / "run", tmp_path / "private"
    run_dir.mkdir(mode=0o700)
    private.mkdir(mode=0o700)
    credentials = private / "login"
    credentials.touch(mode=0o600)
    credentials.write_text(f"{owner.username}\n{owner.password}\n")
    server = tracking.Server(url=os.environ["M2D_MLFLOW_URL"], username=owner.username, password=owner.password,
                             experiment_id=owner.experiment_id, experiment_name=owner.experiment_name, shown="")
    serving = container._start_relay(run_dir, credentials, server, private / "relay.ready")
    port = free_port()
    shim = subprocess.Popen([RELAY_PYTHON, str(RELAY), "shim", "--listen", f"127.0.0.1:{port}", "--socket",
                             str(run_dir / "mlflow.sock"), "--ready-file", str(private / "shim.ready")],
                            stderr=(private / "shim.log").open("w"))
    try:
        wait_for_file(private / "shim.ready", shim, "shim", private / "shim.log")
        client = MlflowClient(f"http://127.0.0.1:{port}")
        run_id = client.create_run(owner.experiment_id).info.run_id
        writes = 0
        while writes < 200:
            try:
                client.set_tag(run_id, "blob", "x" * 7996)
            except Exception as e:  # noqa: BLE001
                refused_over_budget(e)
                break
            writes += 1
        assert 120 <= writes <= 125
    finally:
        for process in (shim, serving):
            process.terminate()
            process.wait(timeout=60)




IDENTIFIERS = {"P1047": "a patient id", "S12-A31": "a case name", "CLaM-sample/S12-A31/LCC/1.png": "an image path"}


def test_keys_values_and_run_names_that_hold_an_identifier_of_the_dataset_are_refused(
        start_relay, owner, tmp_path, mlflow_url, admin_auth):
    """The relay reads the index's keyed hashes (never the values) and refuses, naming
    only the kind: its refusals reach the owner in the job's stderr."""
    index = identifier_index(tmp_path / "identifiers.json", IDENTIFIERS)
    relay = start_relay(owner, "--identifiers", str(index))
    client = MlflowClient(relay.url)
    run_id = client.create_run(owner.experiment_id, run_name="baseline").info.run_id
    hostile = [
        lambda: client.log_metric(run_id, "loss_P1047", 0.3),
        lambda: client.log_param(run_id, "worst_case", "s12-a31"),  # any case
        lambda: client.set_tag(run_id, "hardest", "CLaM-sample/S12-A31/LCC/1.png"),
        lambda: client.log_batch(run_id, metrics=[Metric("auc/S12-A31", 0.9, 0, 0)]),
        lambda: client.create_run(owner.experiment_id, run_name="P1047 only"),
        lambda: client.update_run(run_id, name="leave-out-S12-A31"),
    ]
    messages = [raises_within(20, call).message for call in hostile]
    for message in messages:
        assert "holds an identifier of the dataset" in message
        assert not any(value.lower() in message.lower() for value in IDENTIFIERS)
    # what is not an identifier goes through: a longer number, an id's neighbour, aggregates
    client.log_metric(run_id, "loss", 0.25, step=1)
    client.log_param(run_id, "cases", "P10470")
    client.log_metric(run_id, "patient", 1047.0)  # this index holds no numeric id
    client.set_terminated(run_id)
    relay.stop()
    stored = upstream_run(mlflow_url, admin_auth, run_id)
    assert stored["metrics"] == {"loss": 0.25, "patient": 1047.0} and stored["params"] == {"cases": "P10470"}
    assert not any(value.lower() in relay.log().lower() for value in IDENTIFIERS)


def test_a_numeric_identifier_logged_as_a_metric_value_is_refused(start_relay, owner, tmp_path):
    index = identifier_index(tmp_path / "identifiers.json", {"40213377": "a patient id"})
    client = MlflowClient(start_relay(owner, "--identifiers", str(index)).url)
    run_id = client.create_run(owner.experiment_id).info.run_id
    assert "identifier" in raises_within(20, client.log_metric, run_id, "id", 40213377.0).message
    client.log_metric(run_id, "id", 40213377.5)


def test_metrics_logged_per_training_case_flag_the_run_for_its_reviewers(start_relay, owner, tmp_path, mlflow_url,
                                                                        admin_auth):
    stats = tmp_path / "slurm-1.relay.json"
    relay = start_relay(owner, "--stats-file", str(stats), "--flag-steps", "50", "--flag-numbered-keys", "20")
    client = MlflowClient(relay.url)
    per_key = client.create_run(owner.experiment_id).info.run_id
    per_step = client.create_run(owner.experiment_id).info.run_id
    plain = client.create_run(owner.experiment_id).info.run_id
    client.log_batch(per_key, metrics=[Metric(f"loss_case_{i}", 0.1, 0, 0) for i in range(30)])
    client.log_batch(per_step, metrics=[Metric("case_loss", 0.1, 0, step) for step in range(60)])
    client.log_batch(plain, metrics=[Metric(f"layer{i}.grad_norm", 1.0, 0, step) for i in range(4)
                                     for step in range(40)])
    # the flag is the platform's: the job can neither set nor delete it
    assert "m2d.* are the platform's" in raises_within(10, client.set_tag, plain, "m2d.flag.per_case_metrics",
                                                       "x").message
    relay.stop()
    tags = {run: upstream_run(mlflow_url, admin_auth, run)["tags"] for run in (per_key, per_step, plain)}
    assert "differ only in a number" in tags[per_key]["m2d.flag.per_case_metrics"]
    assert "more than 50 distinct steps" in tags[per_step]["m2d.flag.per_case_metrics"]
    assert "m2d.flag.per_case_metrics" not in tags[plain]
    flags = json.loads(stats.read_text())["flags"]
    assert set(flags) == {per_key, per_step}
