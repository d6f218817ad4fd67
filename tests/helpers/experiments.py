"""What reached MLflow: runs and metric histories read with the admin's login."""
import os

import requests


def _admin():
    return os.environ.get("M2D_MLFLOW_ADMIN_USERNAME", "admin"), os.environ["M2D_MLFLOW_ADMIN_PASSWORD"]


def metrics_in(experiment_name):
    """The metrics of every run in ``experiment_name``, read with the admin's login."""
    return [metrics for _, metrics in runs_in(experiment_name)]


def metric_history(run_id, key):
    """Every value logged for ``key`` in run ``run_id``, by step (MLflow's REST API, the admin's login)."""
    answer = requests.get(f"{os.environ['M2D_MLFLOW_URL']}/api/2.0/mlflow/metrics/get-history", auth=_admin(),
                          params={"run_id": run_id, "metric_key": key}, timeout=30)
    answer.raise_for_status()
    return {m["step"]: m["value"] for m in answer.json().get("metrics", [])}


def runs_in(experiment_name):
    """(run id, {metric: last value}) of every run in ``experiment_name``."""
    url = os.environ["M2D_MLFLOW_URL"]
    found = requests.get(f"{url}/api/2.0/mlflow/experiments/get-by-name", auth=_admin(), timeout=30,
                         params={"experiment_name": experiment_name})
    found.raise_for_status()
    runs = requests.post(f"{url}/api/2.0/mlflow/runs/search", auth=_admin(), timeout=30,
                         json={"experiment_ids": [found.json()["experiment"]["experiment_id"]]})
    runs.raise_for_status()
    return [(run["info"]["run_id"], {m["key"]: m["value"] for m in run["data"].get("metrics", [])})
            for run in runs.json().get("runs", [])]
