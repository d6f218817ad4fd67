"""Fair share and quotas in Slurm's own terms: each researcher is a Slurm
account (m2d-<user>) whose limits Slurm enforces and whose usage sshare,
sreport and sacct -A report.

First the parsers and the reason words (Slurm's real outputs, no Slurm
needed), then the proof on the real stack: two researchers, one running
job per account; one researcher's five jobs do not keep the other's waiting.
"""
import subprocess
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway import create_app
from gateway.adapters.slurm import TERMINAL_STATES, SlurmError, SlurmRefused, base_state
from gateway.adapters.slurm.accounting import (
    SlurmAccounts,
    parse_associations,
    parse_sreport,
    parse_sshare,
    parse_tres,
)
from gateway.adapters.slurm.cli_scheduler import CliScheduler
from gateway.adapters.slurm.limits import AccountLimits
from gateway.adapters.slurm.reasons import explain, refusal, refusal_code
from gateway.config import from_environment
from gateway.core.models import Submission, User
from gateway.extensions import db

from .helpers.client import m2d
from .helpers.stack import SAMPLES, Stack, wait_for, zip_folder

# `sshare -n -P -a -o Account,User,RawShares,NormShares,RawUsage,EffectvUsage,FairShare,GrpTRESMins,GrpTRESRaw`
# on the testbed (Slurm 22.05): account names indented by depth
SSHARE = """\
root|||0.000000|2|1.000000|||cpu=0,mem=384,energy=0,node=0,billing=0,fs/disk=0,vmem=0,pages=0,gres/gpu=0
 root|root|1|0.333333|0|0.000000|1.000000||cpu=0,mem=0,energy=0,node=0,billing=0,fs/disk=0,vmem=0,pages=0,gres/gpu=0
 m2d||1|0.333333|1|0.000000|||cpu=0,mem=192,energy=0,node=0,billing=0,fs/disk=0,vmem=0,pages=0,gres/gpu=0
  m2d|m2d|1|0.500000|0|0.000000|1.000000||cpu=0,mem=0,energy=0,node=0,billing=0,fs/disk=0,vmem=0,pages=0,gres/gpu=0
  m2d-ann-3||1|0.500000|7260|0.250000||gres/gpu=600|cpu=121,mem=192,energy=0,node=0,billing=121,gres/gpu=42
   m2d-ann-3|m2d-job|1|1.000000|7260|0.250000|0.333333||cpu=121,mem=192,energy=0,node=0,billing=121,gres/gpu=42
 testacct||1|0.333333|1|0.000000|||cpu=0,mem=192,energy=0,node=0,billing=0,fs/disk=0,vmem=0,pages=0,gres/gpu=0
  testacct|m2d-job|1|0.500000|1|0.000000|1.000000||cpu=0,mem=192,energy=0,node=0,billing=0,fs/disk=0
"""

# `sacctmgr -n -P show assoc format=Account,User,ParentName,MaxJobs,MaxSubmit,GrpTRESMins,MaxWall,QOS`
ASSOCIATIONS = """\
m2d||root|||||m2d,normal
m2d-ann-3||m2d|1|10|gres/gpu=600|01:00:00|m2d,normal
m2d-ann-3|m2d-job||1|10||01:00:00|m2d,normal
m2d-bob-4||m2d|0|0|||m2d,normal
"""

# sbatch as the job user, an account at its MaxSubmitJobs
REFUSED = ("sbatch: error: AssocMaxSubmitJobLimit\n"
           "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy "
           "(job submit limit, user's size and/or time limits)\n")


def test_sshare_gives_each_accounts_usage_and_its_job_users_fair_share_factor():
    shares = parse_sshare(SSHARE, job_user="m2d-job")
    ann = shares["m2d-ann-3"]
    assert ann.raw_usage == 7260 and ann.effective_usage == 0.25 and ann.fair_share == pytest.approx(0.333333)
    assert ann.gpu_minutes_used == 42 and ann.gpu_minutes_limit == 600 and ann.cpu_minutes_used == 121
    assert shares["testacct"].fair_share == 1.0 and shares["testacct"].gpu_minutes_limit is None
    assert set(shares) == {"root", "m2d", "m2d-ann-3", "testacct"}  # indentation gone


