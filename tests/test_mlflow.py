"""The MLflow adapter against the real testbed server (basic-auth, default permission
NO_PERMISSIONS). Run with the testbed's settings in the environment:

    set -a; . /opt/testbed/gateway.env; set +a; .venv/bin/python -m pytest tests/test_mlflow_admin.py
"""

import time
import uuid

import pytest
import requests

from gateway.adapters.mlflow import MlflowAccount, MlflowAdmin, MlflowError

API = "/api/2.0/mlflow"


@pytest.fixture(scope="module")
def url(mlflow_url):
    return mlflow_url


@pytest.fixture(scope="module")
def admin(url, admin_auth):
    return MlflowAdmin(url, admin_auth.username, admin_auth.password)


@pytest.fixture
def new_username(url, admin_auth):
    """A function that makes usernames unique to this run; their users and
    experiments are removed afterwards."""
    made = []

    def make(name="researcher"):
        made.append(f"m2d-test-{name}-{uuid.uuid4().hex[:8]}")
        return made[-1]

    yield make
    for username in made:
        requests.delete(f"{url}{API}/users/delete", json={"username": username}, auth=admin_auth, timeout=10)
        found = requests.get(f"{url}{API}/experiments/get-by-name", params={"experiment_name": username},
                             auth=admin_auth, timeout=10)
        if found.ok and found.json()["experiment"]["lifecycle_stage"] == "active":
            requests.post(f"{url}{API}/experiments/delete", auth=admin_auth, timeout=10,
                          json={"experiment_id": found.json()["experiment"]["experiment_id"]})


def as_user(url, account: MlflowAccount, method: str, path: str, **kwargs) -> requests.Response:
    return requests.request(method, f"{url}{API}{path}", auth=(account.username, account.password), timeout=10, **kwargs)


def log_a_run(url, account: MlflowAccount, experiment_id=None) -> requests.Response:
    """Create a run and log one metric, as a job would; the last response."""
    created = as_user(url, account, "POST", "/runs/create",
                      json={"experiment_id": experiment_id or account.experiment_id, "start_time": int(time.time() * 1000)})
    if not created.ok:
        return created
    run_id = created.json()["run"]["info"]["run_id"]
    return as_user(url, account, "POST", "/runs/log-metric",
                   json={"run_id": run_id, "key": "accuracy", "value": 0.93, "timestamp": int(time.time() * 1000), "step": 1})


def test_provisioned_user_logs_a_run_in_their_own_experiment_with_their_own_password(url, admin, new_username):
    username = new_username()
    account = admin.provision(username)
    assert (account.username, account.experiment_name) == (username, username)
    assert len(account.password) >= 32

    created = as_user(url, account, "POST", "/runs/create", json={"experiment_id": account.experiment_id})
    assert created.status_code == 200, created.text
    run_id = created.json()["run"]["info"]["run_id"]
    logged = as_user(url, account, "POST", "/runs/log-metric",
                     json={"run_id": run_id, "key": "accuracy", "value": 0.93, "timestamp": 0, "step": 1})
    assert logged.status_code == 200, logged.text
    run = as_user(url, account, "GET", "/runs/get", params={"run_id": run_id}).json()["run"]
    assert run["data"]["metrics"] == [{"key": "accuracy", "value": 0.93, "timestamp": 0, "step": 1}]
    experiment = as_user(url, account, "GET", "/experiments/get-by-name", params={"experiment_name": username})
    assert experiment.json()["experiment"]["experiment_id"] == account.experiment_id


def test_another_researcher_gets_403_on_someone_elses_experiment(url, admin, new_username):
    alice = admin.provision(new_username("alice"))
    bob = admin.provision(new_username("bob"))

    assert as_user(url, bob, "GET", "/experiments/get", params={"experiment_id": alice.experiment_id}).status_code == 403
    assert log_a_run(url, bob, experiment_id=alice.experiment_id).status_code == 403
    assert log_a_run(url, alice).status_code == 200


