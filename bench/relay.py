"""What a job's `mlflow.log_metric` costs, straight to MLflow and through the relay.

    set -a; . /opt/testbed/gateway.env; set +a
    .venv/bin/python -m bench.relay [N]

Provisions a throwaway MLflow user, starts a relay and a shim (singularity/relay.py) as a job
has them, and times N (default 200) `mlflow.log_metric` calls each way, then how long
the relay takes to hand the buffered values to MLflow: a `get_run` (which sends the
run's buffer first) and the background sender (polling MLflow until all N are there).
MLflow's basic-auth server hashes the password on every request, which is most of the
direct figure.
"""
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import mlflow
import requests
from mlflow import MlflowClient

from gateway.adapters.mlflow import MlflowAdmin
from tests.helpers.relay import API, RelayProcesses


def percentiles(seconds):
    ms = sorted(s * 1000 for s in seconds)
    return statistics.median(ms), ms[max(0, round(0.95 * len(ms)) - 1)]


def time_log_metric(count):
    durations = []
    with mlflow.start_run():
        for step in range(count):
            started = time.perf_counter()
            mlflow.log_metric("loss", 1 / (step + 1), step=step)
            durations.append(time.perf_counter() - started)
    return durations


def logged_count(url, admin, run_id):
    history = requests.get(f"{url}{API}/metrics/get-history", params={"run_id": run_id, "metric_key": "loss"},
                           auth=admin, timeout=30).json()
    return len(history.get("metrics", []))


def main(count):
    url = os.environ["M2D_MLFLOW_URL"].rstrip("/")
    admin = (os.environ["M2D_MLFLOW_ADMIN_USERNAME"], os.environ["M2D_MLFLOW_ADMIN_PASSWORD"])
    account = MlflowAdmin(url, *admin).provision(f"m2d-relay-bench-{uuid.uuid4().hex[:8]}")
    os.environ["MLFLOW_EXPERIMENT_NAME"] = account.experiment_name
    with tempfile.TemporaryDirectory() as folder:
        relay = RelayProcesses(Path(folder) / "job", account, url)
        try:
            # Straight to MLflow, with the owner's credentials, as jobs did before the relay.
            os.environ.update(MLFLOW_TRACKING_USERNAME=account.username, MLFLOW_TRACKING_PASSWORD=account.password)
            mlflow.set_tracking_uri(url)
            direct = time_log_metric(count)

            # Through shim and relay, without credentials, as a sealed job does.
            del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
            mlflow.set_tracking_uri(relay.url)
            with mlflow.start_run() as run:
                through = []
                for step in range(count):
                    started = time.perf_counter()
                    mlflow.log_metric("loss", 1 / (step + 1), step=step)
                    through.append(time.perf_counter() - started)
                # The background sender alone: until MLflow has all of them.
                started = time.perf_counter()
                while logged_count(url, admin, run.info.run_id) < count:
                    time.sleep(0.02)
                background_s = time.perf_counter() - started

            # A read of the run sends its buffer first: the cost of that.
            with mlflow.start_run() as run:
                for step in range(count):
                    mlflow.log_metric("loss", 1 / (step + 1), step=step)
                started = time.perf_counter()
                MlflowClient().get_run(run.info.run_id)
                get_run_s = time.perf_counter() - started
            assert logged_count(url, admin, run.info.run_id) == count
        finally:
            relay.stop()
            requests.delete(f"{url}{API}/users/delete", json={"username": account.username}, auth=admin, timeout=10)
            requests.post(f"{url}{API}/experiments/delete", json={"experiment_id": account.experiment_id},
                          auth=admin, timeout=10)

    print(f"mlflow.log_metric, {count} calls      p50 ms   p95 ms")
    for name, durations in (("direct to MLflow", direct), ("through shim + relay", through)):
        p50, p95 = percentiles(durations)
        print(f"  {name:<30} {p50:7.1f}  {p95:7.1f}")
    print(f"get_run through the relay, sending {count} buffered values first: {get_run_s * 1000:.0f} ms")
    print(f"background sender: from the last log_metric until all {count} are in MLflow: "
          f"{background_s * 1000:.0f} ms (sends every second; includes the admin's polling reads)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