def test_an_unreadable_sshare_line_is_an_error():
    with pytest.raises(ValueError):
        parse_sshare("m2d-ann-3|m2d-job|1\n")
    with pytest.raises(ValueError):
        parse_tres("cpu=lots")


def test_associations_show_limits_and_a_disabled_account():
    rows = parse_associations(ASSOCIATIONS)
    ann = next(r for r in rows if r.account == "m2d-ann-3" and not r.user)
    assert (ann.parent, ann.max_jobs, ann.max_submit, ann.grp_tres_mins, ann.max_wall) == \
        ("m2d", 1, 10, {"gres/gpu": 600}, "01:00:00")
    assert rows[0].max_jobs is None and not rows[0].disabled
    assert next(r for r in rows if r.account == "m2d-bob-4").disabled


def test_sreport_rows_become_minutes_per_account_and_tres():
    rows = parse_sreport("testbed|m2d-ann-3|||cpu|121\ntestbed|m2d-ann-3|m2d-job|M2D Job|gres/gpu|42\n")
    assert [(r.account, r.user, r.tres, r.minutes) for r in rows] == [
        ("m2d-ann-3", "", "cpu", 121), ("m2d-ann-3", "m2d-job", "gres/gpu", 42)]
    with pytest.raises(ValueError):
        parse_sreport("Cluster|Account|Login|Proper Name|TRES Name|Used\n")  # the header: -n was missing


def test_limits_from_configuration_become_sacctmgr_words_and_zero_means_none():
    limits = AccountLimits.from_config({"SLURM_MAX_RUNNING": 2, "SLURM_MAX_QUEUED": 0, "SLURM_GPU_MINUTES": 600,
                                 "SLURM_MAX_WALL": ""})
    assert limits == AccountLimits(max_running=2, gpu_minutes=600)
    assert limits.settings() == ["MaxJobs=2", "MaxSubmitJobs=-1", "GrpTRESMins=gres/gpu=600", "MaxWall=-1"]
    assert limits.settings_for_add() == ["MaxJobs=2", "GrpTRESMins=gres/gpu=600"]


class RecordingBatch:
    """sacctmgr's answers for the account-management calls, and what was asked."""
    job_user = "m2d-job"

    def __init__(self, existing=""):
        self.existing, self.calls = existing, []

    def run(self, name, args):
        self.calls.append([name, *args])
        stdout = self.existing if "show" in args else ""
        return subprocess.CompletedProcess([name, *args], 0, stdout, "")


def test_ensure_adds_the_account_and_the_job_user_once():
    batch = RecordingBatch()
    slurm = SlurmAccounts(batch, job_user="m2d-job", limits=AccountLimits(max_running=1))
    assert slurm.ensure("m2d-ann-3")
    adds = [c for c in batch.calls if "add" in c]
    assert adds[0][4:7] == ["add", "account", "m2d-ann-3"] and "parent=m2d" in adds[0] and "MaxJobs=1" in adds[0]
    assert adds[1][4:] == ["add", "user", "m2d-job", "account=m2d-ann-3"]
    existing = RecordingBatch(ASSOCIATIONS)
    assert not SlurmAccounts(existing, job_user="m2d-job").ensure("m2d-ann-3")
    assert len(existing.calls) == 1  # one query before each sbatch, nothing added


class LaggingBatch(RecordingBatch):
    """slurmdbd losing a just-added account ``misses`` times (its deadlock
    retries): the user's add says it does not exist, and the next query does
    not show it."""

    def __init__(self, misses):
        super().__init__()
        self.misses = misses

    def run(self, name, args):
        if "user" in args and "add" in args and self.misses:
            self.calls.append([name, *args])
            self.misses -= 1
            raise SlurmError("sacctmgr failed (exit 1)", cmd=[name, *args], returncode=1,
                             stderr=" This account 'm2d-ann-3' doesn't exist.\n")
        return super().run(name, args)


