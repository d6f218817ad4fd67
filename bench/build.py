"""What an environment image build costs beyond pip's own work, on the testbed.

    set -a; . /opt/testbed/gateway.env; set +a
    .venv/bin/python -m bench.build [REQUIREMENTS_FILE] [--python 3.11] [--pip]

For one requirements set (default: the iris sample's) prints
  pip        pip's own `pip install` into a fresh venv on this host, with the
             site's sources and an empty cache (downloads included);
  cold       an image build in a fresh image folder with an empty cache;
  cached     a second image build of the same set (a fresh image folder, so no
             reuse) with the cache the cold build filled;
  subset     a build of another set whose packages are all cached: the set
             without its last line (skipped for a one-line set);
each build with its steps (install, squash, image), and the targets: cold <=
pip + 10 s, cached and subset <= 20 s. Builds use uv when the settings name
one (BUILD_UV), pip otherwise; --pip measures pip's builds. Runs as the user
that calls it (root on the testbed builds without --fakeroot).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway.adapters.apptainer import Image, ImageBuilder
from gateway.config import DEFAULTS, from_environment
from m2d.contract.validation import normalise_requirements

SAMPLE = Path(__file__).resolve().parent.parent / "m2d" / "samples" / "iris" / "requirements.txt"
CACHED_TARGET = 20.0
COLD_OVERHEAD_TARGET = 10.0


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


def build(cfg: dict, requirements: str, python: str, image_dir: Path, cache: Path) -> Image:
    builder = ImageBuilder.from_config({**cfg, "IMAGE_DIR": str(image_dir), "PIP_CACHE_DIR": str(cache)})
    image = builder.ensure(requirements, python)
    assert image.built, "a fresh image folder must build"
    return image


def report(name: str, image: Image, verdict: str) -> None:
    steps = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in image.phases.items())
    print(f"{name:<13}{image.seconds:6.1f} s   ({steps})   {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("requirements", nargs="?", default=str(SAMPLE))
    parser.add_argument("--python", default=None)
    parser.add_argument("--pip", action="store_true", help="build with pip even where BUILD_UV names uv")
    args = parser.parse_args()
    cfg = {**DEFAULTS, **from_environment()}
    if args.pip:
        cfg["BUILD_UV"] = ""
    python = args.python or cfg["DEFAULT_PYTHON"]
    requirements = Path(args.requirements).read_text()
    lines = normalise_requirements(requirements).splitlines()
    subset = "\n".join(lines[:-1]) + "\n" if len(lines) > 1 else ""
    # under the testbed's folder: the Apptainer wrapper shares it, and the rename stays on one filesystem
    root = Path(cfg["IMAGE_DIR"]).parent
    with tempfile.TemporaryDirectory(prefix="bench-build-", dir=root) as tmp:
        work = Path(tmp)
        cache = work / "pip-cache"
        pip = pip_alone(requirements, ImageBuilder.from_config(cfg), work)
        cold = build(cfg, requirements, python, work / "cold", cache)
        cached = build(cfg, requirements, python, work / "cached", cache)
        shared = build(cfg, subset, python, work / "subset", cache) if subset else None
    print(f"requirements: {' '.join(lines)} (Python {python}); installer: "
          f"{'uv ' + cfg['BUILD_UV'] if cfg['BUILD_UV'] else 'pip'}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'pip alone':<13}{pip:6.1f} s")
    overhead = cold.seconds - pip
    report("cold build", cold, f"overhead {overhead:+.1f} s (target <= +{COLD_OVERHEAD_TARGET:.0f} s) "
           f"{'ok' if overhead <= COLD_OVERHEAD_TARGET else 'MISSED'}")
    for name, image in (("cached build", cached), ("subset build", shared)):
        if image is not None:
            report(name, image, f"(target <= {CACHED_TARGET:.0f} s) "
                   f"{'ok' if image.seconds <= CACHED_TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
