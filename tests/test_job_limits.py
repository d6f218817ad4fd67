"""What a job can leave behind is bounded while it writes, and it runs only
through the root wrapper (deploy/libexec/m2d-slurm), with its own credentials.

Real Slurm, Apptainer and sudo on the testbed (deploy/testbed/); the jobs are
submitted as the gateway submits them, through the wrapper.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from gateway.adapters.slurm.cli_scheduler import SLURM_WRAPPER
from tests.helpers.batch import GATEWAY_USER, JOB_USER, TESTBED
from tests.helpers.batch import for_the_job as _for_the_job
from tests.helpers.batch import run_job as _run_job

SUDOERS = Path("/etc/sudoers.d/m2d")
CLAIM_DIR = Path("/run/m2d-credentials")  # deploy/testbed/accounts.sh: the wrapper's claims, node-local


@pytest.fixture
def job_root(testbed):
    """A folder the job account may pass through, as through DATA_DIR (under
    the testbed: the Apptainer wrapper shares it)."""
    base = TESTBED / "tmp-tests"
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="limits-", dir=base))
    root.chmod(0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _refused_by_sudo(stderr: str) -> bool:
    # sudo -n says so, or that the user "is not allowed to execute" it
    return "a password is required" in stderr or "is not allowed to execute" in stderr


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


# ================================================================ the export, while it is written

WRITES_TOO_MUCH = r'''
import os
written = 0
try:
    with open("/mnt/export/model.pt", "wb") as f:
        for _ in range(100):
            f.write(os.urandom(1024 * 1024))
            written += 1024 * 1024
except OSError as e:
    print("stopped after", written, "bytes:", e.strerror)
print("main.py ends well")  # the job fails all the same
'''


def test_a_job_writing_past_its_byte_limit_is_stopped_and_fails_naming_it(job_root):
    info, out, err, spec = _run_job(job_root, WRITES_TOO_MUCH, gpus=0,
                                    export_max_bytes=8 * 1024**2, export_max_files=100)
    assert "No space left on device" in out and "main.py ends well" in out, out + err
    assert (info.state, info.exit_code) == ("FAILED", 95), out + err
    assert err.rstrip().splitlines()[-1].startswith(
        "m2d: /mnt/export is over its limit of 8 MiB / 100 files (it ran out of bytes)"), err
    # what it wrote up to the limit is in the export folder, as usual
    written = (spec.export_dir / "model.pt").stat().st_size
    assert 7 * 1024**2 <= written <= 8 * 1024**2, written


MILLION_FILES = r'''
import os, time
started, made = time.monotonic(), 0
try:
    for i in range(1_000_000):
        open(f"/mnt/export/f{i:07d}", "w").close()
        made += 1
except OSError as e:
    print("made", made, "files:", e.strerror)
print("seconds", round(time.monotonic() - started, 1))
'''


def test_a_job_making_a_million_files_stops_at_the_file_limit_and_fails_naming_it(job_root):
    info, out, err, spec = _run_job(job_root, MILLION_FILES, gpus=0,
                                    export_max_bytes=64 * 1024**2, export_max_files=2000)
    assert (info.state, info.exit_code) == ("FAILED", 95), out + err
    made = int(out.split("made ", 1)[1].split()[0])
    assert 2000 <= made <= 2016, out
    assert "No space left on device" in out
    assert "it ran out of files" in err.rstrip().splitlines()[-1], err
    assert len(_files(spec.export_dir)) == made  # all of them, and no more, for the gateway to walk


def test_a_job_within_its_limits_exports_as_before(job_root):
    main_py = ("import os\n"
               "os.makedirs('/mnt/export/results/plots')\n"
               "open('/mnt/export/results/metrics.json', 'w').write('{\"auc\": 0.9}')\n"
               "open('/mnt/export/results/plots/roc.txt', 'w').write('roc')\n"
               "os.symlink('/etc/passwd', '/mnt/export/link')\n"
               "os.mkfifo('/mnt/export/fifo')\n"
               "open('/mnt/export/hidden', 'w').write('h')\n"
               "os.chmod('/mnt/export/hidden', 0o4000)\n")
    info, out, err, spec = _run_job(job_root, main_py, gpus=0, export_max_bytes=8 * 1024**2)
    assert (info.state, info.exit_code) == ("COMPLETED", 0), out + err
    assert (spec.export_dir / "results" / "metrics.json").read_text() == '{"auc": 0.9}'
    assert (spec.export_dir / "results" / "plots" / "roc.txt").read_text() == "roc"
    assert os.readlink(spec.export_dir / "link") == "/etc/passwd"  # a link stays a link, never followed
    assert not (spec.export_dir / "lost+found").exists() and not (spec.export_dir / "fifo").exists()
    # the gateway (the group) may read and delete what the job wrote, whatever modes it set; no setuid
    assert (spec.export_dir / "hidden").stat().st_mode & 0o7777 == 0o060
    assert "over its limit" not in err


def test_a_job_that_runs_out_of_time_still_leaves_its_export(job_root):
    main_py = ("import time\n"
               "open('/mnt/export/checkpoint.pt', 'wb').write(b'c' * 4096)\n"
               "print('written', flush=True)\n"
               "time.sleep(600)\n")
    info, out, err, spec = _run_job(job_root, main_py, gpus=0, time="00:02:00", copy_out_seconds=30)
    # stopped 30 s before its limit (Slurm: up to 60 s earlier) to keep its export
    assert (info.state, info.exit_code) == ("FAILED", 97), (info, err)
    assert "m2d: the job reached its time limit of 00:02:00" in err
    # read back from the image in the moment Slurm gives the batch script (KillWait)
    assert (spec.export_dir / "checkpoint.pt").is_file(), err
    assert (spec.export_dir / "checkpoint.pt").read_bytes() == b"c" * 4096


# ================================================================ the logs

FLOODS_THE_LOGS = r'''
import sys
chunk = "x" * 1023 + "\n"
for _ in range(4096):            # 4 MiB on each stream
    sys.stdout.write(chunk)
    sys.stderr.write(chunk)
print("the end", file=sys.stderr)
'''


def test_stdout_and_stderr_are_cut_at_their_limit_and_say_so(job_root):
    info, out, err, _ = _run_job(job_root, FLOODS_THE_LOGS, gpus=0, log_max_bytes=64 * 1024)
    assert (info.state, info.exit_code) == ("COMPLETED", 0), err[-2000:]
    assert len(out) < 64 * 1024 + 200 and len(err) < 64 * 1024 + 1000, (len(out), len(err))
    assert "m2d: the job's stdout went over its limit of 64 KiB:" in out
    dropped = int(err.split("m2d: the job's stderr went over its limit of 64 KiB: ", 1)[1].split()[0])
    assert dropped >= 4096 * 1024 - 64 * 1024, err[-500:]  # and the relay's lines, which count too


# ================================================================ sudo: the wrapper and nothing else

def _as_gateway(argv: list[str], cwd: str = "/") -> subprocess.CompletedProcess:
    """``argv`` as the gateway's account under the testbed's sudo rules,
    without any rule kept for gateways from before the wrapper
    (M2D_SUDO_LEGACY_SLURM in deploy/testbed/accounts.sh): in a private mount
    namespace, so other gateways on a shared testbed keep theirs."""
    narrowed = "".join(line for line in SUDOERS.read_text().splitlines(keepends=True)
                       if "M2D_LEGACY_SLURM" not in line)
    with tempfile.NamedTemporaryFile("w", dir="/tmp", prefix="sudoers-", delete=False) as f:
        f.write(narrowed)
    os.chmod(f.name, 0o440)
    try:
        inner = 'mount --bind "$0" /etc/sudoers.d/m2d && exec setpriv --reuid="$1" --regid="$1" --init-groups -- "${@:2}"'
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", inner,
                               f.name, GATEWAY_USER, *argv],
                              capture_output=True, text=True, timeout=60, cwd=cwd)
    finally:
        os.unlink(f.name)


@pytest.mark.parametrize("argv", [
    ["sudo", "-n", "-u", JOB_USER, "/usr/bin/sbatch", "--wrap", "id"],
    ["sudo", "-n", "-u", JOB_USER, "/usr/bin/sbatch", "/tmp/anything.sbatch"],
    ["sudo", "-n", "-u", JOB_USER, "/usr/bin/scancel", "-u", JOB_USER],
    ["sudo", "-n", "-u", JOB_USER, "/bin/sh", "-c", "id"],
    ["sudo", "-n", "-u", "root", "/usr/bin/sbatch", "--wrap", "id"],
    ["sudo", "-n", "-u", GATEWAY_USER, SLURM_WRAPPER, "credential"],  # the job account's rule, not the gateway's
    ["sudo", "-n", SLURM_WRAPPER, "credential"],
])
def test_the_gateway_cannot_run_slurm_as_the_job_account_but_through_the_wrapper(testbed, argv):
    proc = _as_gateway(argv)
    assert proc.returncode == 1 and _refused_by_sudo(proc.stderr), (proc.stdout, proc.stderr)


@pytest.fixture
def submission(job_root):
    """A submission folder as gateway.core.storage makes it, with a batch script
    and credentials of the gateway's; returns its job folder."""
    root = job_root / "data"
    for path in (root, root / "submissions"):
        path.mkdir()
        path.chmod(0o711)
    sub = root / "submissions" / "7"
    for path, mode in ((sub, 0o2750), (sub / "job", 0o2750), (sub / "export", 0o2770), (sub / "logs", 0o2770)):
        _for_the_job(path, mode)
    (sub / "job" / "job.sbatch").write_text("#!/bin/bash\ntrue\n")
    (sub / "job" / "job.sbatch").chmod(0o750)
    (sub / "job" / "mlflow.credentials").write_text("alice\nsecret\n")
    (sub / "job" / "mlflow.credentials").chmod(0o600)
    for path in (root, root / "submissions", sub, sub / "job", *(sub / "job").iterdir()):
        shutil.chown(path, user=GATEWAY_USER)
    return sub / "job"


