"""The Slurm batch script that runs one submission, sealed: ``singularity/job.sbatch.j2``.

:class:`JobSpec` holds the values; the template holds the script.  The
script starts the MLflow relay (singularity/relay.py) on the host side of the job,
then runs the researcher's ``main.py`` with ``apptainer exec --containall
--cleanenv --no-privs --net --network none`` in the submission's image: no
network but a loopback, where a shim forwards the MLflow URL to the relay's
socket; CLaM read-only at ``/mnt/dataset``, the export folder at
``/mnt/export``, the code read-only at ``/code`` (also the working
directory), the model cache read-only at ``/opt/m2d/models``.  No credential
enters the container: the relay adds the owner's, which it gets from the root
wrapper (deploy/libexec/m2d-slurm credential) for its own Slurm job alone.
``/mnt/export`` is a filesystem image of ``export_max_bytes`` and
``export_max_files``, read back into ``export_dir`` when the container ends
(a full one fails the job with exit code :data:`EXPORT_FULL_EXIT`).  Slurm
writes the job's stdout and stderr, each cut at ``log_max_bytes``, to
``<log_dir>/slurm-<jobid>.out`` and ``.err``
(``dryrun-<jobid>.*`` for a dry run, which differs only in its dataset,
export folder, limits, experiment and ``M2D_DRY_RUN=1``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from gateway.config import DEFAULTS
from gateway.core.templating import SINGULARITY_DIR, render

__all__ = ["JobSpec", "render_job_script", "write_job_script", "job_name", "log_name", "RELAY_SOURCE",
           "EXPORT_FULL_EXIT", "TIME_UP_EXIT", "SLURM_WRAPPER", "export_image_kib", "export_inodes", "size_text"]

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
SLURM_WRAPPER = "/usr/local/libexec/m2d/m2d-slurm"  # deploy/libexec/m2d-slurm, installed by root
EXPORT_FULL_EXIT = 95  # the job's exit code when /mnt/export filled up
TIME_UP_EXIT = 97      # ... when it reached its time limit (stopped to keep its export)
COPY_OUT_SECONDS = 60  # how long before its time limit a job is stopped (Slurm's --signal)

# The export image: ext3 (what Apptainer mounts unprivileged, with fuse2fs),
# 4 KiB blocks, no room to grow, 1% reserved (fuse2fs stops writers there),
# a 4 MiB journal.  Measured: it holds the limit less 8-68 KiB (never
# more: the gateway's own check, EXPORT_TOO_LARGE, then never fires first),
# and export_max_files files and up to a few dozen more (inode tables come
# in whole blocks).
_BLOCK = 4096
_JOURNAL = 4 * 1024**2
_INODE = 256
_GROUP = _BLOCK * 8 * _BLOCK  # bytes one block bitmap covers
MKE2FS_OPTIONS = ("-t", "ext3", "-b", str(_BLOCK), "-m", "1", "-J", f"size={_JOURNAL // 1024**2}",
                  "-O", "^resize_inode")


def export_inodes(max_files: int) -> int:
    """Inodes to ask of mke2fs: the files, the root folder and ext3's reserved ones."""
    return max_files + 10


def export_image_kib(max_bytes: int, max_files: int) -> int:
    """The size of the export image, in KiB, whose free space (past the 1%
    reserve) is ``max_bytes``: the data, the journal, the inode tables, and
    each block group's bitmaps and descriptors."""
    data = -(-max_bytes // _BLOCK) * _BLOCK
    inodes = -(-export_inodes(max_files) // 16) * 16 * _INODE
    meta = (-(-data // _GROUP) or 1) * 4 * _BLOCK + 64 * 1024
    size = -(-(data + _JOURNAL + inodes + meta) * 100 // 99) - 128 * 1024
    return -(-size // 1024)


def size_text(n: int) -> str:
    """2147483648 -> "2 GiB"; what the messages say."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor and n % (factor // 16 or 1) == 0:
            return f"{n / factor:g} {unit}"
    return f"{n:,} bytes"


def job_name(prefix: str, submission_id: int, dry_run: bool = False) -> str:
    """The Slurm job's name, <prefix>-<id> (a dry run's <prefix>-<id>-dry): what
    finds a job whose id was never recorded."""
    return f"{prefix}-{submission_id}{DRY_RUN_JOB_SUFFIX if dry_run else ''}"


def log_name(job_id: str, stream: str, dry_run: bool = False) -> str:
    """The file in the submission's logs/ where Slurm writes a job's ``stream``
    ("out" or "err"; the relay its "relay.json"); read through gateway.core.jobfiles."""
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
    credentials: Path        # the owner's MLflow login for the relay, the gateway's alone (0600)
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
    # what the job may store in MLflow, and its share of the server (singularity/relay.py)
    mlflow_text_budget: int = DEFAULTS["MLFLOW_TEXT_BUDGET"]
    mlflow_metric_budget: int = DEFAULTS["MLFLOW_METRIC_BUDGET"]
    mlflow_upstream_rate: float = DEFAULTS["MLFLOW_CALLS_PER_SECOND"] / DEFAULTS["MLFLOW_JOBS_AT_ONCE"]
    # What the job may leave behind, enforced while it writes.
    export_max_bytes: int = 2 * 1024**3
    export_max_files: int = 10_000
    log_max_bytes: int = 10 * 1024**2
    copy_out_seconds: int = COPY_OUT_SECONDS
    # The gateway's account: the job asks the wrapper, as it, for its owner's
    # MLflow login (sudo rule of the job account).  None: the job runs as
    # the gateway's account itself and reads ``credentials`` (no JOB_USER).
    credential_user: str | None = None
    slurm_wrapper: str = SLURM_WRAPPER

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
        # debugfs reads the export folder inside its own quoted command line
        if not re.fullmatch(r"[A-Za-z0-9_./+-]+", str(self.export_dir)):
            raise ValueError(f"export_dir {self.export_dir!r}: use letters, digits "
                             "and _ . / + - only")
        if self.export_max_bytes < 1024**2 or self.export_max_files < 1 or self.log_max_bytes < 1:
            raise ValueError("export_max_bytes must be at least 1 MiB, export_max_files and log_max_bytes at "
                             "least 1")
        if self.credential_user is not None and not re.fullmatch(r"[a-z_][a-z0-9_.-]*", self.credential_user):
            raise ValueError(f"credential_user {self.credential_user!r} is not an account name")
        if not Path(self.slurm_wrapper).is_absolute():
            raise ValueError(f"slurm_wrapper must be an absolute path, not {self.slurm_wrapper!r}")
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
        if self.mlflow_text_budget < 0 or self.mlflow_metric_budget < 0 or not self.mlflow_upstream_rate > 0:
            raise ValueError("the MLflow budgets must be >= 0 and the upstream rate > 0")
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
        export_mount=EXPORT_MOUNT,
        export_inodes=export_inodes(spec.export_max_files),
        mke2fs_options=" ".join(MKE2FS_OPTIONS),
        export_image_kib=export_image_kib(spec.export_max_bytes, spec.export_max_files),
        export_limit=f"{size_text(spec.export_max_bytes)} / {spec.export_max_files:,} files",
        log_limit=size_text(spec.log_max_bytes),
        time_up_exit=TIME_UP_EXIT,
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
    tmp.chmod(0o750)  # sbatch reads it as the job account (group); the wrapper wants no more
    tmp.replace(path)
    return path
