"""Running a submission on this machine the way the platform runs it.

Two modes. Apptainer mode (m2d/container.py), chosen when `apptainer` is on
PATH, runs it in the platform's own container: the same base image, binds, no
network and MLflow relay. Virtualenv mode, everywhere else, gives main.py the
same paths:

  platform (Apptainer job)                     virtualenv mode
  the zip, checked and unpacked, at /code (ro)  the same zip, checked and unpacked
                                                into a temporary folder (ro when
                                                mounts are possible), the working dir
  an image built from requirements.txt          a virtualenv built from it, cached in
                                                ~/.cache/m2d/venvs by its hash
  CLaM at /mnt/dataset (ro); in the dry run,    --dataset bound at /mnt/dataset (ro);
  its synthetic twin, with M2D_DRY_RUN=1        without it, the dry run's own twin
                                                (m2d/contract/twin.py, cached in
                                                ~/.cache/m2d/twin/<version>), with
                                                M2D_DRY_RUN=1 (both modes)
  the submission's /mnt/export                  --export bound at /mnt/export
  a clean environment: MLflow settings,         the same, plus what --env adds; MLflow
  CUDA_VISIBLE_DEVICES                          logs to a local file store unless
                                                MLFLOW_TRACKING_URI is set

Making /mnt/dataset and /mnt/export appear needs a private mount namespace
(`unshare`): as root directly, otherwise through a user namespace where the
kernel allows one. Where neither works the code runs without them, and learns
the two folders from M2D_DATASET_DIR and M2D_EXPORT_DIR instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import archive, container, tracking
from .container import DATASET_MOUNT, EXPORT_MOUNT
from .contract import twin
from .errors import LocalRunError

__all__ = ["DATASET_MOUNT", "EXPORT_MOUNT", "LocalRunError", "MODES", "Run", "mode", "run"]

MODES = ("apptainer", "venv")
# What main.py sees of the caller's environment, like the platform's --cleanenv
# (which keeps only the MLflow settings and the job's GPUs).
PASSED_THROUGH = ("HOME", "LANG", "LC_ALL", "TERM", "TZ", "CUDA_VISIBLE_DEVICES", "TORCH_HOME",
                  "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                  "MLFLOW_EXPERIMENT_NAME")
READY_MARKER = ".m2d-ready"

# Run inside a private mount namespace; $1 dataset, $2 export, $3 code, $4 staging
# folder, then the command. The sources are bound to the staging folder first, in
# case they live under /mnt, which the tmpfs then covers (in this namespace only:
# the host's /mnt is untouched).
_MOUNT_AND_RUN = r"""
set -e
dataset=$1 export=$2 code=$3 stage=$4
shift 4
mkdir -p "$stage/dataset" "$stage/export"
mount --bind "$dataset" "$stage/dataset"
mount --bind "$export" "$stage/export"
mount -t tmpfs -o mode=0755,size=1m m2d-mnt /mnt
mkdir /mnt/dataset /mnt/export
mount --bind -o ro "$stage/dataset" /mnt/dataset
mount --bind "$stage/export" /mnt/export
mount --bind -o ro "$code" "$code"
cd "$code"
exec "$@"
"""


@dataclass
class Run:
    """What `run` did, for the caller to report."""
    exit_code: int
    mode: str  # "apptainer" or "venv"
    python: Path | None  # the virtualenv's (venv mode)
    image: Path | None  # the environment image (Apptainer mode)
    mounts: str  # "container", "namespace" or "environment"
    tracking_uri: str
    dataset: Path
    dataset_version: str | None = None  # the twin's, when no --dataset was given
    notes: list[str] = field(default_factory=list)


def cache_dir() -> Path:
    if os.environ.get("M2D_CACHE_DIR"):
        return Path(os.environ["M2D_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "m2d"


def twin_dir() -> Path:
    """Where `m2d run` keeps the dry run's twins, one folder per dataset version."""
    return cache_dir() / "twin"


def dataset_version() -> str:
    """The dataset version whose twin `m2d run` uses: M2D_DATASET_VERSION, else the platform's default."""
    return twin.check_version(os.environ.get("M2D_DATASET_VERSION") or twin.DEFAULT_VERSION)


