"""The MLflow relay (singularity/relay.py) between the real mlflow client and the testbed's
real MLflow server (basic auth, NO_PERMISSIONS by default). Each test starts its own
relay and shim as subprocesses, as the batch script and the container do:

    set -a; . /opt/testbed/gateway.env; set +a; .venv/bin/python -m pytest tests/test_relay.py
"""

import concurrent.futures
import json
import signal
import time
import uuid
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from gateway.adapters.mlflow import MlflowAdmin

from .helpers.relay import API, RelayProcesses, free_port


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
        assert time.monotonic() - started < 5
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
