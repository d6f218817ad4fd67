"""The MLflow relay's byte budget and MLflow's own field limits (singularity/relay.py), with the
real mlflow client against the testbed's real MLflow, as in tests/test_relay.py: every
way a job stored arbitrary bytes in MLflow (issue 21, finding 2) now ends at the budget,
read back from MLflow and counted.

    set -a; . /opt/testbed/gateway.env; set +a; .venv/bin/python -m pytest tests/test_relay_budget.py
"""
# ruff: noqa: F811 (the relay fixtures of tests/test_relay.py, imported)

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from gateway.config import DEFAULTS
from jobs.jobscript import render_job_script
from m2d import container, tracking
from tests.helpers.relay import API, RELAY, RELAY_PYTHON, free_port, wait_for_file
from tests.helpers.relay import relay as relay_module
from tests.test_jobscript import _spec
from tests.test_relay import (  # noqa: F401 (fixtures)
    accounts,
    metric_history,
    owner,
    raises_within,
    start_relay,
    upstream_run,
    within,
)

BUDGET = relay_module.DEFAULT_TEXT_BUDGET  # 1,000,000 bytes of text
MLFLOW_STORE = Path(os.environ.get("M2D_TESTBED_DIR", "/opt/testbed")) / "mlflow" / "mlflow.db"
# Tags the relay itself puts on a run (not the job's bytes), and the run name's tag (counted as the name).
RELAYS_OWN_TAGS = {"mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.runName"}


def utf8(*texts) -> int:
    return sum(len(text.encode()) for text in texts)


def stored(run_ids):
    """(bytes of text, metric points) that MLflow holds from these runs, read back from
    its store (the testbed's SQLite, read-only): run names, user ids, params, the job's
    tags, each metric key once, every point. (Over REST, a metric's points take one
    call each, and MLflow's basic auth costs 300 ms a call.)"""
    marks = ",".join("?" * len(run_ids))
    with sqlite3.connect(f"file:{MLFLOW_STORE}?mode=ro", uri=True, timeout=30) as store:
        def one(sql):
            return store.execute(sql.format(marks=marks), run_ids).fetchone()[0] or 0
        text = one("SELECT sum(length(CAST(name AS BLOB)) + length(CAST(user_id AS BLOB))) FROM runs "
                   "WHERE run_uuid IN ({marks})")
        text += one("SELECT sum(length(CAST(key AS BLOB)) + length(CAST(value AS BLOB))) FROM params "
                    "WHERE run_uuid IN ({marks})")
        text += one("SELECT sum(length(CAST(key AS BLOB)) + length(CAST(value AS BLOB))) FROM tags "
                    f"WHERE run_uuid IN ({{marks}}) AND key NOT LIKE 'm2d.%' AND key NOT IN "
                    f"({','.join(repr(k) for k in sorted(RELAYS_OWN_TAGS))})")
        text += one("SELECT sum(length(CAST(key AS BLOB))) FROM (SELECT DISTINCT run_uuid, key FROM metrics "
                    "WHERE run_uuid IN ({marks}))")
        points = one("SELECT count(*) FROM metrics WHERE run_uuid IN ({marks})")
    return text, points


def refused_over_budget(error, text_budget=BUDGET):
    assert error.error_code == "RESOURCE_LIMIT_EXCEEDED", error.message  # a 400 on the wire, not retried
    # names the budget and what is left of it
    assert f"{text_budget:,} bytes of text" in error.message and "are left" in error.message, error.message


# ---------------------------------------------------------------- unit: one place for the defaults


def test_the_gateways_defaults_are_the_relays_so_m2d_run_enforces_the_same_budget():
    serve = relay_module.parse_args(["serve", "--socket", "s", "--upstream", "http://x", "--password-file", "p",
                                     "--experiment-id", "1", "--experiment-name", "e"])
    assert (serve.text_budget, serve.metric_budget) == (DEFAULTS["MLFLOW_TEXT_BUDGET"],
                                                        DEFAULTS["MLFLOW_METRIC_BUDGET"]) == (1_000_000, 100_000)
    assert serve.upstream_rate == DEFAULTS["MLFLOW_CALLS_PER_SECOND"] / DEFAULTS["MLFLOW_JOBS_AT_ONCE"]


def test_the_batch_script_gives_the_relay_the_sites_budget_and_its_share_of_mlflow():
    script = render_job_script(_spec(Path("/srv/m2d"), mlflow_text_budget=5000, mlflow_metric_budget=70,
                                     mlflow_upstream_rate=0.5))
    assert "--text-budget 5000 --metric-budget 70" in script and "--upstream-rate 0.5" in script


def test_numbers_are_checked_as_mlflow_checks_them():
    check_integer, check_double = relay_module.check_integer, relay_module.check_double
    assert check_integer("t", 0, minimum=0) == 0 and check_integer("t", "1700000000000", minimum=0) == 1700000000000
    assert check_integer("s", -(2**63)) == -(2**63) and check_integer("s", 2**63 - 1) == 2**63 - 1
    for bad, minimum in ((-1, 0), ("-1", 0), (2**63, -(2**63)), (1.5, 0), (True, 0), ("1_000", 0), (" 5", 0)):
        with pytest.raises(relay_module.Refused):
            check_integer("t", bad, minimum=minimum)
    assert check_double("v", 0.1) == 0.1 and check_double("v", 10**300) == 1e300 and check_double("v", "2.5") == 2.5
    assert [check_double("v", v) for v in ("NaN", "Infinity", "-Infinity", 1e309)] == ["NaN", "Infinity",
                                                                                        "-Infinity", "Infinity"]
    for bad in ("nan", 10**400, None, "x", [1]):
        with pytest.raises(relay_module.Refused):
            check_double("v", bad)


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
            assert time.monotonic() - within_seconds < 5
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
    # log calls are answered by the relay and batched: not held
    run_id = client.create_run(owner.experiment_id).info.run_id
    started = time.monotonic()
    for step in range(100):
        client.log_metric(run_id, "loss", 1 / (step + 1), step=step)
    assert time.monotonic() - started < 5

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


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
