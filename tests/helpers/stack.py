"""The gateway's whole stack for tests: real processes against the testbed.

The testbed (Slurm, Apptainer, Redis, MLflow, the SMTP sink) is started by
`make test` through deploy/testbed/up.sh; this module starts the gateway's own
processes (gunicorn, rq workers, poller) with a private database, data folder
and queue namespace, and stops them by process group when the session ends.
"""
import email
import email.policy
import os
import pwd
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter

from m2d.client import READ_RETRIES

from .admin import AdminShell

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "tests" / "samples"
TESTBED_KEYS = ("M2D_TESTBED_DIR", "SLURM_CONF", "M2D_APPTAINER", "M2D_BASE_IMAGE", "M2D_IMAGE_DIR",
                "M2D_DATASET_DIR", "M2D_REDIS_URL", "M2D_MLFLOW_URL", "M2D_MLFLOW_ADMIN_PASSWORD",
                "M2D_SMTP_PORT", "M2D_MAIL_DIR")


def _stat_of(pid):
    """/proc/PID/stat's fields after "pid (comm) " (comm may hold spaces):
    [2] is the process group, [19] the start time in clock ticks since boot."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2:].split()


def _processes_in_group(group):
    """The processes in process group ``group`` now, each as (pid, start
    time): the pair names one process for good."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_of(entry.name)
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == group:
            found.append((int(entry.name), fields[19]))
    return found


def left_in_group(pid):
    """The other processes of ``pid``'s group, as (pid, start time): what a
    ``kill -9`` of ``pid`` alone leaves behind."""
    return [member for member in _processes_in_group(os.getpgid(pid)) if member[0] != pid]


def kill_processes(processes):
    """SIGKILL each (pid, start time) that is still that same process.

    Not killpg of the group a killed process left: once its last member is
    gone the number is free, and pids wrap within minutes in the parallel
    suite (pid_max 32768). A Slurm job's batch shell leads a group of its own
    and can get such a number (CI's dry run that died FAILED 0:9, its log cut
    short, fits that)."""
    for pid, started in processes:
        try:
            if _stat_of(pid)[19] == started:
                os.kill(pid, signal.SIGKILL)
        except (OSError, IndexError):  # ended by itself
            pass


def require_testbed():
    """The testbed's settings, or an error that says how to get them."""
    missing = [k for k in TESTBED_KEYS if not os.environ.get(k)]
    if missing:
        raise RuntimeError(
            f"the testbed's settings are missing ({', '.join(missing)}). Run the suite with "
            "`make test`, which starts the testbed and sources its gateway.env.")
    return {k: os.environ[k] for k in TESTBED_KEYS}


