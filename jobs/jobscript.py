"""The Slurm batch script that runs one submission, sealed: ``singularity/job.sbatch.j2``.

:class:`JobSpec` holds the values; the template holds the script.  The
script starts the MLflow relay (singularity/relay.py) on the host side of the job,
then runs the researcher's ``main.py`` with ``apptainer exec --containall
--cleanenv --no-privs --net --network none`` in the submission's image: no
network but a loopback, where a shim forwards the MLflow URL to the relay's
socket; CLaM read-only at ``/mnt/dataset``, the export folder at
``/mnt/export``, the code read-only at ``/code`` (also the working
directory), the model cache read-only at ``/opt/m2d/models``.  No credential
enters the container: the relay adds the owner's.  Slurm writes the job's
stdout and stderr to ``<log_dir>/slurm-<jobid>.out`` and ``.err``
(``dryrun-<jobid>.*`` for a dry run, which differs only in its dataset,
export folder, limits, experiment and ``M2D_DRY_RUN=1``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from gateway.templating import SINGULARITY_DIR, render

__all__ = ["JobSpec", "render_job_script", "write_job_script", "job_name", "log_name", "RELAY_SOURCE"]

TEMPLATE = "singularity/job.sbatch.j2"
RELAY_SOURCE = SINGULARITY_DIR / "relay.py"  # run by path on the node, never imported

DATASET_MOUNT = "/mnt/dataset"
EXPORT_MOUNT = "/mnt/export"
CODE_MOUNT = "/code"
RUN_MOUNT = "/run/m2d"  # the relay's socket folder, read-only
MODELS_MOUNT = "/opt/m2d/models"

LOG_PREFIX = "slurm"  # <log_dir>/slurm-<jobid>.out / .err
DRY_RUN_LOG_PREFIX = "dryrun"  # <log_dir>/dryrun-<jobid>.out / .err
DRY_RUN_JOB_SUFFIX = "-dry"


def job_name(prefix: str, submission_id: int, dry_run: bool = False) -> str:
    """The Slurm job's name, <prefix>-<id> (a dry run's <prefix>-<id>-dry): what
    finds a job whose id was never recorded."""
    return f"{prefix}-{submission_id}{DRY_RUN_JOB_SUFFIX if dry_run else ''}"


def log_name(job_id: str, stream: str, dry_run: bool = False) -> str:
    """The file in the submission's logs/ where Slurm writes a job's ``stream``
    ("out" or "err"; the relay its "relay.json"); read through gateway.jobfiles."""
    return f"{DRY_RUN_LOG_PREFIX if dry_run else LOG_PREFIX}-{job_id}.{stream}"

_TIME = re.compile(r"(\d+-)?\d{1,2}(:\d{2}){0,2}|\d+")
_MEM = re.compile(r"\d+[KMGT]?")
_WORD = re.compile(r"[A-Za-z0-9_.,-]+")
_HOST = re.compile(r"[A-Za-z0-9.-]+")


@dataclass(frozen=True)
class JobSpec:
    submission_id: int
    image: Path              # env-<hash>.sif
    code_dir: Path           # -> /code, read-only, working directory
    dataset_dir: Path        # -> /mnt/dataset, read-only
    export_dir: Path         # -> /mnt/export, writable
    log_dir: Path            # slurm-<jobid>.out / .err, gateway-owned
    relay: Path              # a copy of singularity/relay.py the job account can read
    credentials: Path        # the owner's MLflow login for the relay, group-readable only
    mlflow_upstream: str     # the MLflow server as the node reaches it
    mlflow_url: str          # the URL the job's code uses (the shim listens at its host:port)
    experiment_id: str
    experiment_name: str
    models_dir: Path | None = None  # admins' read-only model cache, or None
    apptainer: str = "apptainer"
    python: str = "python3"  # runs the relay on the node
    partition: str | None = None
    gpus: int = 1            # --gres=gpu:N; 0 leaves the line out
    cpus: int = 2
    mem: str = "4G"
    time: str = "01:00:00"
    nv: bool = False         # apptainer --nv (real NVIDIA GPUs on the node)
    extra_apptainer_args: tuple[str, ...] = ()
    # Two gateways on one cluster (staging and production, or a test run)
    # need different prefixes: a retried submit looks its job up by name.
    job_prefix: str = "m2d"
    # The dry run: the same sealed job on the synthetic twin (dataset_dir),
    # named <prefix>-<id>-dry, logging to dryrun-<jobid>.out/.err, with
    # M2D_DRY_RUN=1 in the container (the one difference the code can see).
    dry_run: bool = False
    # a dry run: the owner's real experiment name, which the relay answers
    # with the dry run's experiment (code that calls mlflow.set_experiment)
    experiment_alias: str | None = None

    @property
    def job_name(self) -> str:
        return job_name(self.job_prefix, self.submission_id, self.dry_run)

    @property
    def log_prefix(self) -> str:
        return DRY_RUN_LOG_PREFIX if self.dry_run else LOG_PREFIX

    def __post_init__(self) -> None:
        for name in ("image", "code_dir", "dataset_dir", "export_dir",
                     "log_dir", "relay", "credentials", "models_dir"):
            path = getattr(self, name)
            if path is None:
                continue
            if not Path(path).is_absolute():
                raise ValueError(f"{name} must be an absolute path, not {path!r}")
            if "\n" in str(path) or "\0" in str(path):
                raise ValueError(f"{name} contains a newline or NUL")
        for name in ("code_dir", "dataset_dir", "export_dir", "relay", "models_dir"):
            # apptainer's --bind splits on ":" and ","
            if re.search(r"[:,]", str(getattr(self, name) or "")):
                raise ValueError(f"{name} may not contain ':' or ','")
        # Slurm reads #SBATCH lines itself: no shell quoting there, and "%"
        # would be taken as a filename pattern.
        if not re.fullmatch(r"[A-Za-z0-9_./+-]+", str(self.log_dir)):
            raise ValueError(f"log_dir {self.log_dir!r}: use letters, digits "
                             "and _ . / + - only")
        if not isinstance(self.submission_id, int) or self.submission_id < 0:
            raise ValueError("submission_id must be a non-negative int")
        if not _TIME.fullmatch(self.time):
            raise ValueError(f"time {self.time!r}: use [D-]HH:MM:SS or minutes")
        if not _MEM.fullmatch(self.mem):
            raise ValueError(f"mem {self.mem!r}: use e.g. 4G or 4096M")
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", self.job_prefix):
            raise ValueError(f"job_prefix {self.job_prefix!r}: use letters, digits and _ . + -")
        if self.partition is not None and not _WORD.fullmatch(self.partition):
            raise ValueError(f"partition {self.partition!r} is not a name")
        if self.gpus < 0 or self.cpus < 1:
            raise ValueError("gpus must be >= 0 and cpus >= 1")
        if isinstance(self.extra_apptainer_args, str):
            raise ValueError("extra_apptainer_args is a tuple of arguments")
        url = urlsplit(self.mlflow_url)
        if url.scheme != "http" or not url.hostname or not _HOST.fullmatch(url.hostname):
            raise ValueError(f"mlflow_url {self.mlflow_url!r}: the job's MLflow URL must be http://HOST[:PORT] "
                             "(the shim inside the container speaks plain HTTP to the relay)")
        if not re.fullmatch(r"[0-9]+", self.experiment_id):
            raise ValueError(f"experiment_id {self.experiment_id!r} is not an MLflow experiment id")

    @property
    def mlflow_host(self) -> str:
        return urlsplit(self.mlflow_url).hostname

    @property
    def mlflow_port(self) -> int:
        return urlsplit(self.mlflow_url).port or 80


def render_job_script(spec: JobSpec) -> str:
    values = asdict(spec)
    values.update(
        job_name=spec.job_name,
        log_prefix=spec.log_prefix,
        dataset_bind=f"{spec.dataset_dir}:{DATASET_MOUNT}:ro",
        export_bind=f"{spec.export_dir}:{EXPORT_MOUNT}",
        code_bind=f"{spec.code_dir}:{CODE_MOUNT}:ro",
        relay_in_container=f"{RUN_MOUNT}/relay.py",
        run_mount=RUN_MOUNT,
        models_bind=f"{spec.models_dir}:{MODELS_MOUNT}:ro" if spec.models_dir else None,
        models_mount=MODELS_MOUNT,
        mlflow_host=spec.mlflow_host,
        mlflow_port=spec.mlflow_port,
    )
    return render(TEMPLATE, **values)


def write_job_script(spec: JobSpec, path: Path) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_job_script(spec))
    tmp.chmod(0o750)  # sbatch reads it as the job account (group)
    tmp.replace(path)
    return path
