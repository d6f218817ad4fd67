"""The Slurm adapter: sacct parsing, the pyslurm guard, and the real cluster.

The integration tests need the testbed's Slurm (deploy/testbed/): source
/opt/testbed/gateway.env first, or have /etc/slurm/slurm.conf.  Without it
they fail with a message; they never skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gateway.adapters.slurm import JobInfo, SlurmError, from_config, parse_sacct
from gateway.adapters.slurm.cli_scheduler import Batch, CliScheduler
from gateway.adapters.slurm.pyslurm_scheduler import PyslurmScheduler

UTC = timezone.utc
REPO = Path(__file__).resolve().parent.parent


# ================================================================ parse_sacct

def test_completed_job_has_exit_code_zero_and_utc_times():
    jobs = parse_sacct("17|COMPLETED|0:0|2026-11-27T03:10:01|2026-11-27T03:10:04|gpu01\n",
                       tz=UTC)
    assert jobs == {"17": JobInfo("17", "COMPLETED", 0, 0,
                                  datetime(2026, 11, 27, 3, 10, 1, tzinfo=UTC),
                                  datetime(2026, 11, 27, 3, 10, 4, tzinfo=UTC), node="gpu01")}
    assert jobs["17"].started and jobs["17"].finished


def test_failed_job_keeps_its_exit_code():
    info = parse_sacct("18|FAILED|1:0|2026-11-27T03:10:01|2026-11-27T03:10:02|gpu01", tz=UTC)["18"]
    assert (info.state, info.exit_code, info.signal) == ("FAILED", 1, 0)
    assert info.finished


def test_cancelled_by_uid_is_cancelled():
    info = parse_sacct("19|CANCELLED by 0|0:15|2026-11-27T03:10:01|2026-11-27T03:10:09|gpu01", tz=UTC)["19"]
    assert info.state == "CANCELLED"
    assert (info.exit_code, info.signal) == (0, 15)
    assert info.finished


def test_cancelled_while_pending_never_started():
    info = parse_sacct("20|CANCELLED by 1000|0:0|None|2026-11-27T03:10:09|None assigned", tz=UTC)["20"]
    assert info.state == "CANCELLED" and info.start is None and not info.started and info.node is None
    assert info.end == datetime(2026, 11, 27, 3, 10, 9, tzinfo=UTC)


def test_timeout_and_out_of_memory_are_terminal_with_their_codes():
    jobs = parse_sacct(
        "21|TIMEOUT|0:15|2026-11-27T03:00:00|2026-11-27T03:01:30|gpu01\n"
        "22|OUT_OF_MEMORY|0:125|2026-11-27T03:00:00|2026-11-27T03:00:05|gpu[01-02]\n", tz=UTC)
    assert (jobs["21"].state, jobs["21"].exit_code, jobs["21"].signal) == ("TIMEOUT", 0, 15)
    assert (jobs["22"].state, jobs["22"].exit_code, jobs["22"].signal) == ("OUT_OF_MEMORY", 0, 125)
    assert jobs["21"].finished and jobs["22"].finished


def test_running_job_has_no_end_and_no_exit_code_yet():
    info = parse_sacct("23|RUNNING|0:0|2026-11-27T03:10:01|Unknown|gpu01", tz=UTC)["23"]
    assert info.state == "RUNNING" and info.started and not info.finished
    assert info.end is None and info.node == "gpu01"
    # sacct says 0:0 for a running job; that is not a success
    assert info.exit_code is None and info.signal is None


def test_pending_job_has_no_start():
    info = parse_sacct("24|PENDING|0:0|Unknown|Unknown|None assigned", tz=UTC)["24"]
    assert info == JobInfo("24", "PENDING", None, None, None, None)
    assert not info.started and not info.finished


def test_other_terminal_states():
    text = "\n".join(f"{i}|{s}|0:0|None|2026-11-27T03:10:04|gpu01" for i, s in enumerate(
        ["NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE"], start=30))
    assert all(j.finished for j in parse_sacct(text, tz=UTC).values())
    for state in ["REQUEUED", "SUSPENDED", "RESIZING"]:
        assert not parse_sacct(f"40|{state}|0:0|None|None|gpu01", tz=UTC)["40"].finished


@pytest.mark.parametrize("state", ["FAILED", "TIMEOUT", "OUT_OF_MEMORY", "COMPLETED"])
def test_a_final_state_without_an_end_is_a_completion_not_yet_written_not_an_exit_code_0(state):
    # slurmdbd's start record already holds the state of a job that ended meanwhile, with
    # exit code 0 and no End; the completion's update brings End and the exit code together
    # (a failed dry run once read as exit code 0, then FAILED 1:0 a moment later)
    starting = parse_sacct(f"41|{state}|0:0|2026-11-27T03:10:01|Unknown|gpu01", tz=UTC)["41"]
    assert starting.state == "COMPLETING" and not starting.finished and starting.exit_code is None
    ended = parse_sacct(f"41|{state}|1:0|2026-11-27T03:10:01|2026-11-27T03:10:04|gpu01", tz=UTC)["41"]
    assert ended.state == state and ended.finished and ended.exit_code == 1


def test_pyslurm_reads_a_final_state_without_an_end_as_not_finished_either():
    from types import SimpleNamespace

    from gateway.adapters.slurm.pyslurm_scheduler import job_info_from_pyslurm
    record = dict(id=42, state="FAILED", exit_code=0, exit_code_signal=0, start_time=1_795_000_000, nodelist="gpu01")
    starting = job_info_from_pyslurm(SimpleNamespace(**record, end_time=0))
    assert starting.state == "COMPLETING" and not starting.finished and starting.exit_code is None
    ended = job_info_from_pyslurm(SimpleNamespace(**record | {"exit_code": 1}, end_time=1_795_000_004))
    assert ended.state == "FAILED" and ended.finished and ended.exit_code == 1


def test_blank_lines_whitespace_and_job_steps_are_tolerated():
    text = ("\n   \n"
            "  25 | COMPLETED | 0:0 | 2026-11-27T03:10:01 | 2026-11-27T03:10:04 | gpu01  \n"
            "25.batch|COMPLETED|0:0|2026-11-27T03:10:01|2026-11-27T03:10:04|gpu01\n"
            "25.extern|COMPLETED|0:0|2026-11-27T03:10:01|2026-11-27T03:10:04|gpu01\n"
            "25.0|FAILED|2:0|2026-11-27T03:10:02|2026-11-27T03:10:03|gpu01\n\n")
    jobs = parse_sacct(text, tz=UTC)
    assert list(jobs) == ["25"]
    assert jobs["25"].state == "COMPLETED" and jobs["25"].exit_code == 0 and jobs["25"].node == "gpu01"


def test_times_are_converted_from_sacct_zone_to_utc():
    amsterdam = ZoneInfo("Europe/Amsterdam")
    info = parse_sacct("26|COMPLETED|0:0|2026-07-01T12:00:00|2026-12-01T12:00:00|gpu01",
                       tz=amsterdam)["26"]
    assert info.start == datetime(2026, 7, 1, 10, 0, tzinfo=UTC)   # CEST, +2
    assert info.end == datetime(2026, 12, 1, 11, 0, tzinfo=UTC)    # CET, +1
    assert info.start.tzinfo == UTC


def test_default_zone_is_the_local_one():
    # sacct prints local time; without a tz the parser assumes ours
    info = parse_sacct("27|COMPLETED|0:0|2026-07-01T12:00:00|None|gpu01")["27"]
    expected = datetime(2026, 7, 1, 12, 0).astimezone().astimezone(UTC)
    assert info.start == expected


def test_malformed_line_is_an_error_not_a_silent_drop():
    with pytest.raises(ValueError, match="unexpected sacct line"):
        parse_sacct("28|COMPLETED|0:0", tz=UTC)
    with pytest.raises(ValueError, match="SLURM_TIME_FORMAT"):
        parse_sacct("29|COMPLETED|0:0|Nov 27 03:10|None|gpu01", tz=UTC)


def test_empty_output_is_no_jobs():
    assert parse_sacct("", tz=UTC) == {}


# ================================================================ command runner

def _fake_bin(folder: Path, name: str, body: str) -> None:
    (folder / name).write_text("#!/bin/sh\n" + body + "\n")
    (folder / name).chmod(0o755)


def test_bad_ids_never_reach_the_command_line():
    sched = CliScheduler(bin_dir="/nonexistent")
    with pytest.raises(ValueError):
        sched.statuses(["12", "-a"])
    with pytest.raises(ValueError):
        sched.cancel("12;rm")
    with pytest.raises(ValueError):
        sched.find("m2d-1,m2d-2", datetime.now(UTC))
    assert sched.statuses([]) == {}   # nothing to ask: no command at all


def test_missing_binary_is_a_slurm_error():
    with pytest.raises(SlurmError, match="cannot run sacct") as err:
        CliScheduler(bin_dir="/nonexistent").statuses(["1"])
    assert err.value.cmd[0] == "/nonexistent/sacct"


def test_each_failed_command_is_told_to_the_counter_passed_in(tmp_path):
    failed = []
    _fake_bin(tmp_path, "squeue", "echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2; exit 1")
    with pytest.raises(SlurmError, match="cannot run sacct"):
        CliScheduler(bin_dir="/nonexistent", on_error=failed.append).statuses(["1"])
    with pytest.raises(SlurmError, match="Unable to contact"):
        CliScheduler(bin_dir=tmp_path, on_error=failed.append).queue()
    assert failed == ["sacct", "squeue"]
    assert from_config({"SLURM_ADAPTER": "cli"}, on_error=failed.append).batch.on_error == failed.append
    CliScheduler(bin_dir="/nonexistent").batch.on_error("sacct")  # nothing passed in: nothing counted, no error


def test_command_timeout_is_a_slurm_error(tmp_path):
    _fake_bin(tmp_path, "sacct", "sleep 10")
    t0 = time.monotonic()
    with pytest.raises(SlurmError, match="timed out"):
        CliScheduler(bin_dir=tmp_path, timeout=0.5).statuses(["1"])
    assert time.monotonic() - t0 < 9.5  # killed, not waited for (the fake sleeps 10 s)


def test_commands_get_utc_and_not_the_gateway_secrets(tmp_path, monkeypatch):
    _fake_bin(tmp_path, "sacct", "env >&2; exit 1")
    monkeypatch.setenv("M2D_SECRET_KEY", "do-not-leak")
    monkeypatch.setenv("SACCT_FORMAT", "jobid")
    with pytest.raises(SlurmError) as err:
        CliScheduler(bin_dir=tmp_path, env={"SLURM_CONF": "/x/slurm.conf"}).statuses(["1"])
    env = dict(line.split("=", 1) for line in err.value.stderr.splitlines() if "=" in line)
    assert env["TZ"] == "UTC" and env["SLURM_TIME_FORMAT"] == "standard"
    assert env["SLURM_CONF"] == "/x/slurm.conf"
    assert "M2D_SECRET_KEY" not in env and "SACCT_FORMAT" not in env
    assert err.value.returncode == 1


def test_sbatch_parsable_output_with_cluster_name(tmp_path):
    _fake_bin(tmp_path, "sbatch", "echo 'sbatch: warning: something' >&2; echo '4711;testbed'")
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\ntrue\n")
    assert CliScheduler(bin_dir=tmp_path).submit(script, "m2d-1") == "4711"


def test_find_takes_the_newest_exact_match_from_slurmctld_and_accounting(tmp_path):
    # slurmctld still knows job 50 by name; the accounting record of job 50
    # is still called "allocation"; 40 is older than `since`; 45 has another
    # name; 48 is long gone from slurmctld and only in accounting
    _fake_bin(tmp_path, "squeue", "echo '50|m2d-9|2026-11-27T03:00:10'")
    _fake_bin(tmp_path, "sacct", "\n".join([
        "echo '40|m2d-9|2026-11-27T02:00:00'",
        "echo '45|m2d-99|2026-11-27T03:00:20'",
        "echo '48|m2d-9|2026-11-27T03:00:05'",
        "echo '50|allocation|2026-11-27T03:00:10'",
        'echo "$@" > "$(dirname "$0")/sacct.args"']))
    sched = CliScheduler(bin_dir=tmp_path)
    since = datetime(2026, 11, 27, 3, 0, 0, 500000, tzinfo=UTC)
    assert sched.find("m2d-9", since) == "50"
    args = (tmp_path / "sacct.args").read_text()
    assert "--name=m2d-9" in args and "-S 2026-11-27T03:00:00" in args
    _fake_bin(tmp_path, "squeue", "true")
    assert sched.find("m2d-9", since) == "48"
    assert sched.find("m2d-9", datetime(2026, 11, 27, 4, 0, tzinfo=UTC)) is None


def test_find_needs_an_aware_since():
    with pytest.raises(ValueError, match="timezone-aware"):
        CliScheduler(bin_dir="/nonexistent").find("m2d-1", datetime(2026, 1, 1))


def test_scancel_errors_are_read_from_stderr_because_it_exits_zero(tmp_path):
    _fake_bin(tmp_path, "scancel",
              "echo 'scancel: error: Kill job error on job id 5: "
              "Access/permission denied' >&2; exit 0")
    with pytest.raises(SlurmError, match="permission denied"):
        CliScheduler(bin_dir=tmp_path).cancel("5")
    _fake_bin(tmp_path, "scancel",
              "echo 'scancel: error: Kill job error on job id 5: "
              "Invalid job id specified' >&2; exit 0")
    CliScheduler(bin_dir=tmp_path).cancel("5")   # long over: fine


def test_unknown_adapter_names_the_choices():
    with pytest.raises(ValueError, match="cli, pyslurm"):
        from_config({"SLURM_ADAPTER": "slurmrestd"})
    assert isinstance(from_config({"SLURM_ADAPTER": "cli"}), CliScheduler)


# ================================================================ pyslurm

def test_importing_the_adapter_does_not_import_pyslurm():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, gateway.adapters.slurm.cli_scheduler; print('pyslurm' in sys.modules)"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_pyslurm_missing_says_how_to_fix_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyslurm", None)   # import raises ImportError
    with pytest.raises(SlurmError) as err:
        from_config({"SLURM_ADAPTER": "pyslurm"})
    msg = str(err.value)
    assert "pyslurm is not installed" in msg
    assert "pip install pyslurm==" in msg and "M2D_SLURM_ADAPTER=cli" in msg


def test_pyslurm_not_on_path_says_how_to_fix_it(monkeypatch):
    monkeypatch.delitem(sys.modules, "pyslurm", raising=False)
    with pytest.raises(SlurmError, match="pyslurm is not installed"):
        PyslurmScheduler()


def test_pyslurm_is_not_imported_without_a_slurm_conf(tmp_path, monkeypatch):
    # a stand-in pyslurm that would end the test run if it were imported
    pkg = tmp_path / "pyslurm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import os\nos._exit(97)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pyslurm", raising=False)
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "missing.conf"))
    with pytest.raises(SlurmError, match="slurm.conf .* is not readable"):
        PyslurmScheduler()
    assert "pyslurm" not in sys.modules


class _FakeRPCError(Exception):
    pass


def _fake_pyslurm(db_jobs, calls, live_jobs=()):
    """A stand-in for pyslurm's modern API, recording what was asked."""
    mod = types.ModuleType("pyslurm")
    mod.RPCError = _FakeRPCError

    class JobFilter:
        def __init__(self, **kw):
            self.kw = kw

    class Jobs:
        @staticmethod
        def load(db_filter=None):
            calls.append(("db.Jobs.load", db_filter.kw))
            return list(db_jobs)

    class JobSubmitDescription:
        def __init__(self, **kw):
            self.kw = kw
            self.loaded = False

        def load_sbatch_options(self, overwrite=False):
            self.loaded = True

        def submit(self):
            calls.append(("submit", self.kw, self.loaded))
            return 4242

    class Job:
        def __init__(self, job_id):
            self.job_id = job_id

        def cancel(self):
            calls.append(("cancel", self.job_id))
            if self.job_id == 13:
                raise _FakeRPCError("Invalid job id specified")

    class LiveJobs:
        @staticmethod
        def load():
            calls.append(("Jobs.load",))
            return {j.id: j for j in live_jobs}

    mod.db = types.SimpleNamespace(JobFilter=JobFilter, Jobs=Jobs)
    mod.Jobs = LiveJobs
    mod.JobSubmitDescription = JobSubmitDescription
    mod.Job = Job
    return mod


