"""MLflow as deploy/testbed/mlflow.sh runs it for a cluster (several workers, PostgreSQL,
the verified-credential cache of deploy/mlflow/m2d_mlflow_auth.py), against the real
testbed server: a login accepted once is not a key to anything else. Each check is
made on every worker: ``on_every_worker`` sends a request over enough fresh
connections that each of the server's workers (4) answers some of them.

    set -a; . /opt/testbed/gateway.env; set +a
    .venv/bin/python -m pytest tests/test_mlflow_at_scale.py -p no:cacheprovider
"""

import json
import os
import threading
import time
import uuid

import pytest
import requests
import sqlalchemy
from sqlalchemy.engine import make_url

from gateway.adapters.mlflow import REVOKE_PERMISSION, MlflowAdmin

from .helpers.relay import API, RelayProcesses, UnixHTTPConnection, call, stop_all

REQUESTS_PER_CHECK = 24  # fresh connections; the kernel spreads them over the workers


@pytest.fixture(scope="module")
def admin(mlflow_url, admin_auth):
    return MlflowAdmin(mlflow_url, admin_auth.username, admin_auth.password, timeout=60)


@pytest.fixture(scope="module")
def researchers(mlflow_url, admin_auth, admin):
    """A factory of provisioned researchers, removed at the end."""
    made, tag = [], uuid.uuid4().hex[:8]

    def new(name):
        made.append(admin.provision(f"m2d-scale-test-{tag}-{name}"))
        return made[-1]

    yield new
    for account in made:
        requests.delete(f"{mlflow_url}{API}/users/delete", json={"username": account.username},
                        auth=admin_auth, timeout=30)
        requests.post(f"{mlflow_url}{API}/experiments/delete", json={"experiment_id": account.experiment_id},
                      auth=admin_auth, timeout=30)


def on_every_worker(url, account_or_login, method="GET", path="/experiments/get-by-name", **kwargs):
    """The status codes of REQUESTS_PER_CHECK requests, each on a fresh connection."""
    login = ((account_or_login.username, account_or_login.password)
             if hasattr(account_or_login, "password") else account_or_login)
    codes = []
    for _ in range(REQUESTS_PER_CHECK):
        with requests.Session() as fresh:
            codes.append(fresh.request(method, f"{url}{API}{path}", auth=login, timeout=60, **kwargs).status_code)
    return codes


def read_own_experiment(url, account):
    return on_every_worker(url, account, params={"experiment_name": account.experiment_name})


def test_a_cached_login_does_not_let_a_wrong_password_or_another_users_password_in(mlflow_url, researchers):
    alice, bob = researchers("alice"), researchers("bob")
    assert set(read_own_experiment(mlflow_url, alice)) == {200}  # cached on every worker now
    params = {"experiment_name": alice.experiment_name}
    assert set(on_every_worker(mlflow_url, (alice.username, alice.password + "x"), params=params)) == {401}
    assert set(on_every_worker(mlflow_url, (alice.username, bob.password), params=params)) == {401}
    assert set(on_every_worker(mlflow_url, (alice.username, ""), params=params)) == {401}
    assert set(on_every_worker(mlflow_url, ("m2d-nobody-" + uuid.uuid4().hex[:6], alice.password),
                               params=params)) == {401}


