"""The MLflow server that `m2d run` in Apptainer mode relays a job's calls to.

On the platform the relay (singularity/relay.py) forwards a job's MLflow calls to the
platform's MLflow with the owner's login, for the owner's one experiment. Here
the same relay forwards them to:

- the MLflow server MLFLOW_TRACKING_URI names, when it is an http(s) URL (with
  MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, when set), or else
- a local MLflow server started for the run, on a free loopback port, storing
  into --mlruns: the same file store the virtualenv mode writes, so
  `mlflow ui --backend-store-uri mlruns` shows the runs of both modes. It is
  the `mlflow` command found on PATH (the full `mlflow` package: mlflow-skinny
  has no server).

The experiment (MLFLOW_EXPERIMENT_NAME, default m2d-local) is made here when
missing, because the relay, as on the platform, lets a job use its experiment
but not create one.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from .errors import LocalRunError

API = "/api/2.0/mlflow"
DEFAULT_EXPERIMENT = "m2d-local"
START_TIMEOUT = 180  # seconds; an MLflow server takes 5-30 s to answer on a loaded laptop


@dataclass(frozen=True)
class Server:
    """Where the relay sends a job's calls, with whose login, for which experiment."""
    url: str
    username: str
    password: str
    experiment_id: str
    experiment_name: str
    shown: str  # for the researcher: the URL, or the local store and the URL
    local: bool = False  # started for this run, storing into --mlruns


@contextmanager
def server(mlruns: str | os.PathLike, experiment_name: str | None = None, say=print) -> Iterator[Server]:
    """The MLflow server of this run, started when MLFLOW_TRACKING_URI names none;
    stopped again on leaving."""
    experiment_name = experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        username = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
        password = os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
        yield Server(uri.rstrip("/"), username, password, experiment(uri, experiment_name, username, password),
                     experiment_name, uri)
        return
    if uri:
        raise LocalRunError(f"MLFLOW_TRACKING_URI={uri} is not an MLflow server. In Apptainer mode main.py's "
                            "MLflow calls go through the platform's relay, which talks to a server: unset it "
                            "(m2d then starts one on --mlruns), set it to http://HOST:PORT, or use --mode venv.")
    with _local_server(Path(mlruns).resolve(), say) as url:
        yield Server(url, "", "", experiment(url, experiment_name, "", ""), experiment_name,
                     f"{Path(mlruns).resolve()} (served at {url})", local=True)


def experiment(url: str, name: str, username: str, password: str) -> str:
    """The id of experiment ``name`` on the server at ``url``, made if missing."""
    auth = (username, password) if username else None
    try:
        found = requests.get(f"{url}{API}/experiments/get-by-name", params={"experiment_name": name},
                             auth=auth, timeout=60)
        if found.status_code == 404:
            found = requests.post(f"{url}{API}/experiments/create", json={"name": name}, auth=auth, timeout=60)
            if found.ok:
                return found.json()["experiment_id"]
    except requests.RequestException as e:
        raise LocalRunError(f"Cannot reach the MLflow server at {url}: {e}") from e
    if found.status_code in (401, 403):
        raise LocalRunError(f"The MLflow server at {url} refused the login in MLFLOW_TRACKING_USERNAME/"
                            f"MLFLOW_TRACKING_PASSWORD ({found.status_code}) for experiment {name!r}")
    if not found.ok:
        raise LocalRunError(f"The MLflow server at {url} answered {found.status_code} for experiment {name!r}: "
                            f"{found.text[:300]}")
    return found.json()["experiment"]["experiment_id"]


@contextmanager
def _local_server(store: Path, say) -> Iterator[str]:
    command = shutil.which("mlflow")
    if command is None:
        raise LocalRunError("Apptainer mode sends main.py's MLflow calls through the platform's relay to an MLflow "
                            "server, and no `mlflow` command is on PATH to start one. Install MLflow "
                            "(pip install mlflow; mlflow-skinny has no server), or start your own and set "
                            "MLFLOW_TRACKING_URI=http://HOST:PORT, or use --mode venv.")
    store.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    say(f"m2d: starting a local MLflow server on {url} (store: {store})")
    env = {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true",
           # no background job runner (scorers): nothing here uses it
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(
            [command, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", str(store), "--no-serve-artifacts",
             "--default-artifact-root", str(store / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            _wait_until_up(url, process, log)
            yield url
        finally:
            _stop(process)


def _wait_until_up(url: str, process: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise LocalRunError(f"The local MLflow server exited with {process.returncode}:\n"
                                + "\n".join(log.read().splitlines()[-20:]))
        try:
            if requests.get(f"{url}/health", timeout=5).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise LocalRunError(f"The local MLflow server did not answer at {url} within {START_TIMEOUT} s")


def _stop(process: subprocess.Popen) -> None:
    # its own session: the server's workers are its children, stopped with it.
    # Not once it is reaped: its group's number may be another's by then.
    if process.returncode is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
