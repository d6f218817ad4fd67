"""The hospital's CLaM sample (m2d/samples/clam-classic: Python 3.9, mlflow==2.11.3,
torch==1.13.0, numpy==1.22.4, resnet18(weights=ResNet18_Weights.DEFAULT), its
stdout and stderr redirected into /mnt/export, mlflow.set_experiment(username)),
filled in as its instructions say and followed through `m2d submit` and
`m2d wait`: the dry run on the twin, the real run, the metrics read back from
MLflow. The heaviest test of the suite (two tiny epochs on the CPU).

Its environment image (2 GB: torch 1.13 brings CUDA 11.7's libraries) is built once
per base image and requirements, as for any submission; the module builds it
first, to make the resnet18 weights file the site's cache needs (`flask weights
add`): torchvision's own resnet18 state dict with random values, under the name of
the ImageNet file, since this machine cannot download the real one."""
import json
import subprocess
import sys

import pytest

from .helpers.client import m2d_as as m2d
from .helpers.experiments import metric_history, runs_in
from .helpers.stack import AS_GATEWAY, REPO, Stack

SAMPLE = REPO / "m2d" / "samples" / "clam-classic"
WEIGHTS_NAME = "torch/hub/checkpoints/resnet18-f37072fd.pth"  # ResNet18_Weights.IMAGENET1K_V1's file

ENSURE_IMAGE = """
import sys
from flask import Flask
from gateway.adapters.apptainer import ImageBuilder
from gateway.config import load
app = Flask("test")
load(app)
print(ImageBuilder.from_config(app.config).ensure(sys.stdin.read(), sys.argv[1]).path)
"""


@pytest.fixture(scope="module")
def site(testbed):
    """The gateway with a weights cache of its own (MODELS_DIR), holding resnet18's file."""
    stack = Stack()
    stack.env["M2D_MODELS_DIR"] = str(stack.root / "models")
    try:
        stack.start()
        image = subprocess.run([*AS_GATEWAY, sys.executable, "-c", ENSURE_IMAGE, "3.9"], cwd=REPO, env=stack.env,
                               input=(SAMPLE / "requirements.txt").read_text(), capture_output=True, text=True,
                               timeout=1800)
        assert image.returncode == 0, image.stderr[-3000:]
        made = stack.root / "weights"
        made.mkdir(mode=0o755)
        script = "import torch, torchvision; torch.save(torchvision.models.resnet18().state_dict(), '/out/w.pth')"
        done = subprocess.run([testbed["apptainer"], "exec", "--containall", "--bind", f"{made}:/out",
                               image.stdout.strip().splitlines()[-1], "python", "-c", script],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        (made / "w.pth").chmod(0o644)
        stack.flask("weights", "add", str(made / "w.pth"), "--as", WEIGHTS_NAME)
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def researcher(site):
    return site.researcher("classic")


def filled_in(folder, account):
    """The sample as a researcher submits it: the four lines its instructions name,
    filled in from the account page (and "cpu": the testbed has no GPU)."""
    main = (SAMPLE / "main.py").read_text()
    values = {"username": account["username"], "password": account["password"],
              "tracking_uri": account["tracking_uri"], "device": "cpu"}
    for name, value in values.items():
        [line] = [line for line in main.splitlines() if line.startswith(f"{name} = ")]
        main = main.replace(line, f"{name} = {value!r}")
    folder.mkdir()
    (folder / "main.py").write_text(main)
    for name in ("requirements.txt", ".python-version"):
        (folder / name).write_text((SAMPLE / name).read_text())
    return folder


def test_the_hospitals_clam_sample_runs_unchanged_dry_run_then_real_run(researcher, tmp_path):
    account = researcher.me()["mlflow"]
    submitted = m2d(researcher, "submit", filled_in(tmp_path / "clam-classic", account), "--json")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    submission_id = json.loads(submitted.stdout)["id"]
    waited = m2d(researcher, "wait", submission_id, "--timeout", 2400, timeout=2460)
    result = researcher.submission(submission_id)
    dry = result["dry_run"] or {}
    export = {f["path"]: f for f in dry.get("export", [])}
    assert waited.returncode == 0 and result["status"] == "completed", (
        result["status"], result["error"], dry.get("log", "")[-2000:],
        (export.get("error.txt") or {}).get("text", "")[-3000:])
    assert [e["status"] for e in result["events"]] == [
        "received", "building", "dry_run_queued", "dry_run_running", "dry_run_passed",
        "queued", "running", "completed"]

    # The dry run: its printed output is in its own out.txt, in the dry run's export,
    # which its owner sees whole; the job's log has none of GitPython's warning.
    assert dry["exit_code"] == 0
    out = export["out.txt"]["text"]
    assert "epoch 2/2: train loss" in out and "test: {'test_auc'" in out and out.rstrip().endswith("done"), out
    assert {"out.txt", "error.txt", "model.tar", "results.xlsx"} <= set(export)
    assert "Bad git executable" not in dry["log"]

    # The metrics, in the owner's experiment (real run) and "-dryrun" (the twin), named
    # by mlflow.set_experiment(username): two epochs' training loss and the test AUC.
    for experiment in (account["experiment_name"], account["experiment_name"] + "-dryrun"):
        [(run_id, metrics)] = runs_in(experiment)
        assert sorted(metric_history(run_id, "train_loss")) == [0, 1], experiment
        assert 0 <= metrics["test_auc"] <= 1 and 0 <= metrics["test_acc"] <= 1, (experiment, metrics)

    exported = m2d(researcher, "export", submission_id, "--json")
    assert exported.returncode == 0, exported.stderr
    listing = json.loads(exported.stdout)  # the real export: counted for its owner, named once released
    assert listing["file_count"] >= 4 and listing["files"] == []