def _db_job(id, state, exit_code=0, sig=0, start=None, end=None, name="m2d-1", submit=None, nodelist=None):
    return types.SimpleNamespace(id=id, state=state, exit_code=exit_code,
                                 exit_code_signal=sig, start_time=start,
                                 end_time=end, name=name, submit_time=submit, nodelist=nodelist)


def test_pyslurm_database_jobs_map_to_job_info(monkeypatch):
    t0 = int(datetime(2026, 11, 27, 3, 0, tzinfo=UTC).timestamp())
    calls = []
    monkeypatch.setitem(sys.modules, "pyslurm", _fake_pyslurm([
        _db_job(10, "COMPLETED", 0, 0, t0, t0 + 3, nodelist="gpu01"),
        _db_job(11, "FAILED", 3, 0, t0, t0 + 2),
        _db_job(12, "CANCELLED", 0, 9, None, t0 + 1),
        _db_job(14, "RUNNING", 0, 0, t0, None),
        _db_job(99, "COMPLETED"),          # not asked for: dropped
    ], calls))
    sched = from_config({"SLURM_ADAPTER": "pyslurm"})
    got = sched.statuses(["10", "11", "12", "14"])
    assert calls == [("db.Jobs.load", {"ids": [10, 11, 12, 14]})]
    assert got["10"] == JobInfo("10", "COMPLETED", 0, 0,
                                datetime(2026, 11, 27, 3, 0, tzinfo=UTC),
                                datetime(2026, 11, 27, 3, 0, 3, tzinfo=UTC), node="gpu01")
    assert (got["11"].state, got["11"].exit_code) == ("FAILED", 3)
    assert (got["12"].state, got["12"].signal, got["12"].start) == ("CANCELLED", 9, None)
    assert got["14"].exit_code is None and got["14"].end is None and got["14"].started
    assert set(got) == {"10", "11", "12", "14"}