def _wrapper(*args: str) -> subprocess.CompletedProcess:
    return _as_gateway(["sudo", "-n", SLURM_WRAPPER, *args])


def test_the_wrapper_refuses_what_the_gateway_would_never_submit(submission):
    script = str(submission / "job.sbatch")
    cases = {
        "a name that is not <prefix>-<id>": ("submit", script, "m2d-8"),
        "a dry run's name for the real script": ("submit", script, "m2d-7-dry"),
        "an option for a name": ("submit", script, "--wrap=id"),
        "an option for an account": ("submit", script, "m2d-7", "--wrap=id"),
        "one argument too many": ("submit", script, "m2d-7", "acct", "--wrap=id"),
        "a script outside a submission's job folder": ("submit", "/tmp/x/submissions/7/code/job.sbatch", "m2d-7"),
        "a path through ..": ("submit", str(submission / ".." / "job" / "job.sbatch"), "m2d-7"),
        "a job id that is not one": ("cancel", "-u"),
        "scancel's options": ("cancel", "--user=m2d-job"),
    }
    for what, args in cases.items():
        proc = _wrapper(*args)
        assert proc.returncode == 2 and "m2d-slurm: refused" in proc.stderr, (what, proc.stderr)
    # sudo itself allows only submit and cancel
    proc = _wrapper("sbatch", "--wrap", "id")
    assert proc.returncode == 1 and _refused_by_sudo(proc.stderr), proc.stderr


