"""The order of deploy/libexec/m2d-slurm's Slurm calls when it submits, with stand-in
commands that note their arguments (the installed wrapper against the real Slurm:
tests/test_job_limits.py)."""
import getpass
import types
from pathlib import Path

import pytest

WRAPPER = Path(__file__).resolve().parents[1] / "deploy" / "libexec" / "m2d-slurm"


def load_wrapper(tmp_path, release_fails=False):
    """The wrapper's code with its Slurm commands replaced by scripts that append
    their arguments to ``calls`` (sbatch answers job id 42)."""
    calls = tmp_path / "calls"
    commands = {}
    for name, answer, status in (("sbatch", "42", 0), ("scontrol", "", 0), ("scancel", "", 0)):
        script = tmp_path / name
        release = 'case "$1" in release) exit 1;; esac\n' if name == "scontrol" and release_fails else ""
        script.write_text(f'#!/bin/sh\necho {name} "$@" >> {calls}\n{release}echo {answer}\nexit {status}\n')
        script.chmod(0o755)
        commands[name] = str(script)
    me = getpass.getuser()  # the gateway's and the job's account alike: no user switch
    source = (WRAPPER.read_text().replace("@GATEWAY_USER@", me).replace("@JOB_USER@", me)
              .replace("@SBATCH@", commands["sbatch"]).replace("@SCANCEL@", commands["scancel"])
              .replace("@SCONTROL@", commands["scontrol"]).replace("@SLURM_CONF@", "")
              .replace("@CLAIM_DIR@", str(tmp_path / "claims")))
    module = types.ModuleType("m2d_slurm")
    exec(compile(source, str(WRAPPER), "exec"), module.__dict__)
    return module, calls


def batch_script(tmp_path, kind):
    job = tmp_path / "data" / "submissions" / "7" / "job"
    job.mkdir(parents=True)
    for folder in (tmp_path / "data", tmp_path / "data" / "submissions", job.parent, job):
        folder.chmod(0o755)
    script = job / f"{kind}.sbatch"
    script.write_text("#!/bin/bash\ntrue\n")
    script.chmod(0o644)
    (job / "mlflow.credentials").write_text("alice\nsecret\n")
    (job / "mlflow.credentials").chmod(0o600)
    return script


@pytest.mark.parametrize("kind, name", [("job", "m2dtest-7"), ("dryrun", "m2dtest-7-dry")])
def test_a_training_job_is_held_until_its_credentials_are_recorded(tmp_path, capsys, kind, name):
    """Submitted free, a job on a free node started before its AdminComment was set, its
    relay was refused the owner's login and it failed at once (exit 90)."""
    wrapper, calls = load_wrapper(tmp_path)
    script = batch_script(tmp_path, kind)
    assert wrapper.submit(str(script), name) == 0
    assert capsys.readouterr().out.strip() == "42"
    sbatch, record, release = calls.read_text().splitlines()
    assert sbatch.startswith("sbatch ") and " --hold " in f"{sbatch} "
    assert record == f"scontrol update JobId=42 AdminComment=m2d-credentials={script.parent}/mlflow.credentials"
    assert release == "scontrol release 42"


def test_a_job_whose_hold_cannot_be_lifted_is_cancelled_and_refused(tmp_path):
    wrapper, calls = load_wrapper(tmp_path, release_fails=True)
    with pytest.raises(wrapper.Refused, match="job 42 was cancelled: scontrol could not release it"):
        wrapper.submit(str(batch_script(tmp_path, "job")), "m2dtest-7")
    assert calls.read_text().splitlines()[-1] == "scancel -- 42"


def test_the_report_job_has_no_login_and_is_not_held(tmp_path, capsys):
    wrapper, calls = load_wrapper(tmp_path)
    assert wrapper.submit(str(batch_script(tmp_path, "disclosure")), "m2dtest-7-disclosure") == 0
    (sbatch,) = calls.read_text().splitlines()
    assert "--hold" not in sbatch