def test_pyslurm_submit_find_and_cancel(monkeypatch, tmp_path):
    calls = []
    t0 = int(datetime(2026, 11, 27, 3, 0, tzinfo=UTC).timestamp())
    monkeypatch.setitem(sys.modules, "pyslurm", _fake_pyslurm([
        _db_job(19, "COMPLETED", name="m2d-7", submit=t0 - 60),   # before `since`
        _db_job(20, "COMPLETED", name="m2d-7", submit=t0 + 100),
        _db_job(21, "RUNNING", name="m2d-7", submit=t0 + 200),
        _db_job(22, "RUNNING", name="m2d-77", submit=t0 + 300),
        _db_job(23, "PENDING", name="allocation", submit=t0 + 400),
    ], calls, live_jobs=[_db_job(23, "PENDING", name="m2d-7", submit=t0 + 400)]))
    sched = from_config({"SLURM_ADAPTER": "pyslurm"})
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n")
    assert sched.submit(script, "m2d-7") == "4242"
    kind, kw, loaded = calls[-1]
    assert kw["name"] == "m2d-7" and kw["script"] == str(script) and loaded
    assert kw["working_directory"] == str(tmp_path)

    since = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)
    assert sched.find("m2d-7", since) == "23"     # slurmctld knows its name first
    assert calls[-1] == ("db.Jobs.load", {"names": ["m2d-7"], "start_time": since})
    assert sched.find("m2d-7", since + timedelta(seconds=500)) is None

    sched.cancel("21")
    assert calls[-1] == ("cancel", 21)
    with pytest.raises(SlurmError, match="Invalid job id"):
        sched.cancel("13")


