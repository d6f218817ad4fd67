"""Secrets the gateway must read back (MLflow passwords), encrypted at rest.

The key is a Fernet key in SECRETS_DIR/mlflow-key, apart from the database, so
a copy of the database (a dump, a backup, a job that reached the file) holds
only ciphertext. The key is made, mode 0600, by the first process that has to
encrypt something; reading never makes one, because a new key cannot open
what an old one sealed.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from flask import current_app

KEY_FILE = "mlflow-key"


class SecretsError(RuntimeError):
    pass


def key_path(cfg: Mapping[str, Any]) -> Path:
    return Path(cfg["SECRETS_DIR"]) / KEY_FILE


def encrypt(plain: str | None, cfg: Mapping[str, Any] | None = None) -> str | None:
    if plain is None:
        return None
    return _fernet(cfg, create=True).encrypt(plain.encode()).decode()


def decrypt(token: str | None, cfg: Mapping[str, Any] | None = None) -> str | None:
    if token is None:
        return None
    try:
        return _fernet(cfg, create=False).decrypt(token.encode()).decode()
    except InvalidToken:
        raise SecretsError(f"{key_path(cfg or current_app.config)} does not open this value: the key was "
                           "replaced or M2D_SECRETS_DIR points elsewhere. Restore the key, or approve the "
                           "user again (`flask --app gateway users approve EMAIL`) to set a new password.")


def _fernet(cfg: Mapping[str, Any] | None, create: bool) -> Fernet:
    path = key_path(cfg or current_app.config)
    if create and not path.exists():
        _make_key(path)
    try:
        return Fernet(path.read_bytes().strip())
    except FileNotFoundError:
        raise SecretsError(f"no key at {path}: set M2D_SECRETS_DIR to the folder that holds {KEY_FILE}")


def _make_key(path: Path) -> None:
    """Write a new key, 0600, unless another process wins the race: the
    temporary file is linked into place, which fails if the key appeared."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{KEY_FILE}.{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(Fernet.generate_key() + b"\n")
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
