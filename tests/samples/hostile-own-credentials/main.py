"""A submission written the way the hospital's public sample tells researchers to:
it sets the MLflow URL and a username and password itself (here a wrong one),
and names the experiment like the MLflow username. The platform must still
record its metrics in the owner's experiment, without the code knowing the
owner's password. The test fills in OWNER and the URL."""
import os

import mlflow

MLFLOW_URL = "http://127.0.0.1:5001"  # the platform's MLflow address
MLFLOW_USERNAME = "OWNER"  # copied from the account page
os.environ["MLFLOW_TRACKING_USERNAME"] = "someone"
os.environ["MLFLOW_TRACKING_PASSWORD"] = "wrong"

mlflow.set_tracking_uri(MLFLOW_URL)
mlflow.set_experiment(MLFLOW_USERNAME)
with mlflow.start_run():
    mlflow.log_param("style", "hospital-sample")
    for epoch in range(3):
        mlflow.log_metrics({"accuracy": 0.5 + epoch / 4, "loss": 1.0 / (epoch + 1)}, step=epoch)
print("done")
