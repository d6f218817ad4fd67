"""What an environment image build costs beyond pip's own work, on the testbed.

    set -a; . /opt/testbed/gateway.env; set +a
    .venv/bin/python -m bench.build [REQUIREMENTS_FILE] [--python 3.11]

For one requirements set (default: the iris sample's) prints
  pip        pip's own `pip install` into a fresh venv on this host, with the
             site's sources and an empty cache (downloads included);
  cold       an image build in a fresh image folder with an empty pip cache;
  cached     a second image build of the same set (a fresh image folder, so no
             reuse) with the pip cache the cold build filled;
and the targets: cold <= pip + 10 s, cached <= 20 s. Runs as the user that
calls it (root on the testbed builds without --fakeroot).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway.adapters.apptainer import ImageBuilder
from gateway.config import DEFAULTS, from_environment

SAMPLE = Path(__file__).resolve().parent.parent / "m2d" / "samples" / "iris" / "requirements.txt"


def pip_alone(requirements: str, builder: ImageBuilder, work: Path) -> float:
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (work / "requirements.txt").write_text(requirements)
    options = builder.pip.options()
    if builder.pip.constraint:
        options[options.index("--constraint") + 1] = builder.pip.constraint
    started = time.monotonic()
    subprocess.run([str(venv / "bin" / "pip"), "install", "--no-cache-dir", "--progress-bar", "off", "-q",
                    *options, "-r", str(work / "requirements.txt")], check=True)
    return time.monotonic() - started


def build(cfg: dict, requirements: str, python: str, image_dir: Path, cache: Path) -> float:
    builder = ImageBuilder.from_config({**cfg, "IMAGE_DIR": str(image_dir), "PIP_CACHE_DIR": str(cache)})
    image = builder.ensure(requirements, python)
    assert image.built, "a fresh image folder must build"
    return image.seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("requirements", nargs="?", default=str(SAMPLE))
    parser.add_argument("--python", default=None)
    args = parser.parse_args()
    cfg = {**DEFAULTS, **from_environment()}
    python = args.python or cfg["DEFAULT_PYTHON"]
    requirements = Path(args.requirements).read_text()
    # under the testbed's folder: the Apptainer wrapper shares it, and the rename stays on one filesystem
    root = Path(cfg["IMAGE_DIR"]).parent
    with tempfile.TemporaryDirectory(prefix="bench-build-", dir=root) as tmp:
        work = Path(tmp)
        cache = work / "pip-cache"
        pip = pip_alone(requirements, ImageBuilder.from_config(cfg), work)
        cold = build(cfg, requirements, python, work / "cold", cache)
        cached = build(cfg, requirements, python, work / "cached", cache)
    print(f"requirements: {' '.join(requirements.split())} (Python {python})")
    print(f"pip alone     {pip:6.1f} s")
    print(f"cold build    {cold:6.1f} s   overhead {cold - pip:+.1f} s (target <= +10 s)  "
          f"{'ok' if cold - pip <= 10 else 'MISSED'}")
    print(f"cached build  {cached:6.1f} s   (target <= 20 s)  {'ok' if cached <= 20 else 'MISSED'}")


if __name__ == "__main__":
    main()
