"""The batch script: what the template renders, and one real run of it.

The last test runs a rendered script under the testbed's Slurm with its
Apptainer and base image (deploy/testbed/); it fails, never skips, when they
are missing.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from gateway.adapters.slurm.cli import CliScheduler
from jobs.jobscript import JobSpec, render_job_script, write_env_file, write_job_script

TESTBED = Path(os.environ.get("M2D_TESTBED_DIR", "/opt/testbed"))
APPTAINER = TESTBED / "apptainer" / "bin" / "apptainer"
BASE_IMAGE = TESTBED / "images" / "base.sif"


def _spec(root: Path, **kw) -> JobSpec:
    values = dict(
        submission_id=42,
        image=root / "images" / "env-0123abcd.sif",
        code_dir=root / "submissions" / "42" / "code",
        dataset_dir=root / "clam",
        export_dir=root / "submissions" / "42" / "export",
        log_dir=root / "submissions" / "42" / "logs",
        env_file=root / "submissions" / "42" / "job.env",
    )
    values.update(kw)
    return JobSpec(**values)


def _directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines()
            if line.startswith("#SBATCH ")]


def _apptainer_argv(script: str) -> list[str]:
    exec_line = script[script.index("exec "):].replace("\\\n", " ")
    # expand only what the job's shell would: the GPU list Slurm hands over
    return shlex.split(exec_line.replace("${CUDA_VISIBLE_DEVICES:-}", "0"))[1:]


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
        "--mem=16G",
        "--cpus-per-task=4",
        "--gres=gpu:2",
        "--partition=gpu",
    ]
    # Slurm stops reading #SBATCH at the first command
    first_command = script.index("set -euo pipefail")
    assert all(script.index("#SBATCH " + d) < first_command for d in _directives(script))


def test_no_gpus_no_gres_and_no_partition_by_default():
    directives = _directives(render_job_script(_spec(Path("/srv/m2d"), gpus=0)))
    assert not [d for d in directives if d.startswith(("--gres", "--partition"))]


def test_container_gets_read_only_dataset_and_code_and_a_writable_export():
    argv = _apptainer_argv(render_job_script(_spec(Path("/srv/m2d"))))
    assert argv[:3] == ["apptainer", "exec", "--containall"]
    assert "--cleanenv" in argv
    binds = [argv[i + 1] for i, a in enumerate(argv) if a == "--bind"]
    assert binds == ["/srv/m2d/clam:/mnt/dataset:ro",
                     "/srv/m2d/submissions/42/export:/mnt/export",
                     "/srv/m2d/submissions/42/code:/code:ro"]
    assert argv[argv.index("--env-file") + 1] == "/srv/m2d/submissions/42/job.env"
    assert "CUDA_VISIBLE_DEVICES=0" in argv
    assert argv[argv.index("--pwd") + 1] == "/code"
    assert argv[-3:] == ["/srv/m2d/images/env-0123abcd.sif", "python", "/code/main.py"]
    assert "--nv" not in argv


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
    {"image": Path("relative.sif")},
    {"dataset_dir": Path("/srv/a:b")},
    {"gpus": -1},
])
def test_values_that_could_break_the_script_are_refused(change):
    with pytest.raises(ValueError):
        _spec(Path("/srv/m2d"), **change)


def test_written_script_is_valid_bash(tmp_path):
    spec = _spec(tmp_path, partition="debug", nv=True,
                 extra_apptainer_args=("--env", "A=$(b) `c`"))
    path = write_job_script(spec, tmp_path / "job.sbatch")
    assert path.read_text() == render_job_script(spec)
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)


def test_env_file_is_private_and_survives_apptainer_quoting(tmp_path):
    path = write_env_file(tmp_path / "job.env", {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        "MLFLOW_TRACKING_PASSWORD": "p$$w`id`'\"\\x",
    })
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text().splitlines()[0] == "MLFLOW_TRACKING_URI=http://127.0.0.1:5000"
    with pytest.raises(ValueError):
        write_env_file(tmp_path / "bad.env", {"A-B": "x"})
    with pytest.raises(ValueError):
        write_env_file(tmp_path / "bad.env", {"A": "x\nB=y"})


# ================================================================ a real run

MAIN_PY = r'''
import os, sys
print("hello from main.py", flush=True)
print("cwd", os.getcwd())
print("MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI"))
print("PASSWORD_OK", os.environ.get("MLFLOW_TRACKING_PASSWORD", "").encode().hex()
      == open("/code/expected.hex").read().strip())
print("CUDA_VISIBLE_DEVICES", repr(os.environ.get("CUDA_VISIBLE_DEVICES")))
print("LEAKED", sorted(k for k in os.environ if k.startswith("M2D_TEST_")))
print("dataset", sorted(os.listdir("/mnt/dataset")))
with open("/mnt/export/x", "w") as f:
    f.write("written in the job\n")
for target in ("/mnt/dataset/evil", "relative.txt"):
    try:
        open(target, "w").write("no")
        print("WROTE", target)
    except OSError as e:
        print("refused", target, e.strerror, file=sys.stderr)
sys.exit(0)
'''


def _need_testbed():
    missing = [p for p in (APPTAINER, BASE_IMAGE) if not p.exists()]
    conf = os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf"
    if not os.path.exists(conf):
        missing.append(Path(conf))
    if missing:
        pytest.fail("the testbed is not there: missing " + ", ".join(map(str, missing))
                    + ". Run deploy/testbed/ and `set -a; . /opt/testbed/gateway.env; set +a`.")
    return conf


@pytest.fixture
def job_root(testbed):
    base = TESTBED / "tmp-tests" if TESTBED.is_dir() else Path("/tmp")
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="batch-", dir=base))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _run_job(root: Path, main_py: str, env: dict[str, str], **kw):
    """Render, submit and wait for one job; return (JobInfo, stdout, stderr, spec)."""
    conf = _need_testbed()
    spec = _spec(root, image=BASE_IMAGE, apptainer=str(APPTAINER), cpus=1,
                 mem="512M", time="00:05:00", **kw)
    for d in (spec.code_dir, spec.dataset_dir, spec.export_dir, spec.log_dir):
        d.mkdir(parents=True, exist_ok=True)
    (spec.code_dir / "main.py").write_text(main_py)
    write_env_file(spec.env_file, env)
    script = write_job_script(spec, spec.log_dir.parent / "job.sbatch")
    sched = CliScheduler(env={"SLURM_CONF": conf})
    job = sched.submit(script, spec.job_name)
    deadline = time.monotonic() + 120
    while True:
        info = sched.statuses([job]).get(job)
        if info and info.finished:
            break
        assert time.monotonic() < deadline, f"job {job} not finished: {info}"
        time.sleep(0.5)
    out = (spec.log_dir / f"slurm-{job}.out").read_text()
    err = (spec.log_dir / f"slurm-{job}.err").read_text()
    return info, out, err, spec


def test_rendered_script_runs_main_py_under_slurm_in_the_container(job_root, monkeypatch):
    password = "s3cret $$ `id` 'q' \"dq\" \\"
    dataset = job_root / "clam"
    dataset.mkdir()
    (dataset / "case-001.png").write_bytes(b"\x89PNG")
    (job_root / "submissions" / "42" / "code").mkdir(parents=True)
    (job_root / "submissions" / "42" / "code" / "expected.hex").write_text(password.encode().hex())
    monkeypatch.setenv("M2D_TEST_GATEWAY_SECRET", "must not reach the job")

    info, out, err, spec = _run_job(job_root, MAIN_PY, {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5999",
        "MLFLOW_TRACKING_PASSWORD": password,
        "MLFLOW_EXPERIMENT_NAME": "m2d-test"}, gpus=1)

    assert (info.state, info.exit_code) == ("COMPLETED", 0), out + err
    assert "hello from main.py" in out
    assert "cwd /code" in out
    assert "MLFLOW_TRACKING_URI http://127.0.0.1:5999" in out
    assert "PASSWORD_OK True" in out
    assert "CUDA_VISIBLE_DEVICES '0'" in out          # the fake GPU Slurm gave
    assert "LEAKED []" in out                          # --cleanenv, minimal sbatch env
    assert "dataset ['case-001.png']" in out
    assert "WROTE" not in out
    assert "refused /mnt/dataset/evil Read-only file system" in err
    assert "refused relative.txt Read-only file system" in err
    assert f"m2d: submission 42, job {info.job_id}" in err
    assert (spec.export_dir / "x").read_text() == "written in the job\n"
    assert sorted(p.name for p in dataset.iterdir()) == ["case-001.png"]


def test_exit_code_of_main_py_is_the_job_exit_code(job_root):
    main_py = ("import os, sys\n"
               "print('gpus', repr(os.environ.get('CUDA_VISIBLE_DEVICES')))\n"
               "sys.exit(3)\n")
    info, out, err, _ = _run_job(job_root, main_py, {"MLFLOW_TRACKING_URI": "http://x"},
                                 gpus=0)
    assert (info.state, info.exit_code) == ("FAILED", 3), out + err
    assert "gpus ''" in out    # no GPU asked for, none given
