"""The model cache: pretrained weights that admins place for jobs, which have no network.

    MODELS_DIR/torch/hub/checkpoints/resnet18-f37072fd.pth   torchvision's weights
    MODELS_DIR/huggingface/...                                Hugging Face's cache

Every job sees MODELS_DIR read-only at /opt/m2d/models, with TORCH_HOME,
HF_HOME and HF_HUB_OFFLINE=1 pointing into it (singularity/job.sbatch.j2), so
``resnet18(weights=...)`` loads the file instead of downloading it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath

from ..config import required


class WeightsError(ValueError):
    pass


def cache_dir(cfg) -> Path:
    return Path(required(cfg, "MODELS_DIR"))


def add(cfg, source: Path, name: str) -> Path:
    """Copy ``source`` into the cache as ``name`` (a relative path such as
    torch/hub/checkpoints/resnet18-f37072fd.pth), readable by every job."""
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise WeightsError(f"--as {name!r}: give a path inside the cache, such as "
                           "torch/hub/checkpoints/resnet18-f37072fd.pth")
    if not source.is_file():
        raise WeightsError(f"{source} is not a file")
    folder = cache_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    for part in ("", *relative.parts[:-1]):
        folder = folder / part
        folder.mkdir(exist_ok=True)
        folder.chmod(0o755)  # jobs run as another account: they read, never write
    target = folder / relative.name
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, partial)
    partial.chmod(0o644)
    os.replace(partial, target)  # a job sees the whole file or none
    return target


def listing(cfg) -> list[tuple[str, int]]:
    """(relative path, size) of every file in the cache."""
    root = cache_dir(cfg)
    return sorted((path.relative_to(root).as_posix(), path.stat().st_size)
                  for path in root.rglob("*") if path.is_file() and not path.name.startswith("."))
