"""The MLflow clients researchers pin, on the Pythons the platform offers, doing what
the hospital's samples do (tests/samples/mlflow-client/main.py: tracking URL,
own username and password in the environment, set_experiment(username),
start_run() without `with`, log_params, log_metrics with and without step,
end_run, and the `with start_run()` form), through the real stack: the relay in
a dry run on the twin and in the real run, read back from MLflow.

One submission per (client, Python), all submitted at once; each is its own
environment image (keyed by requirements.txt and Python), built once and reused
by later sessions. mlflow-skinny: the client alone, what a job needs to log
(the full mlflow 2.11.3 the hospital pins runs in tests/test_clam_classic.py)."""
import os
import re

import pytest
import requests

from .helpers.stack import SAMPLES, zip_folder

# (mlflow-skinny version, Python): 2.0 era, the hospital's 2.11.3, the last 2.x,
# and the 3.x the platform's own tests pin; each Python of the platform's bases
# at least once, each client on a Python it supports (3.x needs 3.10 or later).
CLIENTS = [("2.0.1", "3.9"), ("2.11.3", "3.9"), ("2.22.5", "3.13"), ("3.17.2", "3.11")]
FINAL = {"completed", "failed", "build_failed", "dry_run_failed", "cancelled"}
SAMPLE = SAMPLES / "mlflow-client"


def requirements(version):
    return f"mlflow-skinny=={version}\n"


def filled_in(main, account):
    """main.py with the account page's three values, as a researcher fills them in."""
    for name in ("username", "password", "tracking_uri"):
        line = f'{name} = ""\n'
        assert line in main
        main = main.replace(line, f"{name} = {account[name]!r}\n")
    return main


@pytest.fixture(scope="module")
def researcher(stack):
    return stack.researcher("clients")


@pytest.fixture(scope="module")
def finished(researcher, tmp_path_factory):
    """Every client's submission, submitted at once and followed to the end."""
    folder = tmp_path_factory.mktemp("clients")
    main = filled_in((SAMPLE / "main.py").read_text(), researcher.me()["mlflow"])
    ids = {}
    for version, python in CLIENTS:
        ids[version] = researcher.submit(zip_folder(SAMPLE, folder / f"mlflow-{version}.zip", extra={
            "main.py": main, "requirements.txt": requirements(version), ".python-version": f"{python}\n"}))
    return {version: researcher.wait_until(sid, FINAL, timeout=2400) for version, sid in ids.items()}


def _admin():
    return os.environ.get("M2D_MLFLOW_ADMIN_USERNAME", "admin"), os.environ["M2D_MLFLOW_ADMIN_PASSWORD"]


def runs_of(experiment_name, client):
    """{form: (status, params, metrics)} of the runs ``client`` made in the experiment."""
    url = os.environ["M2D_MLFLOW_URL"]
    found = requests.get(f"{url}/api/2.0/mlflow/experiments/get-by-name", auth=_admin(), timeout=30,
                         params={"experiment_name": experiment_name})
    found.raise_for_status()
    answer = requests.post(f"{url}/api/2.0/mlflow/runs/search", auth=_admin(), timeout=30, json={
        "experiment_ids": [found.json()["experiment"]["experiment_id"]],
        "filter": f"params.client = '{client}'", "max_results": 100})
    answer.raise_for_status()
    runs = {}
    for run in answer.json().get("runs", []):
        data = run["data"]
        params = {p["key"]: p["value"] for p in data.get("params", [])}
        history = requests.get(f"{url}/api/2.0/mlflow/metrics/get-history", auth=_admin(), timeout=30,
                               params={"run_id": run["info"]["run_id"], "metric_key": "train_loss"})
        history.raise_for_status()
        runs[params["form"]] = (run["info"]["status"], params,
                                {m["key"]: m["value"] for m in data.get("metrics", [])},
                                sorted((m["step"], m["value"]) for m in history.json().get("metrics", [])))
    return runs


@pytest.mark.parametrize("version,python", CLIENTS, ids=[f"mlflow-{v}-py{p}" for v, p in CLIENTS])
def test_the_client_logs_the_hospitals_way_in_the_dry_run_and_the_real_run(researcher, finished, version, python):
    result = finished[version]
    assert result["status"] == "completed", (result["status"], result["error"],
                                             (result["dry_run"] or {}).get("log", "")[-3000:])
    dry_log = result["dry_run"]["log"]
    assert f"m2d client matrix: mlflow {version} on Python {python} logged both runs" in dry_log
    # GIT_PYTHON_REFRESH=quiet: mlflow 2.x's GitPython says nothing about a missing git
    assert "Bad git executable" not in dry_log and "GIT_PYTHON_REFRESH" not in dry_log
    # no call of this client was refused by the relay
    assert not re.search(r"refused (GET|POST)", dry_log), dry_log[-3000:]

    experiment = researcher.me()["mlflow"]["experiment_name"]
    for name in (experiment + "-dryrun", experiment):
        runs = runs_of(name, version)
        assert set(runs) == {"start_run", "with"}, (name, runs)
        status, params, metrics, loss = runs["start_run"]
        assert status == "FINISHED" and params["python"] == python, (name, runs)
        assert loss == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))], name
        assert metrics["test_auc"] == 0.75 and metrics["train_acc"] == pytest.approx(0.7), name
        status, params, metrics, loss = runs["with"]
        assert status == "FINISHED" and loss == [(0, 0.25)] and metrics["test_auc"] == 0.5, (name, runs)
