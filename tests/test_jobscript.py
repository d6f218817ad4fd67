"""The batch script: what the template renders, and one real run of it.

The last test runs a rendered script under the testbed's Slurm with its
Apptainer and base image (deploy/testbed/); it fails, never skips, when they
are missing.
"""

from __future__ import annotations

import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from gateway.core import weights
from gateway.core.jobscript import log_name, render_job_script, write_job_script
from tests.helpers.batch import JOB_USER, TESTBED
from tests.helpers.batch import run_job as _run_job
from tests.helpers.batch import spec_for as _spec


def _directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines()
            if line.startswith("#SBATCH ")]


def _apptainer_argv(script: str) -> list[str]:
    """The container's command line, from the apptainer binary to main.py."""
    start = script.index(" exec \\\n  --containall")
    start = script.rindex("\n", 0, start) + 1
    line = script[start:script.index(" \\\n  &\ncontainer_pid=$!", start)].replace("\\\n", " ")
    # expand only what the job's shell would: the GPU list Slurm hands over, the run folder
    line = (line.replace("${CUDA_VISIBLE_DEVICES:-}", "0").replace("$export_img", "$run_dir/export.img")
            .replace("$run_dir", "/tmp/m2d-job-1.x"))
    return shlex.split(line)


# ================================================================ rendering

def test_directives_name_the_job_and_its_resources():
    script = render_job_script(_spec(Path("/srv/m2d"), partition="gpu", gpus=2,
                                       cpus=4, mem="16G", time="2-00:00:00"))
    assert script.startswith("#!/bin/bash\n")
    assert _directives(script) == [
        "--job-name=m2d-42",
        "--output=/srv/m2d/submissions/42/logs/slurm-%j.out",
        "--error=/srv/m2d/submissions/42/logs/slurm-%j.err",
        "--time=2-00:00:00",
        "--signal=B:USR1@60",  # time to read the export back before the limit
        "--mem=16G",
        "--cpus-per-task=4",
        "--gres=gpu:2",
        "--partition=gpu",
    ]
    # Slurm stops reading #SBATCH at the first command
    first_command = script.index("set -euo pipefail")
    assert all(script.index("#SBATCH " + d) < first_command for d in _directives(script))


def test_a_dry_run_differs_only_in_its_name_logs_binds_and_m2d_dry_run():
    root = Path("/srv/m2d")
    real = render_job_script(_spec(root))
    dry = render_job_script(_spec(root, dry_run=True, dataset_dir=root / "clam-twin",
                                  export_dir=root / "submissions" / "42" / "export-dryrun",
                                  experiment_id="8", experiment_name="alice-3-dryrun",
                                  experiment_alias="alice-3"))
    assert _directives(dry)[:3] == ["--job-name=m2d-42-dry",
                                    "--output=/srv/m2d/submissions/42/logs/dryrun-%j.out",
                                    "--error=/srv/m2d/submissions/42/logs/dryrun-%j.err"]
    argv, real_argv = _apptainer_argv(dry), _apptainer_argv(real)
    envs = [argv[i + 1] for i, a in enumerate(argv) if a == "--env"]
    assert "M2D_DRY_RUN=1" in envs and "MLFLOW_EXPERIMENT_NAME=alice-3-dryrun" in envs
    assert not [a for a in real_argv if "M2D_DRY_RUN" in a]
    binds = [argv[i + 1] for i, a in enumerate(argv) if a == "--bind"]
    assert binds[:2] == ["/srv/m2d/clam-twin:/mnt/dataset:ro", "/tmp/m2d-job-1.x/export.img:/mnt/export:image-src=/"]
    # the export image is read back into export-dryrun/, not export/
    assert 'debugfs -R "rdump / /srv/m2d/submissions/42/export-dryrun"' in dry
    assert "submissions/42/export\"" not in dry
    # the same sealing, word for word
    sealing = ["--containall", "--cleanenv", "--no-privs", "--net", "--network", "none"]
    assert argv[2:2 + len(sealing)] == real_argv[2:2 + len(sealing)] == sealing
    assert "--experiment-id 8 --experiment-name alice-3-dryrun \\\n  --experiment-alias alice-3" in dry
    assert "--experiment-alias" not in real
    assert log_name("5", "err", dry_run=True) == "dryrun-5.err"
    assert log_name("5", "err") == "slurm-5.err"