def test_a_lost_new_account_is_added_again_before_its_job_user(monkeypatch):
    monkeypatch.setattr("gateway.adapters.slurm.accounting.time.sleep", lambda seconds: None)
    batch = LaggingBatch(misses=2)
    assert SlurmAccounts(batch, job_user="m2d-job").ensure("m2d-ann-3")
    adds = [c[4:6] for c in batch.calls if "add" in c]
    assert adds == [["add", "account"], ["add", "user"]] * 3  # looked again, added again, then the user
    never = LaggingBatch(misses=99)
    with pytest.raises(SlurmError, match="exit 1"):
        SlurmAccounts(never, job_user="m2d-job").ensure("m2d-ann-3")
    assert sum("user" in c for c in never.calls if "add" in c) == 6


def test_account_names_are_checked_before_they_reach_a_command_line():
    slurm = SlurmAccounts(RecordingBatch())
    assert slurm.name_for("Ann-3") == "m2d-ann-3"
    for bad in ("m2d-ann 3", "m2d-ann,root", "-a"):
        with pytest.raises(ValueError):
            slurm.ensure(bad)


@pytest.mark.parametrize(("code", "words"), [
    ("AssocMaxJobsLimit", "waiting: you have 2 jobs running, the limit is 2 (AssocMaxJobsLimit)"),
    ("Priority", "waiting: jobs with a higher priority go first (fair share: researchers who used less "
                 "recently start first) (Priority)"),
    ("Resources", "waiting for the GPUs, CPUs or memory it asked for to become free (Resources)"),
    ("AssocGrpGRESMinutes", "waiting: you have used your budget of 600 GPU minutes for this period; it starts "
                            "when the budget is renewed or an admin raises it (AssocGrpGRESMinutes)"),
    ("QOSMaxJobsPerAccount", "waiting: you have 2 jobs running, as many as your QOS allows (QOSMaxJobsPerAccount)"),
    ("QOSMaxGRESMinutesPerAccount", "waiting: you have used your budget of 600 GPU minutes for this period; it "
                                    "starts when the budget is renewed or an admin raises it "
                                    "(QOSMaxGRESMinutesPerAccount)"),
    ("JobHeldAdmin", "held by an admin: it starts when they release it (JobHeldAdmin)"),
    ("AssocGrpNodeLimit", "waiting: a limit of your account holds it (AssocGrpNodeLimit)"),
    ("Cleaning", "waiting (Cleaning)"),
    ("None", None),
    ("", None),
])
def test_slurms_reason_codes_in_a_researchers_words(code, words):
    assert explain(code, AccountLimits(max_running=2, gpu_minutes=600), running=2) == words


def test_a_disabled_accounts_limit_of_zero_says_the_account_is_disabled():
    assert explain("AssocMaxJobsLimit", AccountLimits(max_running=1), running=0, disabled=True) == \
        "waiting: your account is disabled; no job of yours starts (AssocMaxJobsLimit)"
    assert explain("AssocMaxJobsLimit", running=1) == \
        "waiting: you have 1 job running, that is your limit (AssocMaxJobsLimit)"


def test_an_sbatch_refused_for_a_limit_is_told_from_other_failures():
    assert refusal_code(REFUSED) == "AssocMaxSubmitJobLimit"
    assert refusal(REFUSED, AccountLimits(max_queued=3)) == \
        "Slurm refused the job: you have 3 jobs running or waiting, the limit is 3 (AssocMaxSubmitJobLimit)"
    assert refusal_code("sbatch: error: Batch job submission failed: Invalid account or account/partition "
                        "combination specified") == "InvalidAccount"
    assert refusal_code("sbatch: error: Batch job submission failed: Unable to contact slurm controller") is None