def test_pyslurm_has_the_queue_and_the_recent_jobs_of_the_interface(monkeypatch):
    t0 = int(datetime(2026, 11, 27, 3, 0, tzinfo=UTC).timestamp())
    calls = []
    live = [types.SimpleNamespace(id=31, name="m2d-3", state="PENDING", state_reason="Priority", run_time=0,
                                  nodelist=None, priority=9),
            types.SimpleNamespace(id=30, name="m2d-2", state="RUNNING", state_reason="None", run_time=3725,
                                  nodelist="gpu01", priority=5),
            types.SimpleNamespace(id=32, name="other", state="RUNNING", state_reason="None", run_time=90061,
                                  nodelist="gpu02", priority=1)]
    monkeypatch.setitem(sys.modules, "pyslurm", _fake_pyslurm([
        _db_job(20, "COMPLETED", 0, 0, t0, t0 + 65, name="m2d-1", nodelist="gpu01"),
        _db_job(21, "FAILED", 3, 0, t0, t0 + 2, name="m2d-2"),
        _db_job(22, "COMPLETED", name="other"),
    ], calls, live_jobs=live))
    sched = from_config({"SLURM_ADAPTER": "pyslurm"})
    queue = sched.queue("m2d-")
    assert [(e.job_id, e.state, e.reason, e.elapsed, e.nodelist, e.priority) for e in queue] == [
        ("30", "RUNNING", "None", "01:02:05", "gpu01", 5), ("31", "PENDING", "Priority", "00:00:00", "", 9)]
    assert [e.elapsed for e in sched.queue()] == ["01:02:05", "00:00:00", "1-01:01:01"]
    recent = sched.recent("m2d-")
    assert [(r.job_id, r.state, r.exit_code) for r in recent] == [("21", "FAILED", "3:0"), ("20", "COMPLETED", "0:0")]
    assert (recent[1].start, recent[1].end, recent[1].nodelist) == ("2026-11-27T03:00:00", "2026-11-27T03:01:05", "gpu01")
    assert calls[-1][0] == "db.Jobs.load" and "start_time" in calls[-1][1]


