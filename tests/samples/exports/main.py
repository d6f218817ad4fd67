"""Writes several files to /mnt/export for the airlock's tests: a 3 MiB
"model" (bytes anyone can recompute: model_bytes below), metrics (JSON) and
predictions (CSV, the kind a reviewer rejects), and logs one MLflow run."""
import hashlib
import json
import os

import mlflow

MODEL_BLOCKS = 3 * 1024 * 1024 // 32


def model_bytes() -> bytes:
    return b"".join(hashlib.sha256(b"block %d" % i).digest() for i in range(MODEL_BLOCKS))


mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
with mlflow.start_run():
    mlflow.log_metric("accuracy", 0.93)

with open("/mnt/export/model.bin", "wb") as f:
    f.write(model_bytes())
with open("/mnt/export/metrics.json", "w") as f:
    json.dump({"accuracy": 0.93, "auc": 0.97}, f)
with open("/mnt/export/predictions.csv", "w") as f:
    f.write("patient_id,prediction\n")
    f.writelines(f"P{i:04d},{i % 2}\n" for i in range(20))
print("done", flush=True)
