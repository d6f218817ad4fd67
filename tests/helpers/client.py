"""The researcher's m2d client run as a command, from this clone, against a stack."""
import os
import subprocess
import sys

from .stack import REPO


def m2d(*args, env, cwd, timeout=120):
    environment = {**os.environ, "PYTHONPATH": str(REPO), "M2D_URL": "", "M2D_TOKEN": "", **env}
    return subprocess.run([sys.executable, "-m", "m2d", *map(str, args)], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=timeout)