# ================================================================ the real cluster

def _slurm_env() -> dict[str, str]:
    conf = os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf"
    if not os.path.exists(conf):
        pytest.fail(f"no Slurm for the integration tests: {conf} does not exist. "
                    "Start the testbed (deploy/testbed/) and run "
                    "`set -a; . /opt/testbed/gateway.env; set +a` first.")
    return {"SLURM_CONF": conf}


class CountingBatch(Batch):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls: list[list[str]] = []

    def run(self, name, args):
        self.calls.append([name, *args])
        return super().run(name, args)


@pytest.fixture(scope="module")
def cluster(testbed):
    env = _slurm_env()
    batch = CountingBatch(env=env, timeout=30)
    try:
        batch.run("sinfo", ["-h", "-o", "%T"])
    except SlurmError as e:
        pytest.fail(f"Slurm does not answer (SLURM_CONF={env['SLURM_CONF']}): {e}")
    return CliScheduler(batch=batch)


@pytest.fixture
def workdir():
    base = Path("/opt/testbed/tmp-tests") if Path("/opt/testbed").is_dir() else Path("/tmp")
    base.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="slurm-", dir=base))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _script(workdir: Path, name: str, body: str, gres: bool = True) -> Path:
    path = workdir / f"{name}.sh"
    lines = ["#!/bin/bash",
             f"#SBATCH --output={workdir}/{name}-%j.out",
             "#SBATCH --time=00:05:00"]
    if gres:
        lines.append("#SBATCH --gres=gpu:1")
    path.write_text("\n".join(lines) + "\n" + body + "\n")
    return path