def test_the_wrapper_refuses_a_script_or_credentials_the_job_account_could_have_written(submission):
    script = submission / "job.sbatch"
    link = submission.parent.parent / "8"
    link.symlink_to(submission.parent)  # submissions/8 -> submissions/7
    proc = _wrapper("submit", str(link / "job" / "job.sbatch"), "m2d-8")
    assert proc.returncode == 2 and "no symlinks" in proc.stderr, proc.stderr
    shutil.chown(script, user=JOB_USER)
    proc = _wrapper("submit", str(script), "m2d-7")
    assert proc.returncode == 2 and "is not owned by m2d or root" in proc.stderr, proc.stderr
    shutil.chown(script, user=GATEWAY_USER)
    script.chmod(0o770)
    proc = _wrapper("submit", str(script), "m2d-7")
    assert proc.returncode == 2 and "writable by its group or others" in proc.stderr, proc.stderr
    script.chmod(0o750)
    submission.chmod(0o2770)  # the job account could swap the script
    proc = _wrapper("submit", str(script), "m2d-7")
    assert proc.returncode == 2 and "can be written by others" in proc.stderr, proc.stderr
    submission.chmod(0o2750)
    (submission / "mlflow.credentials").chmod(0o640)
    proc = _wrapper("submit", str(script), "m2d-7")
    assert proc.returncode == 2 and "readable by its owner alone" in proc.stderr, proc.stderr


# ================================================================ each job its own credentials

ESCAPED = r'''#!/bin/bash
#SBATCH --output={out}/a-%j.out
# What code that got out of the container could do, as the job account on
# the node, inside job A: read B's login, ask the wrapper twice.
echo "B: $(cat {b_credentials} 2>&1)"
echo "own: $(sudo -n -u {gateway} {wrapper} credential 2>&1 | head -1)"
echo "again: $(sudo -n -u {gateway} {wrapper} credential 2>&1)"
# a job of its own making (the job account may sbatch), whose folder is B's
forged=$(sbatch --parsable -o /dev/null --chdir={b_job} --wrap \
  "sudo -n -u {gateway} {wrapper} credential > {out}/forged.txt 2>&1")
for _ in $(seq 300); do [ -s {out}/forged.txt ] && break; sleep 0.3; done
echo "forged: $(cat {out}/forged.txt)"
'''