def test_no_gpus_no_gres_and_no_partition_by_default():
    directives = _directives(render_job_script(_spec(Path("/srv/m2d"), gpus=0)))
    assert not [d for d in directives if d.startswith(("--gres", "--partition"))]


def test_container_is_sealed_with_read_only_dataset_and_code_and_a_writable_export():
    argv = _apptainer_argv(render_job_script(_spec(Path("/srv/m2d"))))
    assert argv[:2] == ["apptainer", "exec"]
    sealing = ["--containall", "--cleanenv", "--no-privs", "--net", "--network", "none"]
    assert argv[2:2 + len(sealing)] == sealing
    binds = [argv[i + 1] for i, a in enumerate(argv) if a == "--bind"]
    assert binds == ["/srv/m2d/clam:/mnt/dataset:ro",
                     "/tmp/m2d-job-1.x/export.img:/mnt/export:image-src=/",
                     "/srv/m2d/submissions/42/code:/code:ro",
                     "/tmp/m2d-job-1.x:/run/m2d:ro",
                     "/tmp/m2d-job-1.x/hosts:/etc/hosts:ro"]
    envs = [argv[i + 1] for i, a in enumerate(argv) if a == "--env"]
    assert "CUDA_VISIBLE_DEVICES=0" in envs
    assert "MLFLOW_TRACKING_URI=http://mlflow.hospital.example:5000" in envs
    assert "MLFLOW_EXPERIMENT_NAME=alice-3" in envs
    assert "GIT_PYTHON_REFRESH=quiet" in envs  # mlflow 2.x's GitPython, silent without git
    # mlflow 3's telemetry thread, failing to reach its server, once broke a job's log_metric
    # (KeyError '_MLFLOW_TELEMETRY_SESSION_ID' from os.environ changing under requests)
    assert {"MLFLOW_DISABLE_TELEMETRY=true", "DO_NOT_TRACK=true"} <= set(envs)
    assert argv[argv.index("--pwd") + 1] == "/code"
    image = argv.index("/srv/m2d/images/env-0123abcd.sif")
    assert argv[image + 1:image + 3] == ["/bin/sh", "-c"]
    inside = argv[image + 3]
    assert "relay.py shim --listen 127.0.0.1:5000 --socket /run/m2d/mlflow.sock" in inside
    assert inside.endswith("exec python /code/main.py")
    assert "--nv" not in argv and "--env-file" not in argv


def test_no_credential_reaches_the_container_or_the_script():
    script = render_job_script(_spec(Path("/srv/m2d")))
    assert "MLFLOW_TRACKING_PASSWORD" not in script and "MLFLOW_TRACKING_USERNAME" not in script
    # without a job account, the relay, on the host side, reads the login from
    # a file the container never sees
    assert "--password-file /srv/m2d/submissions/42/job/mlflow.credentials" in script
    # with one, from the wrapper, which hands each job its own; no file named
    wrapped = render_job_script(_spec(Path("/srv/m2d"), credential_user="m2d"))
    assert ("sudo -n -u m2d /usr/local/libexec/m2d/m2d-slurm credential | \\\n"
            "python3 \"$run_dir/relay.py\" serve") in wrapped
    assert "--password-file - " in wrapped and "mlflow.credentials" not in wrapped
    assert "--upstream http://10.0.0.5:5001" in script
    assert "--experiment-id 7 --experiment-name alice-3" in script
    assert "/srv/m2d/submissions/42/job" not in " ".join(_apptainer_argv(script))


def test_the_relay_tags_every_run_with_the_submission_and_the_slurm_job():
    script = render_job_script(_spec(Path("/srv/m2d")))
    assert '--run-tag m2d.submission_id=42 --run-tag "m2d.slurm_job_id=${SLURM_JOB_ID:-}"' in script