def _wait(sched, job_ids, until, deadline_s=120.0) -> dict[str, JobInfo]:
    """Poll until every job satisfies `until`.  A failing sacct is retried
    (the testbed is shared: someone may be restarting slurmdbd) and
    reported if it never recovers."""
    end = time.monotonic() + deadline_s
    got, error = {}, None
    while True:
        try:
            got, error = sched.statuses(job_ids), None
        except SlurmError as e:
            error = e
        if error is None and all(j in got and until(got[j]) for j in job_ids):
            return got
        if time.monotonic() > end:
            pytest.fail(f"jobs {job_ids} not there after {deadline_s} s: {got}"
                        + (f"; last sacct error: {error} {error.stderr}" if error else ""))
        time.sleep(0.5)


def test_job_that_exits_zero_completes_with_times(cluster, workdir):
    before = datetime.now(UTC) - timedelta(seconds=2)
    job = cluster.submit(_script(workdir, "ok", 'echo "gpu=$CUDA_VISIBLE_DEVICES"'), "m2d-test-ok")
    info = _wait(cluster, [job], lambda i: i.finished)[job]
    assert (info.state, info.exit_code, info.signal) == ("COMPLETED", 0, 0)
    assert before <= info.start <= info.end <= datetime.now(UTC) + timedelta(seconds=2)
    # the fake GPU was allocated
    assert re.search(r"gpu=\d", (workdir / f"ok-{job}.out").read_text())


def test_job_that_exits_three_fails_with_exit_code_three(cluster, workdir):
    job = cluster.submit(_script(workdir, "three", "exit 3"), "m2d-test-three")
    info = _wait(cluster, [job], lambda i: i.finished)[job]
    assert (info.state, info.exit_code) == ("FAILED", 3)


