"""The researcher's m2d client run as a command, from this clone, against a stack."""
import os
import subprocess
import sys

from .stack import REPO


def m2d(*args, env, cwd, timeout=120):
    environment = {**os.environ, "PYTHONPATH": str(REPO), "M2D_URL": "", "M2D_TOKEN": "", **env}
    return subprocess.run([sys.executable, "-m", "m2d", *map(str, args)], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def m2d_as(researcher, *args, timeout=60):
    """`python -m m2d ARGS` as the researcher (their gateway URL and token), finished."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "M2D_URL": researcher.url, "M2D_TOKEN": researcher.token}
    return subprocess.run([sys.executable, "-m", "m2d", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)
