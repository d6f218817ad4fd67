"""The platform's toy sample: proves the pipeline end to end.

Logs accuracy (1.0 on iris' training set) and dataset-exists (1 when the
dataset is mounted and not empty) to MLflow, and writes a file to /mnt/export.
MLflow settings come from the environment the platform gives the job.
"""
import os

import mlflow
from sklearn.datasets import load_iris
from sklearn.tree import DecisionTreeClassifier

X, y = load_iris(return_X_y=True)
model = DecisionTreeClassifier(random_state=0).fit(X, y)
accuracy = float((model.predict(X) == y).mean())
dataset_exists = int(os.path.isdir("/mnt/dataset") and len(os.listdir("/mnt/dataset")) > 0)

mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
with mlflow.start_run():
    mlflow.log_metric("accuracy", accuracy)
    mlflow.log_metric("dataset-exists", dataset_exists)

with open("/mnt/export/result.txt", "w") as f:
    f.write(f"accuracy={accuracy}\n")
print("done: accuracy", accuracy, "dataset-exists", dataset_exists)