def test_the_model_cache_is_bound_read_only_with_offline_settings():
    argv = _apptainer_argv(render_job_script(_spec(Path("/srv/m2d"), models_dir=Path("/srv/models"))))
    assert "/srv/models:/opt/m2d/models:ro" in argv
    envs = [argv[i + 1] for i, a in enumerate(argv) if a == "--env"]
    assert {"TORCH_HOME=/opt/m2d/models/torch", "HF_HOME=/opt/m2d/models/huggingface",
            "HF_HUB_OFFLINE=1"} <= set(envs)
    assert "/opt/m2d/models" not in render_job_script(_spec(Path("/srv/m2d")))


def test_the_mlflow_host_name_resolves_to_the_containers_loopback():
    script = render_job_script(_spec(Path("/srv/m2d")))
    assert "printf '127.0.0.1\\tlocalhost %s\\n' mlflow.hospital.example > \"$run_dir/hosts\"" in script


def test_nv_and_extra_arguments_come_before_the_image():
    spec = _spec(Path("/srv/m2d"), nv=True, apptainer="/opt/apptainer/bin/apptainer",
                 extra_apptainer_args=("--net", "--network", "none"))
    argv = _apptainer_argv(render_job_script(spec))
    assert argv[0] == "/opt/apptainer/bin/apptainer"
    image = argv.index("/srv/m2d/images/env-0123abcd.sif")
    assert argv.index("--nv") < image
    assert argv[argv.index("--net"):argv.index("--net") + 3] == ["--net", "--network", "none"]


def test_odd_paths_are_quoted_for_the_shell():
    spec = _spec(Path("/srv/m2d"), image=Path("/srv/images/it's a $(test).sif"),
                 code_dir=Path("/srv/sub 42/code"),
                 extra_apptainer_args=("--env", "X=a b;rm -rf /"))
    argv = _apptainer_argv(render_job_script(spec))
    assert "/srv/images/it's a $(test).sif" in argv
    assert "/srv/sub 42/code:/code:ro" in argv
    assert "X=a b;rm -rf /" in argv


@pytest.mark.parametrize("change", [
    {"time": "1:00:00\n#SBATCH --uid=0"},
    {"mem": "4G --exclusive"},
    {"partition": "gpu\nrm -rf /"},
    {"log_dir": Path("/srv/logs with space")},
    {"log_dir": Path("/srv/100%")},
    {"export_dir": Path('/srv/x" y')},
    {"export_max_bytes": 1000},
    {"credential_user": "m2d; id"},
    {"image": Path("relative.sif")},
    {"dataset_dir": Path("/srv/a:b")},
    {"gpus": -1},
    {"mlflow_url": "https://mlflow.example"},
    {"mlflow_url": "http://evil$(id)"},
    {"experiment_id": "7; rm -rf /"},
])
def test_values_that_could_break_the_script_are_refused(change):
    with pytest.raises(ValueError):
        _spec(Path("/srv/m2d"), **change)


def test_the_export_image_and_the_logs_carry_the_limits():
    script = render_job_script(_spec(Path("/srv/m2d"), export_max_bytes=2 * 1024**3, export_max_files=10_000,
                                     log_max_bytes=10 * 1024**2))
    assert "-N 10010" in script                                   # 10,000 files, the root and ext3's own
    kib = int(script.split('root_owner=$(id -u):$(id -g)" "$export_img" ', 1)[1].split("k", 1)[0])
    assert 2 * 1024**2 < kib < 2.05 * 1024**2                     # the limit, 1% reserve, metadata
    assert "bounded 10485760 stdout" in script and "bounded 10485760 stderr" in script
    assert "over its limit of %s" in script and "'2 GiB / 10,000 files'" in script
    assert "status=95" in script


def test_written_script_is_valid_bash(tmp_path):
    spec = _spec(tmp_path, partition="debug", nv=True,
                 extra_apptainer_args=("--env", "A=$(b) `c`"))
    path = write_job_script(spec, tmp_path / "job.sbatch")
    assert path.read_text() == render_job_script(spec)
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)