def wait_for(predicate, timeout, what, interval=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def free_port(within=None):
    """A port nothing listens on; ``within`` "LOW-HIGH": one of those (free on every address)."""
    if not within:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    low, high = (int(n) for n in within.split("-"))
    for port in random.sample(range(low, high + 1), high + 1 - low):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {within}")


def zip_folder(folder, dest, extra=None):
    """Zip a sample folder (files at the root), optionally replacing files."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(Path(folder).iterdir()):
            if extra and path.name in extra:
                continue
            zf.write(path, path.name)
        for name, text in (extra or {}).items():
            zf.writestr(name, text)
    return dest


# The gateway's processes run as its service account, as in production
# (deploy/testbed/accounts.sh makes it); the tests themselves run as root.
GATEWAY_USER = os.environ.get("M2D_USER", "m2d")
AS_GATEWAY = ["setpriv", f"--reuid={GATEWAY_USER}", f"--regid={GATEWAY_USER}", "--init-groups", "--"]


def events_dir():
    """Where the testbed's Slurm hook finds the gateways to tell of job events (deploy/testbed/slurm.sh)."""
    return Path(os.environ["M2D_TESTBED_DIR"]) / "slurm" / "events.d"


def mail_cutoff() -> str:
    """The SMTP sink names each message by its UTC arrival (deploy/testbed/smtp_sink.py):
    names older than a stack's start are other sessions' mail, never that stack's."""
    return (datetime.now(timezone.utc) - timedelta(seconds=5)).strftime("%Y%m%dT%H%M%S.%fZ")


class Stack:
    admin_in_one_process = True  # (tests/helpers/admin.py)
    admin = None

    def __init__(self, events=False, **settings):
        """``settings``: extra M2D_* values (``M2D_SQLALCHEMY_DATABASE_URI``...);
        ``events``: Slurm pushes this stack's job events (the testbed's hook)."""
        require_testbed()
        # under /tmp: the Apptainer wrapper shares /tmp with containers
        self.root = Path(tempfile.mkdtemp(prefix="m2d-test-", dir="/tmp"))
        # the gateway's account owns it; the job account may only pass through
        shutil.chown(self.root, GATEWAY_USER, GATEWAY_USER)
        self.root.chmod(0o711)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ,
                        M2D_DATA_DIR=str(self.root / "data"),
                        M2D_SECRET_KEY=uuid.uuid4().hex,
                        M2D_QUEUE_NAMESPACE=f"m2d-test-{uuid.uuid4().hex[:8]}",
                        M2D_SLURM_JOB_PREFIX=f"m2dtest{uuid.uuid4().hex[:6]}",
                        # each second: at 2 s the tests waited on polls longer than the CPU
                        # it saved gave back (a warm run's parallel part 843 s, 783 s at 1 s)
                        M2D_POLL_INTERVAL="1",
                        M2D_PUBLIC_URL=self.url,
                        M2D_SLURM_MEM="2G",  # the CLaM sample (torch, ResNet-18) came within 1G and was killed
                        M2D_MAX_ZIP_BYTES=str(8 * 1024**2),  # small, so the 413 test is quick
                        M2D_SLURM_TIME="00:10:00",
                        # a loaded test machine may take seconds to run scontrol ping
                        M2D_HEALTH_TIMEOUT="10",
                        # released without a disclosure report: its report jobs are proven by
                        # tests/test_disclosure_flow.py's own stack (M2D_DISCLOSURE_REPORTS=1)
                        M2D_DISCLOSURE_REPORTS="0",
                        HOME=pwd.getpwnam(GATEWAY_USER).pw_dir,  # apptainer's cache and config
                        PYTHONUNBUFFERED="1")
        if events:
            self.env["M2D_SLURM_EVENTS_TOKEN"] = uuid.uuid4().hex
        self.env.update(settings)
        self.events_conf = events_dir() / f"{self.env['M2D_SLURM_JOB_PREFIX']}.curl" if events else None
        self.mail_since = mail_cutoff()
        self.logs = self.root / "logs"
        self.logs.mkdir()
        self.procs = {}
        self.argv = {}
        self.orphans = []  # what processes ended by kill() left in their groups (rq's scheduler)

    def start(self):
        self.flask("db", "upgrade")
        if self.events_conf:
            self.register_events()
        py = sys.executable
        # threads: a browser's idle preconnections would hold sync workers hostage
        self._spawn("web", [str(Path(py).parent / "gunicorn"), "--workers", "2", "--threads", "8", "--bind",
                            f"127.0.0.1:{self.port}", "--timeout", "300", "gateway:create_app()"])
        # two build workers, so simultaneous submissions really build at once
        self._spawn("worker-build-1", [py, "-m", "jobs.worker", "build"])
        self._spawn("worker-build-2", [py, "-m", "jobs.worker", "build"])
        self._spawn("worker-mail", [py, "-m", "jobs.worker", "mail"])
        self._spawn("worker-poll", [py, "-m", "jobs.worker", "poll"])
        self._spawn("poller", [py, "-m", "jobs.poller"])
        self.health = "no answer"
        try:
            # xdist's workers start their stacks at once, on a machine others share: minutes, seen
            wait_for(self._healthy, 300, "the gateway to answer /healthz")
        except AssertionError as e:
            raise AssertionError(f"{e}; it said: {self.health}") from None
        return self

    def restart(self):
        """Stop the gateway's processes and start them again on the same
        database and files (what a deploy or a reboot does)."""
        self._stop_processes()
        self.procs = {}
        return self.start()

    def register_events(self):
        """Have the testbed's Slurm hook post this stack's job events to it."""
        fd = os.open(self.events_conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f'url = "{self.url}/slurm/events"\n'
                    f'header = "Authorization: Bearer {self.env["M2D_SLURM_EVENTS_TOKEN"]}"\n')

    def drop_events(self):
        """Every push from now on is lost (the hook finds no gateway for these jobs)."""
        self.events_conf.unlink(missing_ok=True)

    def stop(self):
        if self.events_conf:
            self.drop_events()
        self._stop_processes()
        if os.environ.get("M2D_KEEP_TEST_DATA") != "1":
            shutil.rmtree(self.root, ignore_errors=True)

    def _stop_processes(self):
        if self.admin is not None:
            self.admin.close()
            self.admin = None
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        kill_processes(self.orphans)

    def _spawn(self, name, argv):
        log = open(self.logs / f"{name}.log", "ab")
        self.argv[name] = argv
        self.procs[name] = subprocess.Popen([*AS_GATEWAY, *argv], cwd=REPO, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    # --------------------------------------------------------------- faults
    def kill(self, name):
        """``kill -9`` of the one process (not its group), as the OOM killer does."""
        proc = self.procs[name]
        self.orphans += left_in_group(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def respawn(self, name):
        """Start a process again, as systemd's Restart=on-failure would."""
        self._spawn(name, self.argv[name])

    def respawn_dead(self):
        """Start again every process that died (systemd's Restart=on-failure); their names."""
        dead = [name for name, proc in self.procs.items() if proc.poll() is not None]
        for name in dead:
            self.respawn(name)
        return dead

    def horse(self, name, timeout=60):
        """The pid of the rq work horse ``name`` runs a task in: its child in a
        process group of its own (rq's scheduler child stays in the worker's)."""
        return self.any_horse([name], timeout)[1]

    def running_horses(self, name):
        """The pids of the tasks worker ``name`` runs now (rq's work horses)."""
        return _own_group_children(self.procs[name].pid)

    def task_of(self, name):
        """The task (``jobs.tasks.poll``...) worker ``name`` runs now, from Redis; None if none."""
        from redis import Redis
        from rq import Worker
        from rq.exceptions import NoSuchJobError
        from rq.job import Job
        from rq.serializers import JSONSerializer
        with Redis.from_url(self.env["M2D_REDIS_URL"]) as redis:
            for worker in Worker.all(connection=redis):
                if worker.pid == self.procs[name].pid and (job_id := worker.get_current_job_id()):
                    try:
                        return Job.fetch(job_id, connection=redis, serializer=JSONSerializer).func_name
                    except NoSuchJobError:
                        return None
        return None

    def horse_running(self, name, task, timeout=60):
        """The pid of worker ``name``'s horse while it runs ``task`` (a forking worker's)."""
        def found():
            horses = self.running_horses(name)
            return horses[0] if horses and self.task_of(name) == f"jobs.tasks.{task}" else None
        return wait_for(found, timeout, f"{name} to run a {task} task", interval=0.02)

    def running(self, name, task, timeout=60):
        """Wait until worker ``name`` runs ``task`` in its own process (the poll
        worker: jobs/worker.py)."""
        wait_for(lambda: self.task_of(name) == f"jobs.tasks.{task}", timeout, f"{name} to run a {task} task",
                 interval=0.02)

    def any_horse(self, names, timeout=60):
        """(name, pid) of the first of the workers ``names`` seen running a task."""
        def running():
            for name in names:
                for pid in _own_group_children(self.procs[name].pid):
                    return name, pid
            return None
        return wait_for(running, timeout, f"one of {names} to start a task", interval=0.01)

    def web_worker_reading_upload(self, timeout=60):
        """The gunicorn worker that has an upload open in incoming/ (the
        request parser's anonymous file)."""
        incoming = str(Path(self.env["M2D_DATA_DIR"]) / "incoming") + "/"

        def reading():
            for pid in _children(self.procs["web"].pid):
                for fd in Path(f"/proc/{pid}/fd").glob("*"):
                    try:
                        if os.readlink(fd).startswith(incoming):
                            return pid
                    except OSError:
                        continue
            return None
        return wait_for(reading, timeout, "a web worker to be reading an upload", interval=0.02)

    def _healthy(self):
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {(self.logs / f'{name}.log').read_text()[-3000:]}")
        try:
            response = requests.get(f"{self.url}/healthz", timeout=30)
        except (requests.ConnectionError, requests.Timeout):  # a loaded machine: still booting
            return False
        self.health = response.text  # which part is down, if one is
        return response.ok

    # ----------------------------------------------------------------- admin
    def flask(self, *args, env=None):
        """Run an admin command exactly as an admin would; its output."""
        result = self.flask_result(*args, env=env)
        if result.returncode != 0:
            raise AssertionError(f"flask {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def flask_result(self, *args, env=None):
        """The admin command's finished process (``env``: settings for this run
        only, in a `flask` process of its own; else the stack's admin process,
        which is made again when the stack's settings changed)."""
        if env is None and self.admin_in_one_process:
            if self.admin is not None and self.admin.env != self.env:
                self.admin.close()
                self.admin = None
            if self.admin is None:
                self.admin = AdminShell(AS_GATEWAY, self.env, REPO, self.logs / "admin.log")
            return self.admin.run(args)
        return subprocess.run([*AS_GATEWAY, sys.executable, "-m", "flask", "--app", "gateway", *args],
                              cwd=REPO, env=self.env | (env or {}), capture_output=True, text=True, timeout=120)

    def researcher(self, name="researcher", approve=True, password=None, dry_run=True):
        """A new user (unique email) with an API token; ``dry_run=False``:
        their submissions skip the dry run (tests of the real job alone)."""
        address = f"{name}-{uuid.uuid4().hex[:8]}@example.org"
        self.flask("users", "create", address, "--name", name.title(),
                   *(["--approve"] if approve else []),
                   *(["--password", password] if password else []))
        if not dry_run:
            self.flask("users", "dry-run", address, "--skip")
        token = self.flask("tokens", "create", address).strip().splitlines()[-1]
        return Researcher(self, address, token)

    # ------------------------------------------------------------------ mail
    def mails(self):
        """Every message the SMTP sink received since this stack began, in
        arrival order. The testbed's sink is shared by every session (and each
        xdist worker): a message file never changes once there, so each is read
        once, and other sessions' older ones not at all."""
        names = sorted(name for name in os.listdir(self.env["M2D_MAIL_DIR"])
                       if name.endswith(".eml") and name >= self.mail_since)
        return [_mail(Path(self.env["M2D_MAIL_DIR"]) / name) for name in names]

    def mails_to(self, address):
        """Messages the SMTP sink received for ``address``, in arrival order."""
        return [message for message in self.mails() if message["To"] == address]


class Researcher:
    def __init__(self, stack, address, token):
        self.stack, self.address, self.token = stack, address, token
        self.url = stack.url  # or a proxy in front of it (tests/helpers/nginx.py)
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        # a read that meets a kept-alive connection gunicorn closed meanwhile is asked
        # again, as the m2d client asks it (a loaded run lost a module's setup to one)
        for scheme in ("http://", "https://"):
            self.session.mount(scheme, HTTPAdapter(max_retries=READ_RETRIES))

    def api(self, method, path, **kwargs):
        return self.session.request(method, f"{self.url}/api/v1{path}", timeout=60, **kwargs)

    def upload(self, zip_path):
        with open(zip_path, "rb") as f:
            return self.api("POST", "/submissions", files={"file": (Path(zip_path).name, f)})

    def submit(self, zip_path):
        response = self.upload(zip_path)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def submission(self, submission_id):
        response = self.api("GET", f"/submissions/{submission_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_until(self, submission_id, statuses, timeout=900):
        statuses = {statuses} if isinstance(statuses, str) else set(statuses)
        return wait_for(lambda: (s := self.submission(submission_id))["status"] in statuses and s,
                        timeout, f"submission {submission_id} to reach {statuses}", interval=1)

    def mails(self, submission_id=None):
        found = self.stack.mails_to(self.address)
        if submission_id is not None:
            found = [m for m in found if f"Submission {submission_id}:" in m["Subject"]]
        return found

    def wait_for_mails(self, submission_id, count, timeout=60):
        return wait_for(lambda: len(m := self.mails(submission_id)) >= count and m, timeout,
                        f"{count} emails for submission {submission_id}")

    def me(self):
        return self.api("GET", "/me").json()


_parsed_mails = {}


def _mail(path):
    """The message in ``path``, parsed once (the sink writes each file whole, once)."""
    if path not in _parsed_mails:
        _parsed_mails[path] = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    return _parsed_mails[path]


def _children(pid):
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _own_group_children(pid):
    """Children of ``pid`` that lead a process group of their own (rq's horses call setpgrp)."""
    found = []
    for child in _children(pid):
        try:
            if os.getpgid(child) == child:
                found.append(child)
        except ProcessLookupError:
            continue
    return found


# ------------------------------------------------------------ a private stack

class Service:
    """One service process of a private stack (Redis, the SMTP sink), started
    and stopped by pid; a fault test stops, pauses and restarts it."""

    def __init__(self, name, argv, port, log):
        self.name, self.argv, self.port, self.log = name, argv, port, log
        self.proc = None

    def start(self):
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._listening, 30, f"{self.name} to listen on {self.port}", interval=0.1)
        return self

    def _listening(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited: {Path(self.log).read_text()[-2000:]}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused one cannot act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def pause(self):
        """SIGSTOP: the port still accepts connections, nothing answers."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)


class PrivateStack(Stack):
    """A stack with a Redis and an SMTP sink of its own (fault tests stop,
    wipe and pause them; the testbed's are shared with other test runs), on
    the testbed's Slurm, Apptainer and MLflow; its jobs' relays reach MLflow
    through a proxy of its own (``mlflow``), which a test stops to take MLflow
    away from them alone. Recovery settings are short, so faults heal in
    seconds (``settings`` override them)."""

    def __init__(self, **settings):
        require_testbed()
        self.services_dir = Path(tempfile.mkdtemp(prefix="m2d-private-", dir="/tmp"))
        password = uuid.uuid4().hex
        redis_port, smtp_port = free_port(), free_port()
        (self.services_dir / "redis").mkdir()
        self.redis = Service("redis", [
            shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1", "--port", str(redis_port),
            "--requirepass", password, "--save", "", "--appendonly", "no",
            "--dir", str(self.services_dir / "redis")], redis_port, self.services_dir / "redis.log")
        mail_dir = self.services_dir / "mail"
        mlflow = urllib.parse.urlsplit(os.environ["M2D_MLFLOW_URL"])
        # the jobs' relays reach the proxy the way they reach MLflow: on compute nodes
        # of their own (the testbed's namespaced nodes), by this host's address on a
        # port the nodes may reach
        job_host = urllib.parse.urlsplit(os.environ.get("M2D_MLFLOW_JOB_URL") or os.environ["M2D_MLFLOW_URL"]).hostname
        mlflow_port = free_port(os.environ.get("M2D_TESTBED_MLFLOW_PROXY_PORTS"))
        self.mlflow = Service("mlflow-proxy", [
            sys.executable, str(REPO / "tests" / "helpers" / "tcp_proxy.py"), "--listen", str(mlflow_port),
            "--to", f"{mlflow.hostname}:{mlflow.port or 80}", "--host", "127.0.0.1" if job_host == "127.0.0.1" else ""],
            mlflow_port, self.services_dir / "mlflow-proxy.log")
        self.smtp = Service("smtp", [sys.executable, str(REPO / "deploy" / "testbed" / "smtp_sink.py"),
                                     "--dir", str(mail_dir), "--host", "127.0.0.1", "--port", str(smtp_port)],
                            smtp_port, self.services_dir / "smtp.log")
        defaults = {"M2D_REDIS_URL": f"redis://:{password}@127.0.0.1:{redis_port}/0",
                    "M2D_SMTP_HOST": "127.0.0.1", "M2D_SMTP_PORT": str(smtp_port), "M2D_MAIL_DIR": str(mail_dir),
                    "M2D_MLFLOW_JOB_URL": f"http://{job_host}:{mlflow_port}",
                    "M2D_SWEEP_AFTER": "5", "M2D_SMTP_TIMEOUT": "10", "M2D_MAIL_CLAIM_SECONDS": "20",
                    # SMTP back, the owed sends go out within seconds (on a loaded machine the
                    # default's 300 and 900 s waits outlasted the tests' 600 s)
                    "M2D_MAIL_RETRY_SECONDS": "2,5,10,20,30",
                    # Slurm or MLflow back, a refused prepare is tried again within seconds
                    "M2D_PREPARE_RETRY_SECONDS": "2,5,10,20,30"}
        super().__init__(**(defaults | settings))

    def start(self):
        self.redis.start()
        self.smtp.start()
        self.mlflow.start()
        return super().start()

    def stop(self):
        keep = os.environ.get("M2D_KEEP_TEST_DATA") == "1"
        try:
            super().stop()
        finally:
            self.mlflow.stop()
            self.smtp.stop()
            self.redis.stop()
            if not keep:
                shutil.rmtree(self.services_dir, ignore_errors=True)

    def restart_redis_empty(self, down_for=0.0):
        """Redis stopped and started again with none of its data (it keeps none on disk)."""
        self.redis.stop()
        time.sleep(down_for)
        self.redis.start()


def job_zip(tmp_path, seconds, name="job.zip"):
    """The sleeps sample, sleeping ``seconds`` (its dry run: one)."""
    code = ("import os, time\nprint('working', flush=True)\n"
            f"time.sleep(1 if os.environ.get('M2D_DRY_RUN') else {seconds})\nprint('done', flush=True)\n")
    return zip_folder(SAMPLES / "sleeps", tmp_path / name, extra={"main.py": code})


# ---------------------------------------------------- the documented way

class DocumentedStack(Stack):
    """The gateway as `make run` starts it: ``deploy/gateway.sh start`` on a
    testbed folder of its own, whose gateway.env is the testbed's with a queue
    namespace, a job prefix and a web port of its own; Slurm pushes its job
    events (the testbed's hook). ``restart()`` is `make run` again: what still
    runs is kept, what died is started. Its admin commands are `flask` processes,
    as the docs run them."""
    admin_in_one_process = False

    def __init__(self, **settings):
        require_testbed()
        self.root = Path(tempfile.mkdtemp(prefix="m2d-documented-", dir="/tmp"))
        self.root.chmod(0o711)  # the gateway's account passes to its folders
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        tag = uuid.uuid4().hex[:6]
        ours = {"M2D_QUEUE_NAMESPACE": f"m2d-documented-{tag}", "M2D_SLURM_JOB_PREFIX": f"m2ddoc{tag}",
                "M2D_SLURM_EVENTS_DIR": str(events_dir()), "M2D_PUSHED_POLL_INTERVAL": "10",
                "M2D_SLURM_MEM": "2G", "M2D_SLURM_TIME": "00:10:00"} | settings
        testbed_env = (Path(os.environ["M2D_TESTBED_DIR"]) / "gateway.env").read_text()
        fd = os.open(self.root / "gateway.env", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(testbed_env + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in ours.items()))
        self.run_dir = self.root / "gateway"
        self.logs = self.run_dir / "logs"
        self.events_conf = events_dir() / f"{ours['M2D_SLURM_JOB_PREFIX']}.curl"
        self.env = {}
        self.mail_since = mail_cutoff()
        self.orphans = []  # what processes ended by kill() left in their groups (rq's scheduler child)

    def start(self):
        self._gateway_sh("start")
        # what an admin sources to run admin commands (gateway.sh's own words)
        env = subprocess.run(["bash", "-c", f'set -a; . {self.root}/gateway.env; . {self.run_dir}/admin.env; env -0'],
                             capture_output=True, check=True, timeout=30).stdout.decode()
        self.env = dict(line.split("=", 1) for line in env.split("\0") if "=" in line)
        return self

    def restart(self):
        return self.start()

    def stop(self):
        self._gateway_sh("stop")
        kill_processes(self.orphans)
        if os.environ.get("M2D_KEEP_TEST_DATA") != "1":
            shutil.rmtree(self.root, ignore_errors=True)

    def kill(self, name):
        """``kill -9`` of one of gateway.sh's processes (web, worker-build, worker-mail, worker-poll, poller)."""
        pid = int((self.run_dir / "pids" / f"{name}.pid").read_text())
        self.orphans += left_in_group(pid)  # (gateway.sh starts each in a session of its own)
        os.kill(pid, signal.SIGKILL)

    def _gateway_sh(self, action):
        done = subprocess.run([str(REPO / "deploy" / "gateway.sh"), action, str(self.root)], cwd=REPO,
                              env=dict(os.environ, M2D_PORT=str(self.port)), capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise AssertionError(f"gateway.sh {action} failed:\n{done.stdout}\n{done.stderr}")