def test_a_refused_sbatch_is_a_slurm_refusal_carrying_the_code(tmp_path):
    (tmp_path / "refusal.txt").write_text(REFUSED)
    (tmp_path / "sbatch").write_text(f"#!/bin/sh\ncat {tmp_path / 'refusal.txt'} >&2\nexit 1\n")
    (tmp_path / "sbatch").chmod(0o755)
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\ntrue\n")
    with pytest.raises(SlurmRefused) as refused:
        CliScheduler(bin_dir=tmp_path).submit(script, "m2d-1", account="m2d-ann-3")
    assert refused.value.code == "AssocMaxSubmitJobLimit" and "Job violates" in refused.value.stderr
    (tmp_path / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: Unable to contact slurm controller' >&2\n"
                                     "exit 1\n")
    with pytest.raises(SlurmError) as failed:
        CliScheduler(bin_dir=tmp_path).submit(script, "m2d-1")
    assert not isinstance(failed.value, SlurmRefused)  # retried by rq, not failed at once


# ------------------------------------------------------------- the real stack

RUNNING_LIMIT = 1
SLEEP_S = 6
LONG_SLEEP_S = 75


@pytest.fixture(scope="module")
def fair_stack(testbed):
    """A stack of its own: one running job per researcher, jobs without GPUs
    (the testbed's single fake GPU would serialise everyone), no dry runs."""
    running = Stack(M2D_SLURM_MAX_RUNNING=str(RUNNING_LIMIT), M2D_SLURM_GPUS="0", M2D_DRY_RUN="0",
                    M2D_USAGE_CACHE_SECONDS="0").start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def sleeper_zip(tmp_path_factory):
    """A job that sleeps a few seconds, on the base image's Python alone
    (one environment image, built once and then reused by every run)."""
    folder = tmp_path_factory.mktemp("fair")
    for name, seconds in (("long.zip", LONG_SLEEP_S), ("sleeper.zip", SLEEP_S)):
        zip_folder(SAMPLES / "sleeps", folder / name, extra={
            "main.py": f"import time\nprint('sleeping', flush=True)\ntime.sleep({seconds})\n",
            "requirements.txt": "# nothing beyond the base image\n"})
    return folder / "sleeper.zip"


def slurm(*args):
    return subprocess.run(list(args), capture_output=True, text=True, check=True, timeout=60).stdout


def sacct_jobs(account):
    """{job id: (state, start, node)} of ``account``'s jobs today, from sacct -A;
    node is None for a job never given one (it never ran). A pending job's Start
    may be the backfill scheduler's estimate, which sacct keeps when the job is
    cancelled before it starts: only the node says whether it ran."""
    out = slurm("sacct", "-X", "-n", "-P", "-A", account, "-S", "now-1days", "-E", "now",
                "-o", "JobIDRaw,Account,State,Start,NodeList")
    return {job: (state, None if start in ("None", "Unknown") else start, None if node == "None assigned" else node)
            for job, acct, state, start, node in (line.split("|") for line in out.splitlines() if line.strip())
            if acct == account}


def association_rows(account):
    return [line for line in slurm("sacctmgr", "-n", "-P", "show", "assoc", "where", f"account={account}",
                                   "format=Account,User,MaxJobs,MaxSubmit").splitlines() if line.strip()]


def account_of(researcher):
    return researcher.api("GET", "/usage").json()["account"]


def page_as(stack, address, path):
    """``path`` as the user ``address`` sees it (the stack's app, in-process, logged in)."""
    app = create_app(from_environment(stack.env))
    with app.app_context():
        user = User.query.filter_by(email=address).one()
        client = app.test_client()
        with client.session_transaction() as session:
            session["_user_id"], session["_fresh"] = user.get_id(), True
        response = client.get(path)
        db.session.remove()
    assert response.status_code == 200, response.text
    return response.text