def verified_at(username):
    """When MLflow last hashed this login's password, as the plug-in's shared record in
    the auth database says (the tracking store's server and role, its `_auth` database:
    deploy/testbed/mlflow.sh); None if never."""
    store = make_url(os.environ["M2D_TEST_MLFLOW_STORE_URL"])
    engine = sqlalchemy.create_engine(store.set(database=f"{store.database}_auth"), poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as auth_database:
        return auth_database.execute(sqlalchemy.text("SELECT verified_at FROM m2d_verified_logins WHERE username = :u"),
                                     {"u": username}).scalar_one_or_none()


def test_a_login_is_hashed_once_for_every_worker_not_once_per_worker(mlflow_url, researchers):
    """200 jobs starting on 4 workers were 800 password hashes (a third of MLflow's CPU
    while they logged): one worker's check serves the others."""
    ivan = researchers("ivan")
    assert verified_at(ivan.username) is None
    with requests.Session() as one:
        assert one.get(f"{mlflow_url}{API}/experiments/get-by-name", auth=(ivan.username, ivan.password),
                       params={"experiment_name": ivan.experiment_name}, timeout=60).status_code == 200
    first = verified_at(ivan.username)
    assert first is not None
    assert set(read_own_experiment(mlflow_url, ivan)) == {200}
    assert verified_at(ivan.username) == first  # no worker hashed it again
    assert set(on_every_worker(mlflow_url, (ivan.username, ivan.password + "x"),
                               params={"experiment_name": ivan.experiment_name})) == {401}
    assert verified_at(ivan.username) == first  # a refusal leaves the record alone


def test_a_changed_password_is_refused_at_once_on_every_worker(mlflow_url, admin, researchers):
    carol = researchers("carol")
    assert set(read_own_experiment(mlflow_url, carol)) == {200}
    renewed = admin.provision(carol.username)  # what `flask --app gateway users approve` does
    assert renewed.password != carol.password
    assert set(read_own_experiment(mlflow_url, carol)) == {401}
    assert set(read_own_experiment(mlflow_url, renewed)) == {200}


def test_a_deleted_user_is_refused_at_once_on_every_worker(mlflow_url, admin_auth, researchers):
    dave = researchers("dave")
    assert set(read_own_experiment(mlflow_url, dave)) == {200}
    requests.delete(f"{mlflow_url}{API}/users/delete", json={"username": dave.username}, auth=admin_auth,
                    timeout=30).raise_for_status()
    assert set(read_own_experiment(mlflow_url, dave)) == {401}


def new_run(url, account) -> str:
    return requests.post(f"{url}{API}/runs/create", auth=(account.username, account.password), timeout=60,
                         json={"experiment_id": account.experiment_id}).json()["run"]["info"]["run_id"]


def one_value(run_id) -> dict:
    """A runs/log-batch body: one metric value for the run."""
    return {"run_id": run_id, "metrics": [{"key": "m", "value": 1, "timestamp": 0, "step": 0}]}


def test_a_cached_login_reads_and_writes_only_its_own_experiment(mlflow_url, researchers):
    erin, frank = researchers("erin"), researchers("frank")
    franks_run = new_run(mlflow_url, frank)
    assert set(read_own_experiment(mlflow_url, erin)) == {200}
    assert set(on_every_worker(mlflow_url, erin, params={"run_id": franks_run}, path="/runs/get")) == {403}
    assert set(on_every_worker(mlflow_url, erin, "POST", "/runs/log-batch", json=one_value(franks_run))) == {403}
    assert set(on_every_worker(mlflow_url, erin, "POST", "/runs/create",
                               json={"experiment_id": frank.experiment_id})) == {403}


def test_a_runs_remembered_experiment_is_no_remembered_permission(mlflow_url, admin_auth, researchers):
    """The plug-in remembers which experiment a run is in (MLflow loads the whole
    run to learn it on every call), never whether a login may write there: another
    login is refused on the remembered run, and a grant taken away refuses its owner
    at once, on every worker."""
    grace, heidi = researchers("grace"), researchers("heidi")
    batch = one_value(new_run(mlflow_url, grace))
    assert set(on_every_worker(mlflow_url, grace, "POST", "/runs/log-batch", json=batch)) == {200}  # remembered
    assert set(on_every_worker(mlflow_url, heidi, "POST", "/runs/log-batch", json=batch)) == {403}
    requests.post(f"{mlflow_url}{REVOKE_PERMISSION}", auth=admin_auth, timeout=30,
                  json={"username": grace.username, "resource_type": "experiment",
                        "resource_id": grace.experiment_id}).raise_for_status()
    assert set(on_every_worker(mlflow_url, grace, "POST", "/runs/log-batch", json=batch)) == {403}


def test_a_run_met_first_by_another_login_is_refused_and_its_experiments_answer_grants_nothing(
        mlflow_url, researchers):
    """A worker learns a run's experiment by one narrow lookup the first time it meets
    the run, whoever asks, and keeps MLflow's answer (what a call needs, in which
    experiment) for every run of that experiment: neither is a grant. A stranger who
    is the first on every worker to name a run, or the first to name a second run of
    an experiment whose answer is kept, is refused; the owner is let in; a run that
    does not exist is refused."""
    kate, leo = researchers("kate"), researchers("leo")
    first, second = new_run(mlflow_url, kate), new_run(mlflow_url, kate)
    assert set(on_every_worker(mlflow_url, leo, "POST", "/runs/log-batch", json=one_value(first))) == {403}
    assert set(on_every_worker(mlflow_url, kate, "POST", "/runs/log-batch", json=one_value(first))) == {200}
    assert set(on_every_worker(mlflow_url, leo, "POST", "/runs/log-batch", json=one_value(second))) == {403}
    assert set(on_every_worker(mlflow_url, leo, params={"run_id": second}, path="/runs/get")) == {403}
    assert set(on_every_worker(mlflow_url, kate, "POST", "/runs/log-batch", json=one_value(second))) == {200}
    assert set(on_every_worker(mlflow_url, kate, "POST", "/runs/log-batch",
                               json=one_value(uuid.uuid4().hex))) == {403}


def test_an_admin_made_or_unmade_holds_at_once_on_every_worker(mlflow_url, admin_auth, researchers):
    """The user's row (is it an admin?) is the one read with the login in the same
    request, never one kept from an earlier request."""
    mia, noah = researchers("mia"), researchers("noah")
    batch = one_value(new_run(mlflow_url, mia))

    def make_admin(is_admin):
        requests.patch(f"{mlflow_url}{API}/users/update-admin", auth=admin_auth, timeout=30,
                       json={"username": noah.username, "is_admin": is_admin}).raise_for_status()
    assert set(on_every_worker(mlflow_url, noah, "POST", "/runs/log-batch", json=batch)) == {403}
    make_admin(True)
    assert set(on_every_worker(mlflow_url, noah, "POST", "/runs/log-batch", json=batch)) == {200}
    make_admin(False)
    assert set(on_every_worker(mlflow_url, noah, "POST", "/runs/log-batch", json=batch)) == {403}


def test_jobs_logging_at_once_through_their_relays_get_every_value_into_their_own_runs(
        mlflow_url, admin_auth, researchers, tmp_path):
    jobs, values = 8, 15
    owners = [researchers(f"job{i}") for i in range(jobs)]
    relays = [RelayProcesses(tmp_path / f"job{i}", owner, mlflow_url, "--stats-file", str(tmp_path / f"{i}.stats"),
                             shim=False) for i, owner in enumerate(owners)]
    run_ids = [None] * jobs

    def job(i):
        connection = UnixHTTPConnection(str(relays[i].socket))
        run_ids[i] = call(connection, "POST", "/runs/create",
                          {"experiment_id": owners[i].experiment_id})["run"]["info"]["run_id"]
        for step in range(values):
            call(connection, "POST", "/runs/log-metric", {"run_id": run_ids[i], "key": "loss", "value": i + step / 100,
                                                          "step": step, "timestamp": int(time.time() * 1000)})
            time.sleep(0.2)
        connection.close()

    try:
        threads = [threading.Thread(target=job, args=(i,)) for i in range(jobs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # a job's relay touches no run of another job's owner
        other = UnixHTTPConnection(str(relays[0].socket))
        with pytest.raises(RuntimeError, match="403"):
            call(other, "GET", f"/runs/get?run_id={run_ids[1]}")
        with pytest.raises(RuntimeError, match="403"):
            call(other, "POST", "/runs/log-metric", {"run_id": run_ids[1], "key": "loss", "value": -1, "step": 99,
                                                     "timestamp": 0})
        other.close()
    finally:
        stop_all(relays)  # each sends what it still holds
    for i, run_id in enumerate(run_ids):
        history = requests.get(f"{mlflow_url}{API}/metrics/get-history", auth=admin_auth, timeout=60,
                               params={"run_id": run_id, "metric_key": "loss"}).json()["metrics"]
        assert sorted((m["step"], m["value"]) for m in history) == [(step, i + step / 100) for step in range(values)]
        run = requests.get(f"{mlflow_url}{API}/runs/get", params={"run_id": run_id}, auth=admin_auth,
                           timeout=60).json()["run"]
        assert run["info"]["experiment_id"] == owners[i].experiment_id
        refused = 2 if i == 0 else 0  # the two calls on job 1's run above
        assert json.loads((tmp_path / f"{i}.stats").read_text()) == {"refused": refused, "undelivered": 0}


def test_many_log_batches_at_once_are_all_answered(mlflow_url, researchers):
    """MLflow's log_batch opens a second database session inside its first; a worker
    running more of them at once than its pool holds waited on itself until the pool's
    timeout and failed them all (m2d_mlflow_auth.requests_within_pool). 96 at once over
    fresh connections are about 24 per worker, three times its pool."""
    grace = researchers("grace")
    assert set(read_own_experiment(mlflow_url, grace)) == {200}  # every worker knows the login
    login = (grace.username, grace.password)
    runs = [new_run(mlflow_url, grace) for _ in range(8)]
    at_once = 96
    start = threading.Barrier(at_once)
    codes = [None] * at_once

    def log_batch(i):
        batch = {"run_id": runs[i % len(runs)],
                 "metrics": [{"key": f"m{k}", "value": i, "timestamp": 0, "step": i} for k in range(3)],
                 "params": [{"key": f"p{i}", "value": "v"}], "tags": [{"key": f"t{i}", "value": "v"}]}
        with requests.Session() as fresh:
            start.wait()
            codes[i] = fresh.post(f"{mlflow_url}{API}/runs/log-batch", json=batch, auth=login, timeout=300).status_code

    threads = [threading.Thread(target=log_batch, args=(i,)) for i in range(at_once)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert codes == [200] * at_once
