"""The Slurm batch script that runs one submission: ``singularity/job.sbatch.j2``.

:class:`JobSpec` holds the values; the template holds the script.  The
script runs the researcher's ``main.py`` with ``apptainer exec --containall
--cleanenv`` in the submission's image, with CLaM bound read-only at
``/mnt/dataset``, the export folder at ``/mnt/export`` and the code
read-only at ``/code`` (also the working directory: results belong in
``/mnt/export``).  Slurm writes the job's stdout and stderr to
``<log_dir>/slurm-<jobid>.out`` and ``.err``.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway.storage import write_private
from gateway.templating import render

__all__ = ["JobSpec", "render_job_script", "write_job_script", "write_env_file"]

TEMPLATE = "singularity/job.sbatch.j2"

DATASET_MOUNT = "/mnt/dataset"
EXPORT_MOUNT = "/mnt/export"
CODE_MOUNT = "/code"

_TIME = re.compile(r"(\d+-)?\d{1,2}(:\d{2}){0,2}|\d+")
_MEM = re.compile(r"\d+[KMGT]?")
_WORD = re.compile(r"[A-Za-z0-9_.,-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class JobSpec:
    submission_id: int
    image: Path              # env-<hash>.sif
    code_dir: Path           # -> /code, read-only, working directory
    dataset_dir: Path        # -> /mnt/dataset, read-only
    export_dir: Path         # -> /mnt/export, writable
    log_dir: Path            # slurm-<jobid>.out / .err, gateway-owned
    env_file: Path           # MLFLOW_* for the job, mode 0600 (write_env_file)
    apptainer: str = "apptainer"
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

    @property
    def job_name(self) -> str:
        return f"{self.job_prefix}-{self.submission_id}"

    def __post_init__(self) -> None:
        for name in ("image", "code_dir", "dataset_dir", "export_dir",
                     "log_dir", "env_file"):
            path = getattr(self, name)
            if not Path(path).is_absolute():
                raise ValueError(f"{name} must be an absolute path, not {path!r}")
            if "\n" in str(path) or "\0" in str(path):
                raise ValueError(f"{name} contains a newline or NUL")
        for name in ("code_dir", "dataset_dir", "export_dir"):
            # apptainer's --bind splits on ":" and ","
            if re.search(r"[:,]", str(getattr(self, name))):
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


def render_job_script(spec: JobSpec) -> str:
    values = asdict(spec)
    values.update(
        job_name=spec.job_name,
        dataset_bind=f"{spec.dataset_dir}:{DATASET_MOUNT}:ro",
        export_bind=f"{spec.export_dir}:{EXPORT_MOUNT}",
        code_bind=f"{spec.code_dir}:{CODE_MOUNT}:ro",
    )
    return render(TEMPLATE, **values)


def write_job_script(spec: JobSpec, path: Path) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_job_script(spec))
    tmp.chmod(0o750)
    tmp.replace(path)
    return path


def _env_quote(value: str) -> str:
    for special in ("\\", "$", "`"):
        value = value.replace(special, "\\" + special)
    return shlex.quote(value)


def write_env_file(path: Path, values: Mapping[str, str]) -> Path:
    """Write an apptainer ``--env-file``: ``NAME=value`` lines, mode 0600.

    Apptainer (1.4) evaluates each value twice: once reading the file as
    shell, then again inside the container, where ``$x``, ``$$`` and
    backticks expand (even within single quotes) and command substitution
    runs.  So ``\\``, ``$`` and backticks get a backslash first and the
    result is shell-quoted: any password arrives in the job unchanged.
    """
    lines = []
    for name, value in values.items():
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"not an environment variable name: {name!r}")
        if "\n" in str(value) or "\0" in str(value):
            raise ValueError(f"{name}: value contains a newline or NUL")
        lines.append(f"{name}={_env_quote(str(value))}\n")
    return write_private(Path(path), "".join(lines))