def admin_page(stack, path):
    address = f"admin-{uuid.uuid4().hex[:8]}@example.org"
    stack.flask("users", "create", address, "--name", "Admin", "--admin", "--approve")
    return page_as(stack, address, path)


def test_one_researchers_five_jobs_do_not_keep_anothers_waiting(fair_stack, sleeper_zip, tmp_path):
    a, b = fair_stack.researcher("fair-a"), fair_stack.researcher("fair-b")
    account_a, account_b = account_of(a), account_of(b)
    assert account_a.startswith("m2d-fair-a-") and account_b.startswith("m2d-fair-b-")

    # A's first job runs past a fair-share recomputation (PriorityCalcPeriod=1 minute): from then
    # on A's usage puts A's waiting jobs behind B's, as it would a heavy user's on a real cluster
    first = a.submit(sleeper_zip.with_name("long.zip"))
    a.wait_until(first, "running", timeout=600)
    theirs = [first] + [a.submit(sleeper_zip) for _ in range(4)]
    mine = b.submit(sleeper_zip)

    # A's waiting jobs say why, in words and in Slurm's code, in the API and in `m2d status`
    def a_waits_for_the_limit():
        for submission_id in theirs:
            s = a.submission(submission_id)
            if s["status"] == "queued" and "AssocMaxJobsLimit" in (s["reason"] or ""):
                return s
        return None
    waiting = wait_for(a_waits_for_the_limit, 600, "one of A's jobs to wait for A's running-job limit")
    assert f"the limit is {RUNNING_LIMIT}" in waiting["reason"] and waiting["reason"].startswith("waiting: you have")
    shown = m2d("status", waiting["id"], env={"M2D_URL": fair_stack.url, "M2D_TOKEN": a.token}, cwd=tmp_path)
    assert shown.returncode == 0 and "AssocMaxJobsLimit" in shown.stdout, shown.stdout + shown.stderr
    assert waiting["reason"] in page_as(fair_stack, a.address, f"/submissions/{waiting['id']}")  # its status page

    for submission_id in theirs:
        assert a.wait_until(submission_id, {"completed", "failed", "cancelled"}, timeout=900)["status"] == "completed"
    assert b.wait_until(mine, {"completed", "failed", "cancelled"}, timeout=900)["status"] == "completed"
    # the reason went away once it ran
    assert all(a.submission(i)["reason"] == "COMPLETED" for i in theirs)

    # Slurm charged each job to its researcher's account (sacct -A)
    jobs_a, jobs_b = sacct_jobs(account_a), sacct_jobs(account_b)
    assert sorted(jobs_a) == sorted(a.submission(i)["slurm_job_id"] for i in theirs)
    assert list(jobs_b) == [b.submission(mine)["slurm_job_id"]]
    # fair share, not FIFO: B's job, queued after all five of A's, started before A's last four
    starts_a = sorted(start for _state, start, _node in jobs_a.values())
    (start_b,) = [start for _state, start, _node in jobs_b.values()]
    assert start_b < starts_a[1], (start_b, starts_a)

    # usage under each account: sshare now (recomputed each minute), and to each researcher
    def used():
        shares = SlurmAccounts(job_user="m2d-job").shares()
        return all(shares.get(acct) and shares[acct].raw_usage > 0 for acct in (account_a, account_b)) and shares
    shares = wait_for(used, 150, "sshare to count both accounts' usage", interval=5)
    assert shares[account_a].raw_usage > shares[account_b].raw_usage  # five jobs against one
    mine_usage = b.api("GET", "/usage").json()
    assert mine_usage["account"] == account_b and mine_usage["limits"]["max_running"] == RUNNING_LIMIT
    assert mine_usage["usage"]["raw_usage"] > 0
    told = m2d("usage", env={"M2D_URL": fair_stack.url, "M2D_TOKEN": b.token}, cwd=tmp_path)
    assert told.returncode == 0 and f"Slurm account {account_b}" in told.stdout, told.stdout + told.stderr
    assert "jobs running at once: 1" in told.stdout
    assert account_b in page_as(fair_stack, b.address, "/account")
    # the admins' view: every researcher's account, usage and fair-share factor
    table = fair_stack.flask("slurm", "usage")
    assert account_a in table and account_b in table and "max_running=1" in table
    page = admin_page(fair_stack, "/admin/usage")
    assert f'id="account-{account_a}"' in page and f'id="account-{account_b}"' in page and "Fair-share factor" in page
    # sreport has each account's CPU time at once in its job report (the job records, not the hourly
    # rollups), for windows that start in the hour asked for: each hour the jobs ran in (these ask no GPU)
    cpu = {}
    for hour in sorted({start[:13] for _state, start, _node in [*jobs_a.values(), *jobs_b.values()]}):
        report = slurm("sreport", "-n", "-P", "-t", "seconds", "-T", "cpu", "job", "SizesByAccount", "FlatView",
                       "Grouping=1000000", f"accounts={account_a},{account_b}", f"start={hour}:00:00",
                       f"end={hour}:59:59")
        for _cluster, account, seconds, *_larger_jobs_and_share in (
                line.split("|") for line in report.splitlines() if line.strip()):
            cpu[account] = cpu.get(account, 0) + int(seconds)
    assert cpu.keys() == {account_a, account_b} and cpu[account_a] > cpu[account_b] > 0, cpu