def test_cancelled_job_is_cancelled_and_cancel_again_is_harmless(cluster, workdir):
    job = cluster.submit(_script(workdir, "sleepy", "sleep 300"), "m2d-test-cancel")
    _wait(cluster, [job], lambda i: i.state == "RUNNING")
    cluster.cancel(job)
    info = _wait(cluster, [job], lambda i: i.finished)[job]
    assert info.state == "CANCELLED"
    assert info.end is not None
    cluster.cancel(job)   # already over: not an error
    cluster.cancel("999999")   # unknown to slurmctld (as after MinJobAge): nothing runs


def test_statuses_of_several_jobs_is_one_sacct_call(cluster, workdir):
    jobs = [cluster.submit(_script(workdir, f"many{i}", f"exit {i}", gres=False),
                           f"m2d-test-many{i}") for i in range(3)]
    got = _wait(cluster, jobs, lambda i: i.finished)
    n = len(cluster.batch.calls)
    got = cluster.statuses(jobs + ["999999"])
    assert len(cluster.batch.calls) == n + 1
    assert cluster.batch.calls[-1][0] == "sacct"
    assert [got[j].exit_code for j in jobs] == [0, 1, 2]
    assert "999999" not in got    # unknown ids are simply absent


def test_statuses_of_more_ids_than_one_argument_may_hold_take_several_sacct_calls():
    # 20,000 seven-digit ids: one -j argument would be over Linux's 128 KiB
    ids = [str(1_000_000 + i) for i in range(20_000)]

    class Sacct:
        job_user, calls = None, []

        def run(self, name, args):
            self.calls.append(args[-1])
            return subprocess.CompletedProcess([name], 0, "".join(
                f"{i}|PENDING|0:0|Unknown|Unknown|None assigned\n" for i in args[-1].split(",")), "")

    batch = Sacct()
    got = CliScheduler(batch=batch).statuses(ids)
    assert len(batch.calls) == 2 and all(len(arg) <= 100_000 for arg in batch.calls)
    assert sorted(got) == sorted(ids) and got[ids[-1]].state == "PENDING"


def test_find_recovers_the_id_of_a_submitted_job(cluster, workdir):
    name = f"m2d-test-find-{os.getpid()}-{time.monotonic_ns()}"
    since = datetime.now(UTC) - timedelta(seconds=1)
    assert cluster.find(name, since) is None
    first = cluster.submit(_script(workdir, "find1", "true", gres=False), name)
    # right after sbatch, as after a crash: found at once
    assert cluster.find(name, since) == first
    second = cluster.submit(_script(workdir, "find2", "true", gres=False), name)
    assert cluster.find(name, since) == second            # the newest
    assert cluster.find(name + "-other", since) is None   # exact names only
    assert cluster.find(name, datetime.now(UTC) + timedelta(minutes=5)) is None
    _wait(cluster, [first, second], lambda i: i.finished)


def test_sbatch_error_carries_stderr(cluster, workdir):
    script = _script(workdir, "badpart", "true")
    script.write_text(script.read_text().replace(
        "#!/bin/bash\n", "#!/bin/bash\n#SBATCH --partition=no-such-partition\n", 1))
    with pytest.raises(SlurmError) as err:
        cluster.submit(script, "m2d-test-bad")
    assert err.value.returncode not in (0, None)
    assert "partition" in err.value.stderr.lower()
    assert err.value.cmd[0].endswith("sbatch")


def test_times_are_utc_whatever_the_gateway_zone(cluster, workdir, monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        job = cluster.submit(_script(workdir, "tz", "true", gres=False), "m2d-test-tz")
        info = _wait(cluster, [job], lambda i: i.finished)[job]
        now = datetime.now(UTC)
        assert abs(info.start - now) < timedelta(minutes=2)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_the_job_does_not_see_the_gateway_environment(cluster, workdir, monkeypatch):
    monkeypatch.setenv("M2D_SECRET_KEY", "do-not-leak")
    # a Batch made now would copy it if it copied everything
    sched = CliScheduler(env=_slurm_env())
    job = sched.submit(_script(workdir, "env", "env", gres=False), "m2d-test-env")
    _wait(sched, [job], lambda i: i.finished)
    out = (workdir / f"env-{job}.out").read_text()
    assert "SLURM_JOB_ID=" in out
    assert "do-not-leak" not in out
