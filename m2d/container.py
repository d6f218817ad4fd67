"""Apptainer mode of `m2d run`: the submission in the platform's own container.

The only code of m2d that runs `apptainer`. What the platform's job does
(singularity/job.sbatch.j2), and where it comes from here:

  the base image            --base-image or M2D_BASE_IMAGE; else built once from
                            the platform's own definition (singularity/base.def,
                            shipped in the package as m2d/base.def) into
                            ~/.cache/m2d/images/base-<sha256 of it, 12 hex>.sif,
                            the name the testbed gives it too
  the environment image     the base plus requirements.txt, pip-installed into
                            /opt/venv (m2d/environment.def), built once per
                            (base image, requirements) into
                            ~/.cache/m2d/images/env-<key>.sif
  the sealed run            the same `apptainer exec --containall --cleanenv
                            --no-privs --net --network none`, the same binds
                            (/mnt/dataset ro, /mnt/export, /code ro, /run/m2d ro),
                            the same environment (MLFLOW_TRACKING_URI,
                            MLFLOW_EXPERIMENT_NAME, PYTHONDONTWRITEBYTECODE,
                            PYTHONUNBUFFERED, M2D_DRY_RUN on the twin)
  the MLflow relay          the platform's own, singularity/relay.py: `serve` here beside
                            the container, `shim` on the container's loopback;
                            upstream the MLflow of m2d/tracking.py

Apptainer 1.2 or later (build arguments). The images, the dataset, the export
folder and the temporary folders must be where Apptainer can bind them (on the
testbed's wrapper: not under /root or another system folder; set M2D_CACHE_DIR).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .archive import normalise_requirements
from .errors import LocalRunError

PACKAGE = Path(__file__).resolve().parent
BASE_DEFINITION = PACKAGE / "base.def"  # -> singularity/base.def in a clone; the file itself when installed
ENVIRONMENT_DEFINITION = PACKAGE / "environment.def"
RELAY = PACKAGE / "relay.py"  # -> singularity/relay.py in a clone; run by path, never imported
DEFAULT_PYTHON = "3.11"  # the Python of base.def's Debian release
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # the base image's, and Debian's, path

CODE_MOUNT = "/code"
DATASET_MOUNT = "/mnt/dataset"
EXPORT_MOUNT = "/mnt/export"
RUN_MOUNT = "/run/m2d"  # the relay's socket and the shim, read-only
# The URL main.py sees: the shim listens there, on the container's own loopback.
JOB_MLFLOW_URL = "http://127.0.0.1:5000"
RELAY_START_TIMEOUT = 30  # seconds
# mlflow 2.x imports GitPython, which prints a 15-line "Bad git executable" warning
# into every log of an image without git; as in singularity/job.sbatch.j2.
GIT_PYTHON_REFRESH = "quiet"
# mlflow 3's client telemetry, which cannot reach its server from a sealed job: its
# thread then deletes a variable from os.environ while the job's own MLflow call reads
# the environment (requests' proxy lookup), and that call fails with a KeyError
# ('_MLFLOW_TELEMETRY_SESSION_ID'). Off before mlflow is imported, it never starts.
# As in singularity/job.sbatch.j2.
TELEMETRY_OFF = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}

# As in singularity/job.sbatch.j2: the shim first, then main.py in its place.
_SHIM_THEN_MAIN = (f"python3 {RUN_MOUNT}/relay.py shim --listen 127.0.0.1:{JOB_MLFLOW_URL.rsplit(':', 1)[1]} "
                   f"--socket {RUN_MOUNT}/mlflow.sock --ready-file /tmp/.m2d-shim &\n"
                   "for _ in $(seq 100); do [ -e /tmp/.m2d-shim ] && break; sleep 0.05; done\n"
                   f"exec python {CODE_MOUNT}/main.py")


def apptainer() -> str | None:
    """The `apptainer` command on PATH (Apptainer mode's condition), or None."""
    return shutil.which("apptainer")


def base_image(images: Path, given: str | os.PathLike | None, python: str, say=print) -> Path:
    """The platform's base image: ``given`` (or M2D_BASE_IMAGE) when set, else the
    one built from base.def under ``images`` (built now if missing)."""
    given = given or os.environ.get("M2D_BASE_IMAGE")
    if given:
        path = Path(given).resolve()
        if not path.is_file():
            raise LocalRunError(f"The base image {given} does not exist (from --base-image or M2D_BASE_IMAGE)")
        return path
    if python != DEFAULT_PYTHON:
        raise LocalRunError(f"The submission asks for Python {python} (.python-version); m2d builds only the "
                            f"default base image (Python {DEFAULT_PYTHON}). Give the platform's base image for "
                            f"Python {python} with --base-image (on the testbed: base-image.sh DIR {python}).")
    definition = BASE_DEFINITION.read_bytes()
    path = images / f"base-{hashlib.sha256(definition).hexdigest()[:12]}.sif"
    return _built(path, BASE_DEFINITION, [], say,
                  f"building the platform's base image {path} from its definition (a debootstrap of Debian: "
                  "minutes, once; needs debootstrap, and root or --fakeroot support)")


def environment_image(images: Path, base: Path, requirements: str, say=print) -> Path:
    """The base image with ``requirements`` installed, built once per (base image, requirements)."""
    key_source = f"{_digest(base)}\n{normalise_requirements(requirements)}"
    key = hashlib.sha256(key_source.encode()).hexdigest()[:16]
    path = images / f"env-{key}.sif"
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory(prefix="m2d-build-") as build:
        listed = Path(build) / "requirements.txt"
        listed.write_text(requirements if requirements.endswith("\n") else requirements + "\n")
        return _built(path, ENVIRONMENT_DEFINITION,
                      ["--build-arg", f"base={base}", "--build-arg", f"requirements={listed}"], say,
                      f"building the environment image {path}: requirements.txt installed on the base image "
                      "(once per set of requirements; large packages such as torch take minutes)")


def run(image: Path, code: Path, dataset: Path, export: Path, server, extra_env: dict[str, str],
        stdout=None) -> int:
    """Run main.py in ``image``, sealed as on the platform, with the relay to
    ``server`` (a tracking.Server); return main.py's exit code. Its stdout goes
    to ``stdout`` (a file; default: this process's)."""
    with tempfile.TemporaryDirectory(prefix="m2d-relay-") as run_dir, \
            tempfile.TemporaryDirectory(prefix="m2d-login-") as private:
        run_dir = Path(run_dir)  # bound read-only at /run/m2d: the socket and the shim's code
        shutil.copyfile(RELAY, run_dir / "relay.py")
        # The relay reads the login from a file only its owner can read; it never enters the container.
        credentials = Path(private) / "mlflow-login"
        credentials.touch(mode=0o600)
        credentials.write_text(f"{server.username or 'm2d'}\n{server.password or 'local'}\n")
        serving = _start_relay(run_dir, credentials, server, Path(private) / "relay.ready")
        try:
            command = [apptainer(), "exec", "--containall", "--cleanenv", "--no-privs", "--net", "--network", "none",
                       *_environment(server.experiment_name, extra_env),
                       *(["--nv"] if shutil.which("nvidia-smi") else []),
                       "--bind", f"{dataset}:{DATASET_MOUNT}:ro", "--bind", f"{export}:{EXPORT_MOUNT}",
                       "--bind", f"{code}:{CODE_MOUNT}:ro", "--bind", f"{run_dir}:{RUN_MOUNT}:ro",
                       "--pwd", CODE_MOUNT, str(image), "/bin/sh", "-c", _SHIM_THEN_MAIN]
            completed = subprocess.run(command, cwd=code, stdout=stdout)
        finally:
            # SIGTERM: the relay sends what it still holds before it exits
            serving.send_signal(signal.SIGTERM)
            try:
                serving.wait(timeout=60)
            except subprocess.TimeoutExpired:
                serving.kill()
                serving.wait()
    return completed.returncode if completed.returncode >= 0 else 128 - completed.returncode


def _environment(experiment_name: str, extra_env: dict[str, str]) -> list[str]:
    env = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "GIT_PYTHON_REFRESH": GIT_PYTHON_REFRESH,
           "MLFLOW_TRACKING_URI": JOB_MLFLOW_URL, "MLFLOW_EXPERIMENT_NAME": experiment_name, **TELEMETRY_OFF}
    if "CUDA_VISIBLE_DEVICES" in os.environ:  # --cleanenv would drop it
        env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
    env.update(extra_env)
    arguments = []
    for name, value in env.items():
        arguments += ["--env", f"{name}={value}"]
    return arguments