def refused_by_slurm(account):
    """sbatch's error when Slurm refuses a job of ``account``, once slurmdbd's association
    update has reached slurmctld (a moment after sacctmgr, longer on a loaded machine;
    up to a minute); a job it accepted before that is cancelled at once."""
    def tried():
        done = subprocess.run(["sudo", "-n", "-u", "m2d-job", "sbatch", "--parsable", "--hold",
                               f"--account={account}", "-o", "/dev/null", "--wrap", "true"],
                              capture_output=True, text=True, timeout=60, cwd="/tmp")
        if done.returncode == 0:
            slurm("scancel", done.stdout.strip().split(";")[0])
            return False
        return done.stderr
    return wait_for(tried, 60, f"Slurm to refuse jobs of {account}", interval=2)


def test_disabling_a_researcher_stops_their_waiting_jobs_from_starting(fair_stack, sleeper_zip):
    a = fair_stack.researcher("fair-off")
    account = account_of(a)
    first = a.submit(sleeper_zip.with_name("long.zip"))
    a.wait_until(first, "running", timeout=600)
    ids = [first] + [a.submit(sleeper_zip) for _ in range(2)]  # they wait behind it (one running job per account)
    wait_for(lambda: all(a.submission(i)["slurm_job_id"] for i in ids), 300, "all three to be in Slurm")
    job_ids = [a.submission(i)["slurm_job_id"] for i in ids]
    fair_stack.flask("users", "disable", a.address)
    # Slurm holds the account (history kept): nothing more of it runs or queues
    assert any(row.endswith("|0|0") for row in association_rows(account)), association_rows(account)

    def ended():
        jobs = sacct_jobs(account)
        return all(base_state(jobs.get(j, ("PENDING", None))[0]) in TERMINAL_STATES for j in job_ids) and jobs
    jobs = wait_for(ended, 300, "the disabled researcher's jobs to end", interval=2)
    for job_id in job_ids[1:]:  # queued behind the running one: never started, though it ended
        state, _start, node = jobs[job_id]
        assert state.startswith("CANCELLED") and node is None, jobs
    # an sbatch of its account now is refused by Slurm itself
    assert "AssocMaxSubmitJobLimit" in refused_by_slurm(account), association_rows(account)
    # the gateway recorded the end of each (the researcher cannot look: disabled)
    with create_app(from_environment(fair_stack.env)).app_context():
        def statuses():
            db.session.expire_all()
            return [db.session.get(Submission, i).state for i in ids]
        wait_for(lambda: all(status.terminal for status in statuses()), 120, "the gateway to record the cancels")
        assert [status.value for status in statuses()[1:]] == ["cancelled", "cancelled"]
        db.session.remove()
    fair_stack.flask("users", "enable", a.address)
    assert not any(row.endswith("|0|0") for row in association_rows(account))


