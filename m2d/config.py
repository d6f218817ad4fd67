"""Where the gateway is and the researcher's API token.

`m2d login` stores both in ~/.config/m2d/config.json (mode 0600: the token is a
password). M2D_URL and M2D_TOKEN, when set, win over the file, so scripts and CI
need no file at all.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


class NotLoggedIn(Exception):
    pass


@dataclass(frozen=True)
class Settings:
    url: str
    token: str


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "m2d" / "config.json"


def save(url: str, token: str) -> Path:
    """Write the settings so that only their owner can read them, replacing the
    file in one step (a crash never leaves half a token)."""
    path = config_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config-", dir=path.parent)  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"url": url, "token": token}, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def load() -> Settings:
    stored = {}
    path = config_path()
    if path.is_file():
        stored = json.loads(path.read_text())
    url = os.environ.get("M2D_URL") or stored.get("url")
    token = os.environ.get("M2D_TOKEN") or stored.get("token")
    if not url or not token:
        missing = " and ".join(name for name, value in (("URL", url), ("token", token)) if not value)
        raise NotLoggedIn(f"No gateway {missing} known. Run: m2d login --url URL --token TOKEN "
                          "(or set M2D_URL and M2D_TOKEN).")
    return Settings(url=url.rstrip("/"), token=token)