def _submission(root: Path, number: int, login: str) -> Path:
    sub = root / "submissions" / str(number)
    for path, mode in ((sub, 0o2750), (sub / "job", 0o2750), (sub / "export", 0o2770), (sub / "logs", 0o2770)):
        _for_the_job(path, mode)
    credentials = sub / "job" / "mlflow.credentials"
    credentials.write_text(f"{login}\npassword-of-{login}\n")
    credentials.chmod(0o600)
    for path in (sub, sub / "job", credentials):
        shutil.chown(path, user=GATEWAY_USER)
    return sub


def _wait_finished(sched, job: str) -> None:
    deadline = time.monotonic() + 120
    while not ((info := sched.statuses([job]).get(job)) and info.finished):
        assert time.monotonic() < deadline, f"job {job} not finished: {info}"
        time.sleep(0.5)


def test_a_job_gets_its_own_owners_credentials_and_no_other(job_root):
    """Job A's code, out of its container, as the job account (every job runs
    as it): B's login file is the gateway's alone; the wrapper hands A its own
    login once, and a job made by the job account itself gets none."""
    from gateway.adapters.slurm.cli_scheduler import CliScheduler
    root = job_root / "data"
    for path in (root, root / "submissions"):
        path.mkdir()
        path.chmod(0o711)
    shutil.chown(root, user=GATEWAY_USER)
    shutil.chown(root / "submissions", user=GATEWAY_USER)
    a, b = _submission(root, 1, "alice"), _submission(root, 2, "bob")
    out = job_root / "out"
    _for_the_job(out, 0o2770)
    script = a / "job" / "job.sbatch"
    script.write_text(ESCAPED.format(b_credentials=b / "job" / "mlflow.credentials", gateway=GATEWAY_USER,
                                     wrapper=SLURM_WRAPPER, b_job=b / "job", out=out))
    script.chmod(0o750)
    shutil.chown(script, user=GATEWAY_USER)
    sched = CliScheduler(env={"SLURM_CONF": os.environ["SLURM_CONF"]}, job_user=JOB_USER)
    # Claims an earlier controller's jobs left under the ids this job may get: a
    # controller that lost its state counts from 1 again (a fresh testbed on a
    # machine that kept /run did), and its job 9 is not the old job 9.
    last = max([int(j) for j in subprocess.run(["sacct", "-a", "-X", "-n", "-o", "JobIDRaw", "-S", "2000-01-01"],
                                               capture_output=True, text=True, timeout=60).stdout.split()
                if j.isdigit()] or [0])
    earlier = [CLAIM_DIR / f"{n}.{old}" for n in range(last + 1, last + 400) for old in ("0", "2000-01-01T00:00:00.0")]
    for claim in earlier:
        claim.mkdir(mode=0o700, exist_ok=True)
    # through the gateway's own sudo rule (no legacy rule), as the gateway submits
    try:
        proc = _as_gateway(["sudo", "-n", SLURM_WRAPPER, "submit", str(script), "m2dtest-1"])
        assert proc.returncode == 0, proc.stderr
        job = proc.stdout.strip()
        assert int(job) < last + 400, "more jobs than claims made: the test's guess of the next ids was short"
        _wait_finished(sched, job)
    finally:
        for claim in earlier:
            claim.rmdir()
    text = (out / f"a-{job}.out").read_text()
    lines = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    assert "Permission denied" in lines["B"] and "bob" not in text, text
    assert lines["own"] == "alice", text
    assert "handed over already" in lines["again"] and "password-of-alice" not in lines["again"], text
    assert "was not submitted by the gateway" in lines["forged"], text
    assert pwd.getpwuid((b / "job" / "mlflow.credentials").stat().st_uid).pw_name == GATEWAY_USER


# ================================================================ through the gateway

MILLION_FILES_NESTED = r'''
import os
made = 0
try:
    for d in range(1000):
        os.mkdir(f"/mnt/export/d{d:03d}")
        made += 1
        for i in range(1000):
            open(f"/mnt/export/d{d:03d}/{'n' * 200}{i:04d}", "w").close()
            made += 1
except OSError as e:
    print("made", made, "files and folders:", e.strerror, flush=True)
'''


