"""Unit tests of the relay's decisions on calls that name an experiment
(singularity/relay.py), with a stand-in for MLflow that records what reached it. The
same calls from real mlflow clients, against the real server, are in
tests/test_relay.py and tests/test_mlflow_clients.py."""

import json
import urllib.parse

import pytest

from .helpers.relay import RecordingUpstream, relay

RelayLimits, Refused, Relay, TokenBucket, parse_args = relay.RelayLimits, relay.Refused, relay.Relay, relay.TokenBucket, relay.parse_args

API = relay.API
REAL, REAL_ID = "alice", "7"
DRY, DRY_ID = "alice-dryrun", "8"


def make_relay(dry_run: bool):
    args = parse_args(["serve", "--socket", "s", "--upstream", "http://m", "--password-file", "p",
                       "--experiment-id", "x", "--experiment-name", "x"])
    upstream = RecordingUpstream()
    if dry_run:
        relay = Relay(upstream, DRY_ID, DRY, RelayLimits(args), TokenBucket(1000, 1000), experiment_alias=REAL)
    else:
        relay = Relay(upstream, REAL_ID, REAL, RelayLimits(args), TokenBucket(1000, 1000))
    return relay, upstream


def get(relay, call, **params):
    return relay.handle("GET", f"{API}/{call}?{urllib.parse.urlencode(params, doseq=True)}", b"")


def post(relay, call, body):
    return relay.handle("POST", f"{API}/{call}", json.dumps(body).encode())


def refusal(call, *args, **kwargs) -> Refused:
    with pytest.raises(Refused) as caught:
        call(*args, **kwargs)
    return caught.value


@pytest.mark.parametrize("asked", [REAL, DRY])
def test_a_dry_run_answers_the_real_name_and_its_own_with_the_dry_runs_experiment(asked):
    relay, upstream = make_relay(dry_run=True)
    assert get(relay, "experiments/get-by-name", experiment_name=asked)[0] == 200
    assert upstream.calls == [("GET", f"{API}/experiments/get-by-name", {"experiment_name": [DRY]}, None)]


def test_a_real_run_answers_its_own_name_unchanged():
    relay, upstream = make_relay(dry_run=False)
    assert get(relay, "experiments/get-by-name", experiment_name=REAL)[0] == 200
    assert upstream.calls == [("GET", f"{API}/experiments/get-by-name", {"experiment_name": [REAL]}, None)]


@pytest.mark.parametrize("dry_run", [False, True])
def test_another_name_is_refused_with_what_was_asked_and_what_is_allowed(dry_run):
    relay, upstream = make_relay(dry_run)
    error = refusal(get, relay, "experiments/get-by-name", experiment_name="bob")
    assert error.status == 403 and error.error_code == "PERMISSION_DENIED"
    assert "experiments/get-by-name asked for experiment 'bob', which is not yours" in error.message
    assert f"mlflow.set_experiment('{REAL}')" in error.message
    assert upstream.calls == []


def test_a_real_run_refuses_the_dry_runs_name():
    relay, upstream = make_relay(dry_run=False)
    assert refusal(get, relay, "experiments/get-by-name", experiment_name=DRY).status == 403
    assert upstream.calls == []


@pytest.mark.parametrize("names", [[], [REAL, "bob"], [REAL, REAL]])
def test_get_by_name_needs_exactly_one_name_and_says_how_many_it_had(names):
    relay, upstream = make_relay(dry_run=True)
    error = refusal(get, relay, "experiments/get-by-name", experiment_name=names)
    assert error.status == 400
    assert error.message == f"experiments/get-by-name needs exactly one experiment_name parameter; " \
                            f"this request had {len(names)}"
    assert upstream.calls == []


def test_experiments_get_answers_only_the_jobs_own_id():
    relay, upstream = make_relay(dry_run=True)
    assert get(relay, "experiments/get", experiment_id=DRY_ID)[0] == 200
    error = refusal(get, relay, "experiments/get", experiment_id=REAL_ID)
    assert error.status == 403 and f"asked for experiment id '{REAL_ID}', which is not yours" in error.message
    assert [call[2] for call in upstream.calls] == [{"experiment_id": [DRY_ID]}]


@pytest.mark.parametrize("dry_run,name", [(False, REAL), (True, REAL), (True, DRY)])
def test_creating_the_own_experiment_answers_that_it_exists(dry_run, name):
    relay, upstream = make_relay(dry_run)
    error = refusal(post, relay, "experiments/create", {"name": name})
    assert (error.status, error.error_code) == (400, "RESOURCE_ALREADY_EXISTS")
    assert f"mlflow.set_experiment('{name}')" in error.message
    assert upstream.calls == []


def test_creating_another_experiment_is_refused_naming_it():
    relay, upstream = make_relay(dry_run=False)
    error = refusal(post, relay, "experiments/create", {"name": "bob"})
    assert error.status == 403 and "experiments/create asked for a new experiment 'bob'" in error.message
    assert upstream.calls == []


def test_runs_are_created_only_in_the_jobs_experiment_and_the_default_one_is_named():
    relay, upstream = make_relay(dry_run=True)
    assert post(relay, "runs/create", {"experiment_id": DRY_ID})[0] == 200
    error = refusal(post, relay, "runs/create", {"experiment_id": "0"})
    assert error.status == 403
    assert "runs/create asked for experiment id '0' (MLflow's Default experiment" in error.message
    assert f"'{REAL}' (in this dry run, '{DRY}')" in error.message
    assert [call[3]["experiment_id"] for call in upstream.calls] == [DRY_ID]