# ================================================================ a real run

MAIN_PY = r'''
import os, sys
print("hello from main.py", flush=True)
print("cwd", os.getcwd())
print("uid", os.getuid())
print("MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI"))
print("CUDA_VISIBLE_DEVICES", repr(os.environ.get("CUDA_VISIBLE_DEVICES")))
print("LEAKED", sorted(k for k in os.environ if k.startswith("M2D_TEST_") or "PASSWORD" in k))
print("dataset", sorted(os.listdir("/mnt/dataset")))
weights = os.path.join(os.environ["TORCH_HOME"], "hub", "checkpoints", "resnet18-f37072fd.pth")
print("weights", open(weights, "rb").read(), os.environ["HF_HUB_OFFLINE"])
with open("/mnt/export/x", "w") as f:
    f.write("written in the job\n")
for target in ("/mnt/dataset/evil", "relative.txt", weights):
    try:
        open(target, "w").write("no")
        print("WROTE", target)
    except OSError as e:
        print("refused", target, e.strerror, file=sys.stderr)
sys.exit(0)
'''
MODELS_IN_JOB = "/opt/m2d/models/torch/hub/checkpoints/resnet18-f37072fd.pth"


@pytest.fixture
def job_root(testbed):
    base = TESTBED / "tmp-tests"
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="batch-", dir=base))
    root.chmod(0o711)  # the job account passes through, as through DATA_DIR
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_rendered_script_runs_main_py_as_the_job_account_in_the_sealed_container(job_root, monkeypatch):
    dataset = job_root / "clam"
    dataset.mkdir()
    (dataset / "case-001.png").write_bytes(b"\x89PNG")
    monkeypatch.setenv("M2D_TEST_GATEWAY_SECRET", "must not reach the job")

    source = job_root / "resnet18.pth"
    source.write_bytes(b"weights")
    models = weights.add({"MODELS_DIR": str(job_root / "models")}, source, "torch/hub/checkpoints/resnet18-f37072fd.pth")

    info, out, err, spec = _run_job(job_root, MAIN_PY, gpus=1, models_dir=job_root / "models")

    assert (info.state, info.exit_code) == ("COMPLETED", 0), out + err
    assert "hello from main.py" in out
    assert "cwd /code" in out
    assert f"uid {pwd.getpwnam(JOB_USER).pw_uid}" in out
    assert "MLFLOW_TRACKING_URI http://127.0.0.1:5999" in out
    assert re.search(r"CUDA_VISIBLE_DEVICES '\d'", out)  # the fake GPU Slurm gave (one of the node's)
    assert "LEAKED []" in out                          # --cleanenv, minimal sbatch env
    assert "dataset ['case-001.png']" in out
    assert "WROTE" not in out
    assert "refused /mnt/dataset/evil Read-only file system" in err
    assert "refused relative.txt Read-only file system" in err
    assert "weights b'weights' 1" in out                  # the model cache, offline
    assert f"refused {MODELS_IN_JOB} Read-only file system" in err
    assert models.read_bytes() == b"weights"
    assert f"m2d: submission 42, job {info.job_id}" in err
    assert (spec.export_dir / "x").read_text() == "written in the job\n"
    assert sorted(p.name for p in dataset.iterdir()) == ["case-001.png"]


def test_exit_code_of_main_py_is_the_job_exit_code(job_root):
    # as a dry run: M2D_DRY_RUN=1 is the one difference the code sees
    main_py = ("import os, sys\n"
               "print('gpus', repr(os.environ.get('CUDA_VISIBLE_DEVICES')))\n"
               "print('dry run', repr(os.environ.get('M2D_DRY_RUN')))\n"
               "sys.exit(3)\n")
    info, out, err, _ = _run_job(job_root, main_py, gpus=0, dry_run=True)
    assert (info.state, info.exit_code) == ("FAILED", 3), out + err
    assert "gpus ''" in out    # no GPU asked for, none given
    assert "dry run '1'" in out
    assert "(dry run on the synthetic twin)" in err