def mode(wanted: str | None = None) -> str:
    """The mode `run` uses: ``wanted`` when given, else Apptainer's where it is installed."""
    if wanted is None:
        return "apptainer" if container.apptainer() else "venv"
    if wanted not in MODES:
        raise ValueError(f"mode {wanted!r}: use one of {', '.join(MODES)}")
    if wanted == "apptainer" and not container.apptainer():
        raise LocalRunError("Apptainer mode needs `apptainer` on PATH (https://apptainer.org/docs/admin/main/"
                            "installation.html); --mode venv runs in a virtualenv with the same paths")
    return wanted


def run(source: str | os.PathLike, dataset: str | os.PathLike | None, export: str | os.PathLike,
        extra_env: dict[str, str] | None = None, mlruns: str | os.PathLike = "mlruns",
        say=print, version: str | None = None, wanted_mode: str | None = None,
        base_image: str | os.PathLike | None = None, stdout=None) -> Run:
    """Check `source` (a project folder or a zip) as the platform would, install its
    requirements, and run its main.py; return main.py's exit code and how it ran.
    Without `dataset` it runs as the platform's dry run does: on the synthetic
    twin of dataset `version` (made once, by the platform's generator with the
    platform's parameters), with M2D_DRY_RUN=1. main.py's stdout goes to
    ``stdout`` (a file; default: this process's).
    Raises archive.Refusal for a zip the platform would refuse."""
    chosen = mode(wanted_mode)
    extra_env = dict(extra_env or {})
    if dataset is None:
        version = twin.check_version(version or dataset_version())
        if not twin.is_cached(twin_dir(), version):
            say(f"m2d: making the synthetic twin of dataset version {version} in {twin.path(twin_dir(), version)} "
                "(once; the platform's dry run uses the same)")
        dataset = twin.ensure(twin_dir(), version)
        extra_env = {"M2D_DRY_RUN": "1", **extra_env}
    else:
        version = None
    dataset, export = Path(dataset).resolve(), Path(export).resolve()
    if not dataset.is_dir():
        raise LocalRunError(f"The dataset folder {dataset} does not exist. Leave out --dataset to run on the "
                            f"dry run's synthetic twin, or make a sample: m2d sample-data --out {dataset}")
    export.mkdir(parents=True, exist_ok=True)
    what = f"the twin of dataset version {version}, M2D_DRY_RUN=1" if version else "read-only"
    with tempfile.TemporaryDirectory(prefix="m2d-run-") as work:
        work = Path(work)
        code, checked = _unpacked(Path(source), work)
        if chosen == "apptainer":
            images = cache_dir() / "images"
            base = container.base_image(images, base_image, checked.python, say=say)
            image = container.environment_image(images, base, checked.requirements, say=say)
            with tracking.server(mlruns, extra_env.get("MLFLOW_EXPERIMENT_NAME"), say=say) as server:
                say(f"m2d: running main.py in {image.name}, sealed as on the platform (no network; "
                    f"{DATASET_MOUNT} <- {dataset} ({what}), {EXPORT_MOUNT} <- {export}; "
                    f"MLflow through the platform's relay: {server.shown}, experiment {server.experiment_name!r})")
                exit_code = container.run(image, code, dataset, export, server, extra_env, stdout=stdout)
            if server.local:
                say(f"m2d: the runs are in {Path(mlruns).resolve()}; to see them: "
                    f"mlflow ui --backend-store-uri {Path(mlruns).resolve()}")
            return Run(exit_code=exit_code, mode=chosen, python=None, image=image, mounts="container",
                       tracking_uri=server.url, dataset=dataset, dataset_version=version)
        python = environment(checked.requirements, say=say)
        env, tracking_uri = _job_environment(python, mlruns, extra_env)
        command = [str(python), "main.py"]
        mounts = mount_method()
        notes = []
        if mounts == "namespace":
            command = _unshare_command() + ["sh", "-c", _MOUNT_AND_RUN, "m2d-run",
                                            str(dataset), str(export), str(code), str(work / "stage"), *command]
        else:
            env.update(M2D_DATASET_DIR=str(dataset), M2D_EXPORT_DIR=str(export))
            notes.append(f"{DATASET_MOUNT} and {EXPORT_MOUNT} could not be made here (no mount "
                         "namespace: run as root, or allow user namespaces); main.py got "
                         f"M2D_DATASET_DIR={dataset} and M2D_EXPORT_DIR={export} instead, so code that "
                         "uses the fixed paths will not find them.")
        if not container.apptainer():
            notes.append("virtualenv mode: the same paths, but not the platform's container (its network is "
                         "not cut); install Apptainer for the platform's own sealed run")
        say(f"m2d: running main.py in a virtualenv ({DATASET_MOUNT} <- {dataset} ({what}), {EXPORT_MOUNT} <- "
            f"{export}; MLflow: {tracking_uri})")
        completed = subprocess.run(command, cwd=code, env=env, stdout=stdout)
    exit_code = completed.returncode if completed.returncode >= 0 else 128 - completed.returncode
    return Run(exit_code=exit_code, mode=chosen, python=python, image=None, mounts=mounts,
               tracking_uri=tracking_uri, dataset=dataset, dataset_version=version, notes=notes)


