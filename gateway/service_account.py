"""Admin commands run as the gateway's own account, never as root.

`flask --app gateway ...` writes what the gateway must read later (released
copies, images, the SQLite database, secrets): written by root they are
root:root 0600, and the gateway's download answers 500. So a command started as
root re-executes itself, before it touches anything, as the account that owns
DATA_DIR (the nearest folder of it that exists): the gateway's service account,
by construction. Where that cannot be done it refuses, saying how to run it.
"""
from __future__ import annotations

import os
import pwd
import shutil
import sys
from pathlib import Path

import click


def owner_of(data_dir: str) -> pwd.struct_passwd:
    path = Path(data_dir)
    while not path.exists():
        path = path.parent
    return pwd.getpwuid(path.stat().st_uid)


def command(account: str) -> list[str]:
    """This very command line, run as ``account`` (its groups, its HOME)."""
    return ["setpriv", f"--reuid={account}", f"--regid={account}", "--init-groups", "--", *sys.orig_argv]


def switch_if_root(data_dir: str) -> None:
    """Inside an admin command started as root, become DATA_DIR's owner (exec: no return)."""
    if os.geteuid() != 0 or click.get_current_context(silent=True) is None:
        return  # not root, or not a command (gunicorn, a worker, a test's app)
    account = owner_of(data_dir)
    if account.pw_uid == 0:
        return  # root owns the data: a root-run gateway (pyslurm), nothing to protect
    argv = command(account.pw_name)
    if shutil.which("setpriv") is None:
        raise click.ClickException(
            f"run admin commands as the gateway's account {account.pw_name}, which owns {data_dir}, not as root: "
            f"su -s /bin/sh {account.pw_name} -c 'flask --app gateway ...' (setpriv, which does it for you, "
            "is not installed)")
    click.echo(f"flask: running as {account.pw_name}, the owner of {data_dir} (not root)", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe("setpriv", argv, {**os.environ, "HOME": account.pw_dir, "USER": account.pw_name,
                                 "LOGNAME": account.pw_name})