def test_a_million_files_through_the_gateway_fail_on_the_limit_and_every_poll_goes_on(stack, tmp_path):
    """A real job and a dry run each try to make a million files with long
    names: each fails on EXPORT_MAX_FILES with the limit named, the poller
    records the end of another researcher's job meanwhile, and the export's
    manifest and the API stay quick."""
    from tests.helpers.stack import SAMPLES, zip_folder
    limit = int(stack.env.get("M2D_EXPORT_MAX_FILES", 10_000))
    hostile = stack.researcher("million", dry_run=False)
    hostile_dry = stack.researcher("million-dry")
    other = stack.researcher("bystander", dry_run=False)
    zipped = zip_folder(SAMPLES / "iris", tmp_path / "million.zip", extra={"main.py": MILLION_FILES_NESTED})
    real, dry = hostile.submit(zipped), hostile_dry.submit(zipped)
    fails = other.submit(zip_folder(SAMPLES / "iris", tmp_path / "fails.zip",
                                    extra={"main.py": "raise SystemExit('bystander fails on purpose')\n"}))

    done = hostile.wait_until(real, ("failed", "completed"), timeout=1200)
    assert done["status"] == "failed" and done["exit_code"] == 95, done
    assert done["reason"].startswith(f"EXPORT_FULL: /mnt/export is over its limit of 2 GiB / {limit:,} files")
    assert "it ran out of files" in done["error"], done["error"]
    started = time.monotonic()
    listing = hostile.api("GET", f"/submissions/{real}/export")
    assert listing.status_code < 500 and time.monotonic() - started < 30, listing.text[:500]
    export = Path(stack.env["M2D_DATA_DIR"]) / "submissions" / str(real) / "export"
    assert limit <= sum(1 for _ in export.rglob("*")) <= limit + 64
    # the owner's MLflow login, which the job got through the wrapper: the gateway's alone
    login = (export.parent / "job" / "mlflow.credentials").stat()
    assert (login.st_mode & 0o777, pwd.getpwuid(login.st_uid).pw_name) == (0o600, GATEWAY_USER)

    failed_dry = hostile_dry.wait_until(dry, ("dry_run_failed", "dry_run_passed"), timeout=1200)
    assert failed_dry["status"] == "dry_run_failed" and failed_dry["dry_run"]["exit_code"] == 95, failed_dry
    assert "over its limit of 2 GiB" in failed_dry["dry_run"]["log"]

    bystander = other.wait_until(fails, ("failed", "completed"), timeout=1200)
    assert bystander["status"] == "failed" and "bystander fails on purpose" in bystander["error"]


def test_the_relay_holding_a_login_is_closed_to_other_processes_of_the_job_account(job_root):
    """Every job's relay runs as the job account: another job's process (the
    same uid) must not read its memory, environment or open files."""
    from gateway.core.jobscript import RELAY_SOURCE
    folder = job_root / "relay"
    folder.mkdir()
    shutil.chown(folder, user=JOB_USER)
    folder.chmod(0o700)
    relay = folder / "relay.py"
    shutil.copy(RELAY_SOURCE, relay)
    shutil.chown(relay, user=JOB_USER)
    as_job = ["setpriv", f"--reuid={JOB_USER}", f"--regid={JOB_USER}", "--init-groups", "--"]
    proc = subprocess.Popen([*as_job, "/usr/bin/python3", str(relay), "serve", "--socket", str(folder / "sock"),
                             "--ready-file", str(folder / "ready"), "--upstream", "http://127.0.0.1:5999",
                             "--password-file", "-", "--experiment-id", "1", "--experiment-name", "x"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    neighbour = subprocess.Popen([*as_job, "sleep", "60"])  # an ordinary process of the same account
    try:
        proc.stdin.write(b"alice\nsecret-of-alice\n")
        proc.stdin.close()
        deadline = time.monotonic() + 30
        while not (folder / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)

        def peek(pid: int) -> list[str]:
            code = ("import sys\nfor name in ('environ', 'mem', 'fd/0', 'cmdline'):\n"
                    "    try:\n        open(f'/proc/{sys.argv[1]}/{name}', 'rb').read(1)\n"
                    "        print(name, 'read')\n"
                    "    except OSError as e:\n        print(name, type(e).__name__)\n")
            return subprocess.run([*as_job, "/usr/bin/python3", "-c", code, str(pid)], capture_output=True, text=True,
                                  timeout=30).stdout.split("\n")
        # the neighbour's environ and fds are open to the account (the check means something) ...
        assert "environ read" in peek(neighbour.pid)
        # ... the relay's are not
        seen = peek(proc.pid)
        assert {"environ PermissionError", "fd/0 PermissionError"} <= set(seen), seen
        assert "mem read" not in seen, seen
    finally:
        proc.terminate()
        neighbour.terminate()
        proc.wait(timeout=30)
        neighbour.wait(timeout=30)
