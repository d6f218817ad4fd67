"""A job's MLflow relay and shim as subprocesses, as the batch script and the
container start them (singularity/relay.py, run by path): used by
tests/test_relay.py and bench/relay.py."""

import hashlib
import http.client
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from .stack import REPO

RELAY = REPO / "singularity" / "relay.py"


def _load(path: Path):
    # registered before it runs: its dataclasses look their module up in sys.modules
    spec = importlib.util.spec_from_file_location("relay", path)
    module = sys.modules["relay"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


relay = _load(RELAY)  # the module a job runs by path, for tests of its parts
# The shim runs on the container's python3 and the relay on the host's: any 3.9 or later.
RELAY_PYTHON = os.environ.get("M2D_RELAY_PYTHON", sys.executable)
API = "/api/2.0/mlflow"


class RecordingUpstream:
    """MLflow as the relay's unit tests see it: records each call (method, path, parsed
    query, parsed body), answers 200; a created run is "r1"."""

    def __init__(self):
        self.calls = []

    def call(self, method, path, query="", body=None):
        self.calls.append((method, path, urllib.parse.parse_qs(query), json.loads(body) if body else None))
        if path.endswith("/runs/create"):
            return 200, "application/json", json.dumps({"run": {"info": {"run_id": "r1"}, "data": {}}}).encode()
        return 200, "application/json", b"{}"


def identifier_index(path: Path, values: dict[str, str]) -> Path:
    """An identifiers.json as m2d/disclosure's index writes it (keyed BLAKE2b of
    each value and of its first word, lower-cased), for ``values``: value -> kind."""
    salt = os.urandom(32)

    def h(text: str) -> str:
        return hashlib.blake2b(text.lower().encode(), key=salt, digest_size=16).hexdigest()

    words = {value: re.findall(r"[A-Za-z0-9]+", value) for value in values}
    path.write_text(json.dumps({"salt": salt.hex(), "max_words": max(map(len, words.values())),
                                "values": {h(v): kind for v, kind in values.items()},
                                "first_words": sorted({h(w[0]) for w in words.values()})}))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_file(path: Path, process: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + 15
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the {what} did not come up: {log.read_text()[-2000:]}", pytrace=False)
        time.sleep(0.02)


class RelayProcesses:
    """A relay (host side) and a shim (container side) as a job has them; without
    the shim (``shim=False``), callers speak HTTP to the relay's socket themselves."""

    def __init__(self, folder: Path, account, upstream: str, *extra_args, dry_run: bool = False,
                 shim: bool = True):
        self.folder = folder
        self.job_dir = folder / "run"  # the per-job folder bound read-only into the container
        folder.mkdir()
        self.job_dir.mkdir(mode=0o700)
        self.socket = self.job_dir / "mlflow.sock"
        password_file = folder / "mlflow-credentials"
        password_file.touch(mode=0o600)
        password_file.write_text(f"{account.username}\n{account.password}\n")
        # Only what python needs: the test's own environment holds the admin password.
        env = {"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1"}
        self.relay_log, self.shim_log = folder / "relay.log", folder / "shim.log"
        self.relay = subprocess.Popen(
            [RELAY_PYTHON, str(RELAY), "serve", "--socket", str(self.socket), "--upstream", upstream,
             "--password-file", str(password_file),
             *(("--experiment-id", account.dry_run_experiment_id, "--experiment-name", account.dry_run_experiment_name)
               if dry_run else ("--experiment-id", account.experiment_id, "--experiment-name", account.experiment_name)),
             "--ready-file", str(folder / "relay.ready"),
             *extra_args],
            env=env, stderr=self.relay_log.open("w"))
        wait_for_file(folder / "relay.ready", self.relay, "relay", self.relay_log)
        self.shim = None
        if not shim:
            return
        self.port = free_port()
        self.shim = subprocess.Popen(
            [RELAY_PYTHON, str(RELAY), "shim", "--listen", f"127.0.0.1:{self.port}", "--socket", str(self.socket),
             "--ready-file", str(folder / "shim.ready")],
            env=env, stderr=self.shim_log.open("w"))
        wait_for_file(folder / "shim.ready", self.shim, "shim", self.shim_log)
        self.url = f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.relay_log.read_text()

    def processes(self) -> list[subprocess.Popen]:
        return [process for process in (self.shim, self.relay) if process is not None]

    def stop(self):
        stop_all([self])


def stop_all(relays: list[RelayProcesses], timeout: float = 30) -> None:
    """Every relay (and shim) told to stop at once, each then sending what it holds;
    those still running after ``timeout`` seconds in all are killed."""
    processes = [process for relay in relays for process in relay.processes()]
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP to a relay's socket, as the shim forwards a job's calls (without a container)."""

    def __init__(self, path: str):
        super().__init__("localhost", timeout=60)
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def call(connection: http.client.HTTPConnection, method: str, path: str, body: dict | None = None) -> dict:
    """One MLflow REST call (API + path) and its JSON answer; RuntimeError naming any other status."""
    data = json.dumps(body).encode() if body is not None else None
    connection.request(method, API + path, body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    content = response.read()
    if response.status != 200:
        raise RuntimeError(f"{method} {path}: {response.status} {content[:300]!r}")
    return json.loads(content or b"{}")
