"""What the hospital's samples do with MLflow, for every client version a researcher
may pin (tests/test_mlflow_clients.py fills in the three lines below as the
hospital's instructions say: the MLflow username and password from the account
page, the tracking URL)."""
import os
import sys

import mlflow

username = ""
password = ""
tracking_uri = ""

os.environ["MLFLOW_TRACKING_USERNAME"] = username
os.environ["MLFLOW_TRACKING_PASSWORD"] = password
mlflow.set_tracking_uri(tracking_uri)
mlflow.set_experiment(username)
python = f"{sys.version_info[0]}.{sys.version_info[1]}"

# start_run() without `with`, ended by end_run()
mlflow.start_run()
mlflow.log_params({"client": mlflow.__version__, "python": python, "form": "start_run"})
for epoch in range(3):
    mlflow.log_metrics({"train_loss": 1.0 / (epoch + 1), "train_acc": 0.5 + 0.1 * epoch}, step=epoch)
mlflow.log_metrics({"test_auc": 0.75})  # without step
mlflow.end_run()

# the `with` form
with mlflow.start_run():
    mlflow.log_params({"client": mlflow.__version__, "python": python, "form": "with"})
    mlflow.log_metrics({"train_loss": 0.25}, step=0)
    mlflow.log_metrics({"test_auc": 0.5})

print(f"m2d client matrix: mlflow {mlflow.__version__} on Python {python} logged both runs")