def test_provisioning_twice_keeps_the_experiment_and_replaces_the_password(url, admin, new_username):
    username = new_username()
    first = admin.provision(username)
    second = admin.provision(username)

    assert second.experiment_id == first.experiment_id
    assert second.password != first.password
    assert log_a_run(url, second).status_code == 200
    assert log_a_run(url, first).status_code == 401


def test_provisioning_completes_what_an_earlier_attempt_left_undone(url, admin, admin_auth, new_username):
    # The user exists (with a password nobody remembers) and so does the experiment,
    # but the grant was never made.
    username = new_username()
    requests.post(f"{url}{API}/users/create", json={"username": username, "password": "forgotten-password-1"},
                  auth=admin_auth, timeout=10).raise_for_status()
    made = requests.post(f"{url}{API}/experiments/create", json={"name": username}, auth=admin_auth, timeout=10)
    made.raise_for_status()

    account = admin.provision(username)

    assert account.experiment_id == made.json()["experiment_id"]
    assert log_a_run(url, account).status_code == 200


def test_a_weaker_existing_grant_is_raised_to_manage(url, admin, admin_auth, new_username):
    username = new_username()
    account = admin.provision(username)
    grant = {"username": username, "resource_type": "experiment", "resource_id": account.experiment_id}
    requests.post(f"{url}/api/3.0/mlflow/users/permissions/revoke", json=grant, auth=admin_auth, timeout=10).raise_for_status()
    requests.post(f"{url}/api/3.0/mlflow/users/permissions/grant", json=grant | {"permission": "READ"},
                  auth=admin_auth, timeout=10).raise_for_status()
    assert log_a_run(url, account).status_code == 403

    account = admin.provision(username)

    assert log_a_run(url, account).status_code == 200
    permission = requests.get(f"{url}/api/3.0/mlflow/users/permissions/get", params=grant, auth=admin_auth, timeout=10)
    assert permission.json()["permission"] == "MANAGE"


def test_a_deleted_experiment_is_restored(url, admin, admin_auth, new_username):
    username = new_username()
    first = admin.provision(username)
    requests.post(f"{url}{API}/experiments/delete", json={"experiment_id": first.experiment_id},
                  auth=admin_auth, timeout=10).raise_for_status()

    second = admin.provision(username)

    assert second.experiment_id == first.experiment_id
    assert log_a_run(url, second).status_code == 200


def test_an_mlflow_admin_account_is_never_handed_out(url, admin, admin_auth, new_username):
    username = new_username("ops")
    requests.post(f"{url}{API}/users/create", json={"username": username, "password": "ops-password-123"},
                  auth=admin_auth, timeout=10).raise_for_status()
    requests.patch(f"{url}{API}/users/update-admin", json={"username": username, "is_admin": True},
                   auth=admin_auth, timeout=10).raise_for_status()
    with pytest.raises(MlflowError, match="is an MLflow admin"):
        admin.provision(username)
    with pytest.raises(ValueError):
        admin.provision(admin_auth.username)
    # the old password still works: nothing was reset
    assert requests.get(f"{url}{API}/users/get", params={"username": username}, auth=(username, "ops-password-123"),
                        timeout=10).status_code == 200


def test_a_wrong_admin_password_is_an_error_with_the_status_and_without_the_password(url, admin_auth, new_username):
    wrong = "not-the-admin-password-" + uuid.uuid4().hex
    with pytest.raises(MlflowError) as caught:
        MlflowAdmin(url, admin_auth.username, wrong).provision(new_username())
    assert caught.value.status == 401
    assert wrong not in str(caught.value) and wrong not in repr(caught.value.args)


def test_an_unreachable_server_is_an_error_without_a_status():
    with pytest.raises(MlflowError, match="cannot reach") as caught:
        MlflowAdmin("http://127.0.0.1:9", "admin", "whatever-password", timeout=2).provision("nobody")
    assert caught.value.status is None


def test_an_account_never_shows_its_password_in_logs():
    account = MlflowAccount("alice", "s3cret-password-value", "alice", "7")
    assert "s3cret" not in repr(account) and "s3cret" not in str(account)
