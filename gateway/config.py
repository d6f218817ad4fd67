"""Configuration defaults, in one place.

Every key can be overridden from the environment with an ``M2D_`` prefix
(``M2D_SLURM_GPUS=2``), which is how the testbed's ``gateway.env``, the workers
and the test suite configure the app; ``create_app(config)`` overrides both.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from flask import Config, Flask

DEFAULTS = {
    "SECRET_KEY": None,  # required outside tests; make run generates one
    # Storage. The database is the only truth; DATA_DIR holds uploads, code,
    # exports and logs per submission and must be on the filesystem the
    # compute nodes share.
    "DATA_DIR": None,  # default: the app's instance folder
    "SQLALCHEMY_DATABASE_URI": None,  # default: sqlite in DATA_DIR
    # Queues (Redis carries ids only). The namespace keeps two deployments,
    # or a test run beside `make run`, from eating each other's work.
    # Redis must ask for a password (redis://:PASSWORD@host:port/0): whoever
    # can write to it hands work to the workers. The testbed runs its own.
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "QUEUE_NAMESPACE": "m2d",
    "POLL_INTERVAL": 10,  # seconds between sacct polls
    # Upload limits (see gateway.validation.Limits for the meaning).
    "MAX_ZIP_BYTES": 200 * 1024**2,
    "MAX_FILES": 2000,
    "MAX_UNCOMPRESSED_BYTES": 2 * 1024**3,
    "MAX_COMPRESSION_RATIO": 100.0,
    # Images (the site's paths; deploy/testbed/up.sh sets the testbed's)
    "APPTAINER": "apptainer",
    "BASE_IMAGE": None,  # required by the build workers
    "IMAGE_DIR": None,  # required by the build workers; on the shared filesystem
    "BUILD_BIND_CA": "/etc/ssl/certs/ca-certificates.crt",  # "" to not bind
    "BUILD_TIMEOUT": 1800,
    # passed to mksquashfs when the SIF is written ("-comp gzip -Xcompression-level 1"
    # trades image size for build time)
    "BUILD_MKSQUASHFS_ARGS": "",
    # Pythons: a zip's .python-version picks one; BASE_IMAGE is DEFAULT_PYTHON's
    # base, BASE_IMAGES the others' ("3.9=/path/base-3.9.sif,3.13=...").
    "PYTHONS": ("3.9", "3.11", "3.13"),
    "DEFAULT_PYTHON": "3.11",
    "BASE_IMAGES": {},
    # Where builds' pip finds packages (empty: PyPI and the image's pip
    # defaults). Local folders and file:// indexes are bound into the build.
    "PIP_INDEX_URL": "",
    "PIP_EXTRA_INDEX_URLS": (),
    "PIP_FIND_LINKS": (),  # wheelhouses: folders or URLs
    "PIP_CONSTRAINT": "",  # a constraints file on the build host
    # pip's cache, shared by every build (pip's cache is safe for concurrent
    # use); "" for none. Bound at /m2d/pip-cache in the build.
    "PIP_CACHE_DIR": "",
    # Environment images (env-*.sif) unused this long, and not the image of a
    # submission still in flight, are deleted (flask images gc, and hourly).
    "IMAGE_GC_DAYS": 30,
    # Sealed jobs. Jobs run as JOB_USER, an account that can read nothing of
    # the gateway's: sbatch and scancel run through `sudo -u JOB_USER` (a
    # narrow sudo rule, see deploy/testbed/accounts.sh). A submission's
    # folders belong to JOB_GROUP, so the job reads its code and writes its
    # export and logs; the gateway's account is a member of that group.
    "JOB_USER": "m2d-job",  # "" to submit as the gateway's own account
    "JOB_GROUP": "m2d-job",
    "RELAY_PYTHON": "python3",  # on the compute node; runs jobs/relay.py
    "MODELS_DIR": None,  # admins' model cache, bound read-only at /opt/m2d/models
    # Slurm
    "SLURM_ADAPTER": "cli",  # or "pyslurm"
    "SLURM_PARTITION": None,
    "SLURM_JOB_PREFIX": "m2d",  # jobs are named <prefix>-<submission id>
    "SLURM_GPUS": 1,
    "SLURM_CPUS": 1,
    "SLURM_MEM": "2G",
    "SLURM_TIME": "01:00:00",
    "APPTAINER_NV": False,  # --nv; off on the fake-GPU testbed
    "DATASET_DIR": None,  # required by the build workers (they write the job script)
    # Dry runs: every submission first runs as a short job on a synthetic twin
    # of the dataset (same layout and CSV schema, made by m2d.sample_data),
    # with M2D_DRY_RUN=1 in its environment; its whole log is the researcher's
    # to see, and only one that exits 0 lets the real job go to Slurm.
    # DRY_RUN off skips them for everyone; `flask users dry-run EMAIL --skip`
    # for one researcher.
    "DRY_RUN": True,
    "DRY_RUN_DATASET_DIR": None,  # required while DRY_RUN is on; bound at /mnt/dataset
    "DRY_RUN_PARTITION": None,  # default: SLURM_PARTITION
    "DRY_RUN_TIME": "00:10:00",
    "DRY_RUN_GPUS": 0,
    "DRY_RUN_LOG_BYTES": 64 * 1024,  # of stdout and of stderr each, kept and shown
    # What a failed job's stderr may show in the API and the failure email:
    # user code chooses what it prints, so this bounds what one run can carry
    # out of the dataset through that channel.
    "STDERR_TAIL_LINES": 20,
    "STDERR_TAIL_BYTES": 2000,
    # MLflow (server with basic-auth; the gateway provisions accounts)
    "MLFLOW_URL": "http://127.0.0.1:5001",  # as the gateway reaches it (admin API)
    "MLFLOW_JOB_URL": None,  # as the relay on a compute node reaches it; default MLFLOW_URL
    "MLFLOW_PUBLIC_URL": None,  # what researchers and their code use; default MLFLOW_URL
    "MLFLOW_ADMIN_USERNAME": "admin",
    "MLFLOW_ADMIN_PASSWORD": None,
    # Mail
    "SMTP_HOST": "127.0.0.1",
    "SMTP_PORT": 25,
    "MAIL_FROM": "Model-to-Data Gateway <noreply@localhost>",
    "PUBLIC_URL": "http://127.0.0.1:5000",
    # The web portal (gateway.auth, gateway.admin).
    "PLATFORM_NAME": "Model-to-Data Gateway",
    # Cookies are HttpOnly and SameSite=Lax always; Secure when the site is
    # served over HTTPS (on behind nginx in production, off for plain http).
    "SESSION_COOKIE_SECURE": False,
    # Links in emails: how long they work (seconds); each works once.
    "VERIFY_MAX_AGE": 2 * 24 * 3600,
    "RESET_MAX_AGE": 3600,
    # Rate limits (Flask-Limiter's notation). Wrong passwords count per
    # account and per address; sign-up and reset requests per address and
    # per email. Storage: the Redis rq uses (REDIS_URL) unless set, so every
    # gunicorn worker counts together; "memory://" in the fast tests.
    "RATELIMIT_STORAGE_URI": None,
    "LOGIN_LIMIT_ACCOUNT": "5 per minute",
    "LOGIN_LIMIT_ADDRESS": "20 per minute",
    "SIGNUP_LIMIT": "10 per hour",
    "RESET_LIMIT": "5 per hour",
    # Leaks bounded per researcher, and secrets kept apart from the database.
    # Uploads per user in any 24 hours: each run can carry something out
    # (metrics, stderr, emails), so repeated runs are capped too.
    "DAILY_SUBMISSIONS": 20,
    # Holds mlflow-key, the key that encrypts MLflow passwords in the
    # database (made 0600 on first use). Keep it outside DATA_DIR in
    # production, so a copy of the data folder or of the database alone opens
    # nothing; default DATA_DIR/secrets.
    "SECRETS_DIR": None,
    # The export airlock (gateway/airlock.py): files leave only after
    # RELEASE_APPROVALS distinct reviewers approve them (2: a two-person
    # rule), are downloadable for RELEASE_DAYS, and an export nobody released
    # is deleted EXPORT_RETENTION_DAYS after its job ended (warned 7 days
    # before). EXPORT_MAX_BYTES is checked when the job ends: a job over it
    # fails; a hard cap while it runs needs a filesystem quota on the
    # export folders (the job account's group or project quota).
    "RELEASE_APPROVALS": 1,
    "RELEASE_DAYS": 30,
    "EXPORT_RETENTION_DAYS": 90,
    "EXPORT_MAX_BYTES": 1024**3,
}


def convert(key: str, raw: Any) -> Any:
    """``raw`` as the type of ``key``'s default (text from the environment
    becomes an int, a float or a bool), so no caller casts again."""
    default = DEFAULTS.get(key)
    if not isinstance(raw, str) or default is None or isinstance(default, str):
        return raw
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, tuple):  # "a,b" or "a b"
        return tuple(item for item in re.split(r"[,\s]+", raw) if item)
    if isinstance(default, dict):  # "k=v,k=v"
        pairs = (item.split("=", 1) for item in re.split(r"[,\s]+", raw) if item)
        return {key.strip(): value.strip() for key, value in pairs}
    return type(default)(raw)


def from_environment(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """M2D_<KEY> values, converted to the type of the key's default.

    (Flask's from_prefixed_env would json-parse them, turning a generated
    password such as "12e45..." into a number.)
    """
    return {key: convert(key, environ[f"M2D_{key}"]) for key in DEFAULTS if f"M2D_{key}" in environ}


def load(app: Flask, overrides: Mapping[str, Any] | None = None) -> Config:
    app.config.update(DEFAULTS)
    app.config.update(from_environment())
    if overrides:
        app.config.update({key: convert(key, value) for key, value in overrides.items()})
    cfg = app.config
    cfg["DATA_DIR"] = os.path.abspath(cfg["DATA_DIR"] or app.instance_path)
    cfg["SECRETS_DIR"] = os.path.abspath(cfg["SECRETS_DIR"] or os.path.join(cfg["DATA_DIR"], "secrets"))
    if not cfg["SQLALCHEMY_DATABASE_URI"]:
        cfg["SQLALCHEMY_DATABASE_URI"] = "sqlite:///" + os.path.join(cfg["DATA_DIR"], "gateway.db")
    if not cfg["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        cfg["SQLALCHEMY_ENGINE_OPTIONS"] = {"pool_pre_ping": True}
    cfg["MLFLOW_JOB_URL"] = cfg["MLFLOW_JOB_URL"] or cfg["MLFLOW_URL"]
    cfg["MLFLOW_PUBLIC_URL"] = cfg["MLFLOW_PUBLIC_URL"] or cfg["MLFLOW_URL"]
    # the fast tests' apps (TESTING) count in memory unless told otherwise
    cfg["RATELIMIT_STORAGE_URI"] = (cfg["RATELIMIT_STORAGE_URI"]
                                    or ("memory://" if cfg.get("TESTING") else cfg["REDIS_URL"]))
    cfg["RATELIMIT_KEY_PREFIX"] = f"{cfg['QUEUE_NAMESPACE']}-limits"
    cfg["SESSION_COOKIE_HTTPONLY"] = True
    cfg["SESSION_COOKIE_SAMESITE"] = "Lax"
    cfg["REMEMBER_COOKIE_HTTPONLY"] = True
    cfg["REMEMBER_COOKIE_SAMESITE"] = "Lax"
    cfg["REMEMBER_COOKIE_SECURE"] = cfg["SESSION_COOKIE_SECURE"]
    # Werkzeug refuses bigger bodies with 413 before we read them.
    cfg["MAX_CONTENT_LENGTH"] = cfg["MAX_ZIP_BYTES"] + 1024 * 1024
    if not cfg["SECRET_KEY"]:
        if not cfg.get("TESTING"):
            raise RuntimeError("Set M2D_SECRET_KEY (make run generates one in the testbed's gateway.env)")
        cfg["SECRET_KEY"] = "test"
    return cfg


def required(cfg: Mapping[str, Any], key: str) -> Any:
    """A setting the caller cannot work without, or an error that names it."""
    if not cfg.get(key):
        raise RuntimeError(f"Set M2D_{key}: {key} has no default (see gateway/config.py)")
    return cfg[key]