def test_accounts_survive_a_restart_and_reapproval_makes_nothing_twice(fair_stack):
    a = fair_stack.researcher("fair-again")
    account = account_of(a)
    before = association_rows(account)
    assert len(before) == 2  # the account, and the job user in it
    fair_stack.restart()
    for _ in range(2):
        fair_stack.flask("users", "approve", a.address)
    fair_stack.flask("slurm", "sync")
    assert association_rows(account) == before
    assert len([line for line in slurm("sacctmgr", "-n", "-P", "show", "account", "format=Account").splitlines()
                if line.strip() == account]) == 1
    assert a.api("GET", "/usage").json()["account"] == account


def test_accounts_added_by_four_workers_at_once_all_exist_with_their_job_user(testbed):
    """Four approvals at the same moment (four workers, four test stacks), six
    times: unserialised, slurmdbd 22.05 lost most accounts of such a burst,
    some for good."""
    tag, workers, rounds = uuid.uuid4().hex[:6], 4, 6
    start, refused = threading.Barrier(workers), []

    def add(worker):
        accounts = SlurmAccounts(job_user="m2d-job")
        for burst in range(rounds):
            start.wait(timeout=120)
            try:
                accounts.ensure(f"m2d-burst-{tag}-{burst}x{worker}")
            except SlurmError as e:
                refused.append(str(e))

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(add, range(workers)))
    assert not refused
    for burst in range(rounds):
        for worker in range(workers):
            name = f"m2d-burst-{tag}-{burst}x{worker}"
            assert sorted(row.split("|")[1] for row in association_rows(name)) == ["", "m2d-job"], name


def test_a_submission_over_the_queued_limit_fails_at_once_with_slurms_message(fair_stack, sleeper_zip):
    a = fair_stack.researcher("fair-full")
    account = account_of(a)
    # an admin's own limit for this one account, set with Slurm's own tool
    slurm("sacctmgr", "-i", "modify", "account", "where", f"name={account}", "set", "MaxSubmitJobs=1")
    first = a.submit(sleeper_zip.with_name("long.zip"))
    a.wait_until(first, "running", timeout=600)
    refused_by_slurm(account)  # the limit has reached slurmctld
    second = a.wait_until(a.submit(sleeper_zip), {"queued", "running", "completed", "failed", "cancelled"},
                          timeout=600)
    assert second["status"] == "failed" and second["slurm_job_id"] is None, second
    assert second["reason"].startswith("Slurm refused the job: ") and "AssocMaxSubmitJobLimit" in second["reason"]
    assert "Job violates accounting/QOS policy" in second["error"]
    assert a.api("POST", f"/submissions/{first}/cancel").status_code == 202
    assert a.wait_until(first, {"completed", "failed", "cancelled"}, timeout=120)["status"] == "cancelled"
    fair_stack.flask("slurm", "sync")  # the configured limits again: none on queued jobs
    assert [row.split("|")[3] for row in association_rows(account)] == ["", ""]


def test_a_stuck_alert_about_a_job_held_at_a_limit_says_why_it_waits(local_app):
    from datetime import timedelta

    from gateway.core import alerts
    from gateway.core.models import Alert, utcnow

    user = User(email="ann@example.org", name="Ann")
    reason = "waiting: you have 1 job running, the limit is 1 (AssocMaxJobsLimit)"
    db.session.add(Submission(user=user, filename="a.zip", status="queued", slurm_job_id="7", reason=reason,
                              updated_at=utcnow() - timedelta(days=2)))
    db.session.commit()
    assert alerts.raise_stuck() == 1
    assert Alert.query.one().detail.endswith(f"; Slurm: {reason}")
