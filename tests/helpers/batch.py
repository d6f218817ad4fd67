"""A batch script rendered, submitted through the wrapper as the gateway
does, and waited for: what tests/test_jobscript.py and test_job_limits.py run."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from gateway.adapters.slurm.cli_scheduler import CliScheduler
from gateway.core.jobscript import RELAY_SOURCE, JobSpec, log_name, write_job_script

TESTBED = Path(os.environ.get("M2D_TESTBED_DIR", "/opt/testbed"))
APPTAINER = TESTBED / "apptainer" / "bin" / "apptainer"
BASE_IMAGE = TESTBED / "images" / "base.sif"
JOB_USER = "m2d-job"  # made by deploy/testbed/accounts.sh
GATEWAY_USER = "m2d"


def spec_for(root: Path, **kw) -> JobSpec:
    values = dict(
        submission_id=42,
        image=root / "images" / "env-0123abcd.sif",
        code_dir=root / "submissions" / "42" / "code",
        dataset_dir=root / "clam",
        export_dir=root / "submissions" / "42" / "export",
        log_dir=root / "submissions" / "42" / "logs",
        relay=root / "submissions" / "42" / "job" / "relay.py",
        credentials=root / "submissions" / "42" / "job" / "mlflow.credentials",
        mlflow_upstream="http://10.0.0.5:5001",
        mlflow_url="http://mlflow.hospital.example:5000",
        experiment_id="7", experiment_name="alice-3",
    )
    values.update(kw)
    return JobSpec(**values)


def for_the_job(path: Path, mode: int) -> None:
    """As gateway.core.storage gives a submission's folders: group of the job account."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.chown(path, group=JOB_USER)
    path.chmod(mode)


def run_job(root: Path, main_py: str, **kw):
    """Render, submit as the job account and wait for one job; return (JobInfo, stdout, stderr, spec)."""
    kw.setdefault("credential_user", GATEWAY_USER)
    kw.setdefault("time", "00:05:00")
    spec = spec_for(root, image=BASE_IMAGE, apptainer=str(APPTAINER), cpus=1,
                 mem="512M", mlflow_url="http://127.0.0.1:5999",
                 mlflow_upstream="http://127.0.0.1:5999", **kw)
    for path in (root / "submissions", root / "submissions" / "42"):
        path.mkdir(exist_ok=True)
        path.chmod(0o711)
    for path, mode in ((spec.code_dir, 0o2750), (spec.relay.parent, 0o2750),
                       (spec.export_dir, 0o2770), (spec.log_dir, 0o2770)):
        for_the_job(path, mode)
    spec.dataset_dir.mkdir(exist_ok=True)
    (spec.code_dir / "main.py").write_text(main_py)
    shutil.copy(RELAY_SOURCE, spec.relay)
    spec.credentials.write_text("nobody\nnot-a-password\n")
    spec.credentials.chmod(0o600)  # the gateway's alone: the job gets it from the wrapper
    shutil.chown(spec.credentials, GATEWAY_USER, GATEWAY_USER)
    script = write_job_script(spec, spec.relay.parent / ("dryrun.sbatch" if spec.dry_run else "job.sbatch"))
    sched = CliScheduler(env={"SLURM_CONF": os.environ["SLURM_CONF"]}, job_user=JOB_USER)
    job = sched.submit(script, spec.job_name)
    deadline = time.monotonic() + 240  # a TIMEOUT job: its limit and Slurm's check interval
    while True:
        info = sched.statuses([job]).get(job)
        if info and info.finished:
            break
        assert time.monotonic() < deadline, f"job {job} not finished: {info}"
        time.sleep(0.5)
    out = (spec.log_dir / log_name(job, "out", spec.dry_run)).read_text()
    err = (spec.log_dir / log_name(job, "err", spec.dry_run)).read_text()
    return info, out, err, spec