def _start_relay(run_dir: Path, credentials: Path, server, ready: Path) -> subprocess.Popen:
    serving = subprocess.Popen([sys.executable, str(RELAY), "serve", "--socket", str(run_dir / "mlflow.sock"),
                                "--ready-file", str(ready), "--upstream", server.url,
                                "--password-file", str(credentials), "--experiment-id", server.experiment_id,
                                "--experiment-name", server.experiment_name])
    deadline = time.monotonic() + RELAY_START_TIMEOUT
    while not ready.exists():
        if serving.poll() is not None or time.monotonic() > deadline:
            serving.kill()
            serving.wait()
            raise LocalRunError("The MLflow relay (relay.py serve) did not start; its messages are above")
        time.sleep(0.1)
    return serving


def _built(path: Path, definition: Path, options: list[str], say, what: str) -> Path:
    """``path``, made by `apptainer build` from ``definition`` unless it exists.
    Built under a temporary name and renamed: a build that dies half way leaves
    nothing that looks finished; a lock keeps two runs from building it at once."""
    command = apptainer()
    if command is None:
        raise LocalRunError("Apptainer mode needs `apptainer` on PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return path
        say(f"m2d: {what}")
        log = path.with_name(path.name + ".build.log")
        tmp = path.with_name(f".building-{os.getpid()}-{path.name}")
        bind_ca = ["--bind", f"{CA_BUNDLE}:{CA_BUNDLE}"] if os.path.isfile(CA_BUNDLE) else []
        started = time.monotonic()
        try:
            with open(log, "w") as out:
                built = _follow([command, "build", *bind_ca, *options, str(tmp), str(definition)], out, say)
            if built != 0:
                lines = log.read_text().splitlines()
                errors = [line for line in lines if line.startswith(("ERROR", "FATAL"))] or lines[-15:]
                raise LocalRunError("apptainer build failed (the platform's build would fail the same way "
                                    "if it is pip's error):\n" + "\n".join(errors[-10:]) + f"\nWhole log: {log}")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        say(f"m2d: built {path.name} in {time.monotonic() - started:.0f} s")
    return path


def _follow(command: list[str], log, say) -> int:
    """Run a build, writing its output to ``log`` and showing its progress: pip's
    package lines and Apptainer's steps."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        log.write(line)
        if line.startswith(("Collecting ", "Successfully installed", "INFO:    Creating SIF", "ERROR", "FATAL")):
            say(f"m2d:   {line.rstrip()}")
    return process.wait()


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()