def environment(requirements: str, say=print) -> Path:
    """The python of a virtualenv with `requirements` installed, made once per
    (requirements as pip reads them, Python version, machine) and then reused.
    A half-made one (a crash, ^C) is made again; a lock keeps two runs from making
    the same one at once."""
    key_source = (f"{platform.python_version()} {platform.machine()}\n"
                  + archive.normalise_requirements(requirements))
    key = hashlib.sha256(key_source.encode()).hexdigest()[:16]
    venvs = cache_dir() / "venvs"
    venvs.mkdir(parents=True, exist_ok=True)
    venv = venvs / key
    python = venv / "bin" / "python"
    with open(venvs / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / READY_MARKER).exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        say(f"m2d: installing requirements.txt into {venv} (once per set of requirements; "
            "large packages such as torch take minutes)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        (venv / "requirements.txt").write_text(requirements)
        log = venv / "install.log"
        with open(log, "w") as out:
            installed = subprocess.run(
                [str(python), "-m", "pip", "install", "--no-input", "-r", str(venv / "requirements.txt")],
                stdout=out, stderr=subprocess.STDOUT)
        if installed.returncode != 0:
            errors = [line for line in log.read_text().splitlines() if line.startswith("ERROR")]
            raise LocalRunError("pip could not install requirements.txt (the platform's build would "
                                "fail the same way):\n" + "\n".join(errors[-10:]) + f"\nWhole log: {log}")
        (venv / READY_MARKER).write_text("")
    return python


def mount_method() -> str:
    """"namespace" when this process can make /mnt/dataset appear in a private
    mount namespace, else "environment"."""
    if shutil.which("unshare") is None or not os.path.isdir("/mnt"):
        return "environment"
    probe = subprocess.run(_unshare_command() + ["mount", "-t", "tmpfs", "m2d-probe", "/mnt"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return "namespace" if probe.returncode == 0 else "environment"


def _unshare_command() -> list[str]:
    command = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        # root in a user namespace of one's own may mount there (where the kernel allows it)
        command[1:1] = ["--user", "--map-root-user"]
    return command


def _unpacked(source: Path, work: Path) -> tuple[Path, archive.Checked]:
    """The code as the platform would see it: a folder is zipped the way `m2d zip`
    does, and the zip is checked and unpacked with the platform's own rules."""
    if source.is_dir():
        zip_path = archive.make_zip(source, work / "submission.zip").path
    elif source.is_file():
        zip_path = source
    else:
        raise LocalRunError(f"{source} is neither a folder nor a zip")
    checked = archive.check(zip_path)
    code = work / "code"
    archive.unpack(zip_path, code)
    return code, checked


def _job_environment(python: Path, mlruns: str | os.PathLike, extra: dict[str, str]) -> tuple[dict, str]:
    env = {name: os.environ[name] for name in PASSED_THROUGH if name in os.environ}
    env.setdefault("LANG", "C.UTF-8")
    env["PATH"] = f"{python.parent}:/usr/local/bin:/usr/bin:/bin"
    env["VIRTUAL_ENV"] = str(python.parent.parent)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # as on the platform, where /code is read-only
    env["PYTHONUNBUFFERED"] = "1"
    env["GIT_PYTHON_REFRESH"] = container.GIT_PYTHON_REFRESH
    env.update(container.TELEMETRY_OFF)
    env.setdefault("MLFLOW_EXPERIMENT_NAME", tracking.DEFAULT_EXPERIMENT)
    if "MLFLOW_TRACKING_URI" not in env:
        env["MLFLOW_TRACKING_URI"] = Path(mlruns).resolve().as_uri()
        # MLflow 3 refuses a file store unless told that it is wanted; the local file
        # store needs nothing but the filesystem (a sqlite store needs SQLAlchemy,
        # which mlflow-skinny leaves out).
        env["MLFLOW_ALLOW_FILE_STORE"] = "true"
    env.update(extra)
    return env, env["MLFLOW_TRACKING_URI"]
