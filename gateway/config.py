"""Every ``M2D_*`` setting, in one table: its name, type, default and meaning.

Each key is read from the environment with an ``M2D_`` prefix
(``M2D_SLURM_GPUS=2``), which is how the testbed's ``gateway.env``, the workers
and the test suite configure the app; ``create_app(config)`` overrides both.
A value that is not of the setting's type stops the process at start (web,
workers, poller, flask CLI) with the setting, the value and what is expected.

``python -m gateway.config`` writes docs/configuration.md from this table
(a unit test fails when the two differ).
"""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Config, Flask

from m2d.contract import twin


class ConfigError(RuntimeError):
    """A setting the gateway cannot start with; the message names it and says what is expected."""


@dataclass(frozen=True)
class Setting:
    name: str  # without the M2D_ prefix
    type: type  # str, int, float, bool, tuple (a list) or dict (k=v pairs)
    default: Any
    meaning: str
    choices: tuple[str, ...] = ()
    item: type = str  # a list's items

    @property
    def expected(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        return {str: "text", int: "a whole number", float: "a number", bool: "1/0, true/false, yes/no or on/off",
                tuple: f"a list of {'whole numbers' if self.item is int else 'words'} separated by commas or spaces",
                dict: "KEY=VALUE pairs separated by commas"}[self.type]

    def parse(self, raw: Any) -> Any:
        """``raw`` as this setting's type (text from the environment becomes an
        int, a float, a bool, ...), so no caller casts again; ConfigError if it is not one."""
        if not isinstance(raw, str):
            return raw  # a value given by code (create_app's overrides) is already typed
        if self.choices and raw not in self.choices:
            raise self.refuse(raw)
        if self.type is str:
            return raw
        if self.type is bool:
            word = raw.strip().lower()
            if word in ("1", "true", "yes", "on"):
                return True
            if word in ("0", "false", "no", "off", ""):
                return False
            raise self.refuse(raw)
        if self.type is tuple:
            try:
                return tuple(self.item(item) for item in re.split(r"[,\s]+", raw) if item)
            except ValueError:
                raise self.refuse(raw) from None
        if self.type is dict:
            pairs = [item.split("=", 1) for item in re.split(r"[,\s]+", raw) if item]
            if any(len(pair) != 2 or not pair[0].strip() for pair in pairs):
                raise self.refuse(raw)
            return {key.strip(): value.strip() for key, value in pairs}
        try:
            return self.type(raw)
        except ValueError:
            raise self.refuse(raw) from None

    def refuse(self, raw: str) -> ConfigError:
        return ConfigError(f"M2D_{self.name}={raw!r} is not valid: expected {self.expected} "
                           f"(see docs/configuration.md)")


S = Setting


SETTINGS: tuple[Setting, ...] = (
    S("SECRET_KEY", str, None, "Signs sessions and email links. Required outside tests; `make run` generates one."),
    # Storage. The database is the only truth.
    S("DATA_DIR", str, None, "Uploads, code, exports and logs per submission; on the filesystem the compute "
      "nodes share. Default: the app's instance folder."),
    S("SQLALCHEMY_DATABASE_URI", str, None, "The database (PostgreSQL in production). Default: SQLite in DATA_DIR."),
    # Queues (Redis carries ids only).
    S("REDIS_URL", str, "redis://127.0.0.1:6379/0", "rq's Redis, with a password (redis://:PASSWORD@host:port/0): "
      "whoever can write to it hands work to the workers."),
    S("QUEUE_NAMESPACE", str, "m2d", "Prefix of queue names, so two deployments (or a test run beside `make run`) "
      "do not eat each other's work."),
    S("POLL_INTERVAL", int, 10, "Seconds between the poller's sacct cycles."),
    # Pushed job events (jobs.events): Slurm's PrologSlurmctld and jobcomp/script post a job id, the poll reconciles
    S("SLURM_EVENTS_TOKEN", str, None, "The bearer token deploy/libexec/m2d-slurm-event sends to POST /slurm/events "
      "when a job starts or ends (docs/admin.md, \"Pushed job events\"); the gateway then checks that job at once. "
      "Empty: no pushes, the poll every POLL_INTERVAL alone."),
    S("PUSHED_POLL_INTERVAL", int, 60, "Seconds between the poller's sacct cycles while Slurm pushes job events "
      "(SLURM_EVENTS_TOKEN set): the backstop that finds what a lost push missed."),
    # Recovery and alerts (jobs.poller's sweep, gateway.core.alerts)
    S("SWEEP_AFTER", int, 60, "Seconds after which work the database owes but no queue holds (Redis lost it, a "
      "worker died) is queued again by the poller's sweep."),
    S("PREPARE_ATTEMPTS", int, 5, "Times a prepare (build, sbatch) that fails for a reason other than Slurm (an "
      "unreadable file, a full disk) is tried before its submission fails."),
    S("PREPARE_RETRY_SECONDS", tuple, (30, 120, 600), "Seconds before each new try of a prepare or a disclosure "
      "report that Slurm or MLflow refused (down, restarting); after the last, a prepare fails its submission "
      "saying which, and the poller's sweep hands a report on again.", item=int),
    S("PREPARE_BACKOFF", int, 60, "Seconds before a failed prepare is tried again; doubled after each failure, at "
      "most an hour."),
    S("STUCK_AFTER", dict, {"received": "900", "building": "3600", "dry_run_queued": "86400",
                            "dry_run_running": "3600", "dry_run_passed": "900", "queued": "172800",
                            "running": "90000"},
      "Seconds a submission may stay in a status (`status=seconds`, a status left out: never) before the admins "
      "get one alert email and the admin pages flag it."),
    # Upload limits (m2d.contract.validation.UploadLimits)
    S("MAX_ZIP_BYTES", int, 200 * 1024**2, "Largest upload (bytes)."),
    S("MAX_FILES", int, 2000, "Most files in one zip."),
    S("MAX_UNCOMPRESSED_BYTES", int, 2 * 1024**3, "Largest unpacked size of one zip (bytes)."),
    S("MAX_COMPRESSION_RATIO", float, 100.0, "Largest unpacked/packed ratio of a zip member (zip bombs)."),
    # Images
    S("APPTAINER", str, "apptainer", "The apptainer command."),
    S("BASE_IMAGE", str, None, "The base SIF of DEFAULT_PYTHON. Required by the build workers."),
    S("IMAGE_DIR", str, None, "Where environment images are kept, on the shared filesystem. Required by the build "
      "workers."),
    S("BUILD_BIND_CA", str, "/etc/ssl/certs/ca-certificates.crt", "CA bundle bound into builds; empty to not bind."),
    S("BUILD_TIMEOUT", int, 1800, "Seconds one image build may take."),
    S("MKSQUASHFS", str, "mksquashfs", "mksquashfs (squashfs-tools) that writes an image's environment layer."),
    S("BUILD_MKSQUASHFS_ARGS", str, "", "Passed to mksquashfs when an environment layer is written (`-comp zstd "
      "-Xcompression-level 1`: a quarter of gzip level 1's time, as small; squashfuse and Linux >= 4.14 read it)."),
    S("PYTHONS", tuple, ("3.9", "3.11", "3.13"), "Pythons a zip's .python-version may pick."),
    S("DEFAULT_PYTHON", str, "3.11", "The Python of a zip without .python-version (its base is BASE_IMAGE)."),
    S("BASE_IMAGES", dict, {}, "The other Pythons' base SIFs (`3.9=/path/base-3.9.sif,3.13=...`)."),
    S("PIP_INDEX_URL", str, "", "Builds' pip index; empty: PyPI and the image's pip defaults. Local folders and "
      "file:// indexes are bound into the build."),
    S("PIP_EXTRA_INDEX_URLS", tuple, (), "More pip indexes for builds."),
    S("PIP_FIND_LINKS", tuple, (), "Wheelhouses for builds: folders or URLs."),
    S("PIP_CONSTRAINT", str, "", "A pip constraints file on the build host."),
    S("PIP_CACHE_DIR", str, "", "pip's and uv's cache, shared by every build's wheels-only step (no researcher "
      "code runs there), bound at /m2d/pip-cache; a build from source (an sdist) neither reads nor keeps it. "
      "Empty for none."),
    S("BUILD_INDEX_HOSTS", tuple, ("pypi.org", "files.pythonhosted.org"), "The only hosts a build reaches (HTTPS, "
      "through the gateway's proxy; `name` is port 443, else `name:port`): the index PIP_INDEX_URL, "
      "PIP_EXTRA_INDEX_URLS and PIP_FIND_LINKS name, and where it serves files from. A build has no other network."),
    S("BUILD_UV", str, "", "A uv binary on the build host (the `uv` wheel's, any Linux base runs it), bound "
      "read-only into builds: they install with `uv pip install` (the same sources, its cache in PIP_CACHE_DIR) "
      "and fall back to pip when uv refuses the requirements; empty: pip alone."),
    S("IMAGE_GC_DAYS", int, 30, "Environment images unused this long, and not the image of a submission in "
      "flight, are deleted (`flask --app gateway images gc`, and hourly)."),
    # Sealed jobs: sbatch/scancel run as JOB_USER through a root wrapper (deploy/libexec/m2d-slurm).
    S("JOB_USER", str, "m2d-job", "The account jobs run as, which can read nothing of the gateway's; empty to "
      "submit as the gateway's own account."),
    S("SLURM_WRAPPER", str, "/usr/local/libexec/m2d/m2d-slurm", "The root-owned wrapper (deploy/libexec/m2d-slurm) "
      "that runs sbatch and scancel as JOB_USER with fixed options, through `sudo -n` (docs/admin.md)."),
    S("JOB_GROUP", str, "m2d-job", "Group of a submission's folders (the job reads its code, writes its export "
      "and logs); the gateway's account is a member."),
    S("RELAY_PYTHON", str, "python3", "Python on the compute node that runs singularity/relay.py."),
    S("MODELS_DIR", str, None, "The admins' model cache, bound read-only at /opt/m2d/models."),
    # Slurm
    S("SLURM_ADAPTER", str, "cli", "How the gateway talks to Slurm.", choices=("cli", "pyslurm")),
    S("SLURM_PARTITION", str, None, "Partition of real jobs; default: Slurm's default partition."),
    S("SLURM_JOB_PREFIX", str, "m2d", "Jobs are named <prefix>-<submission id>."),
    S("SLURM_GPUS", int, 1, "GPUs per real job (--gres=gpu:N)."),
    S("SLURM_CPUS", int, 1, "CPUs per job."),
    S("SLURM_MEM", str, "2G", "Memory per job (Slurm's notation)."),
    S("SLURM_TIME", str, "01:00:00", "Time limit of a real job."),
    # Fair share and limits, in Slurm's own terms (gateway/adapters/slurm/accounting.py): each researcher is
    # a Slurm account; the limits are the association's, enforced by Slurm (AccountingStorageEnforce).
    S("SLURM_ACCOUNTS", bool, True, "Give each approved researcher a Slurm account (<SLURM_ACCOUNT_PREFIX><user> "
      "under SLURM_PARENT_ACCOUNT) and submit their jobs with --account; off: all jobs run under the job "
      "user's default account."),
    S("SLURM_PARENT_ACCOUNT", str, "m2d", "Slurm account the researchers' accounts live under; the gateway's OS "
      "account coordinates it (docs/admin.md)."),
    S("SLURM_ACCOUNT_PREFIX", str, "m2d-", "A researcher's Slurm account is this plus their MLflow user name."),
    S("SLURM_QOS", str, "", "QOS (and default QOS) of the researchers' accounts; empty: the parent's."),
    S("SLURM_MAX_RUNNING", int, 0, "Jobs one researcher may have running at once (MaxJobs); 0: no limit."),
    S("SLURM_MAX_QUEUED", int, 0, "Jobs one researcher may have running and waiting (MaxSubmitJobs); an sbatch "
      "beyond it fails with Slurm's message. 0: no limit."),
    S("SLURM_GPU_MINUTES", int, 0, "GPU minutes per researcher per usage period (GrpTRESMins=gres/gpu=N; the "
      "period is Slurm's PriorityUsageResetPeriod). 0: no limit."),
    S("SLURM_MAX_WALL", str, "", "Longest time limit one job of a researcher may have (MaxWall); empty: none."),
    S("USAGE_CACHE_SECONDS", int, 60, "Seconds the usage figures (sshare, sreport) are kept in Redis before "
      "Slurm is asked again."),
    S("APPTAINER_NV", bool, False, "Pass --nv (real NVIDIA GPUs); off on the fake-GPU testbed."),
    S("DATASET_DIR", str, None, "The dataset, bound read-only at /mnt/dataset. Required by the build workers."),
    S("DATASET_VERSION", str, twin.DEFAULT_VERSION, "Version of the dataset in DATASET_DIR: recorded on each "
      "submission, and it picks the synthetic twin of the dry runs (change both together)."),
    # Dry runs on the synthetic twin (M2D_DRY_RUN=1 inside the job)
    S("DRY_RUN", bool, True, "Run every submission first on the synthetic twin; only one that exits 0 lets the "
      "real job go (`flask --app gateway users dry-run EMAIL --skip` for one researcher)."),
    S("TWIN_DIR", str, None, "The synthetic twins, one folder per DATASET_VERSION (TWIN_DIR/<version>, bound at "
      "/mnt/dataset in a dry run), made by m2d.contract.sample_data on first use in the shape of DATASET_DIR (its CSV "
      "files' split, label and view counts, scaled down, at least 4 cases per split and label). On the "
      "filesystem the compute nodes share. Default: DATA_DIR/twins."),
    S("DRY_RUN_PARTITION", str, None, "Partition of dry runs; default: SLURM_PARTITION."),
    S("DRY_RUN_TIME", str, "00:10:00", "Time limit of a dry run."),
    S("DRY_RUN_GPUS", int, 0, "GPUs per dry run."),
    S("DRY_RUN_LOG_BYTES", int, 64 * 1024, "Bytes of a dry run's stdout and of its stderr kept and shown."),
    # User code chooses what it prints: these bound what one run carries out through stderr.
    S("STDERR_TAIL_LINES", int, 20, "Lines of a failed job's stderr shown in the API and the email."),
    S("STDERR_TAIL_BYTES", int, 2000, "Bytes of a failed job's stderr shown in the API and the email."),
    # MLflow (basic auth; the gateway provisions accounts)
    S("MLFLOW_URL", str, "http://127.0.0.1:5001", "MLflow as the gateway reaches it (admin API)."),
    S("MLFLOW_JOB_URL", str, None, "MLflow as the relay on a compute node reaches it; default MLFLOW_URL."),
    S("MLFLOW_PUBLIC_URL", str, None, "MLflow as researchers and their code see it; default MLFLOW_URL."),
    S("MLFLOW_ADMIN_USERNAME", str, "admin", "MLflow admin account the gateway provisions users with."),
    S("MLFLOW_ADMIN_PASSWORD", str, None, "Its password."),
    S("MLFLOW_TEXT_BUDGET", int, 1_000_000, "Bytes of text one job may store in MLflow through "
      "its relay: run names, param and tag keys and values (every tag write), metric names. `m2d run` uses the "
      "default (the relay's own, singularity/relay.py; a unit test holds the two equal)."),
    S("MLFLOW_METRIC_BUDGET", int, 100_000, "Metric points one job may store in MLflow "
      "(each carries a value, a timestamp and a step: 24 bytes)."),
    S("MLFLOW_FLAG_STEPS", int, 10_000, "A run whose metric has more distinct steps than this is flagged for "
      "its reviewers (the relay's m2d.flag.per_case_metrics tag): a step per training case."),
    S("MLFLOW_FLAG_KEYS", int, 1_000, "... a run with more distinct metric keys than this."),
    S("MLFLOW_FLAG_NUMBERED_KEYS", int, 100, "... a run with more metric keys than this that differ only in a "
      "number (loss_case_1, loss_case_2...): a key per training case."),
    S("MLFLOW_CALLS_PER_SECOND", float, 20.0, "Calls a second the site's MLflow serves for jobs' relays; each "
      "job gets MLFLOW_CALLS_PER_SECOND / MLFLOW_JOBS_AT_ONCE of them (log calls are batched: once a second, or "
      "once a turn when a job's share is under one call a second)."),
    S("MLFLOW_JOBS_AT_ONCE", int, 10, "The most jobs running at once on the cluster (its GPU or job slots), "
      "which share MLFLOW_CALLS_PER_SECOND equally."),
    S("MLFLOW_PAGE_TIMEOUT", float, 5.0, "Seconds each MLflow call may take when a submission's page shows its "
      "runs; past it the page says MLflow is unreachable."),
    S("MLFLOW_PAGE_CACHE_SECONDS", int, 30, "Seconds a submission's MLflow runs (and MLflow being unreachable) "
      "are kept in Redis before a page view asks MLflow again."),
    # Mail
    S("SMTP_HOST", str, "127.0.0.1", "SMTP relay host."),
    S("SMTP_PORT", int, 25, "SMTP relay port."),
    S("SMTP_TIMEOUT", int, 30, "Seconds the SMTP relay may take to answer."),
    S("MAIL_CLAIM_SECONDS", int, 600, "Seconds after which an email claimed by a sender that never marked it sent "
      "(it died) may be claimed again; keep it well above SMTP_TIMEOUT, or a slow send is sent twice."),
    S("MAIL_RETRY_SECONDS", tuple, (5, 15, 60, 300, 900), "Seconds before each new try of a send that failed (SMTP "
      "down); after the last, the poller's sweep queues it again.", item=int),
    S("MAIL_FROM", str, "Model-to-Data Gateway <noreply@localhost>", "From: of every email."),
    S("PUBLIC_URL", str, "http://127.0.0.1:5000", "The portal's address, used in links in emails."),
    # Web portal
    S("PLATFORM_NAME", str, "Model-to-Data Gateway", "Name shown on pages and in emails."),
    S("SESSION_COOKIE_SECURE", bool, False, "Secure cookies: on when served over HTTPS (behind nginx), off for "
      "plain http. Cookies are always HttpOnly and SameSite=Lax."),
    S("PROXY_HOPS", int, 0, "Reverse proxies in front (nginx: 1): trust that many X-Forwarded-For/-Proto/-Host "
      "hops (werkzeug's ProxyFix). 0 when the gateway is reached directly."),
    S("VERIFY_MAX_AGE", int, 2 * 24 * 3600, "Seconds an email-verification link works (once)."),
    S("RESET_MAX_AGE", int, 3600, "Seconds a password-reset link works (once)."),
    S("RATELIMIT_STORAGE_URI", str, None, "Flask-Limiter's storage; default REDIS_URL, so every gunicorn worker "
      "counts together (memory:// in the fast tests)."),
    S("LOGIN_LIMIT_ACCOUNT", str, "5 per minute", "Wrong passwords per account (Flask-Limiter's notation)."),
    S("LOGIN_LIMIT_ADDRESS", str, "20 per minute", "Wrong passwords per client address."),
    S("SIGNUP_LIMIT", str, "10 per hour", "Sign-ups per address and per email."),
    S("RESET_LIMIT", str, "5 per hour", "Password-reset requests per address and per email."),
    # Operations: /healthz and /metrics (gateway/web/ops.py, gateway/metrics.py)
    S("HEALTH_TIMEOUT", float, 3.0, "Seconds /healthz waits for each part (database, Redis, Slurm, MLflow, SMTP, "
      "disk); one that does not answer in time is reported down."),
    S("HEALTH_MIN_FREE_MB", int, 1024, "Free space DATA_DIR and IMAGE_DIR must have, or /healthz reports the disk "
      "down."),
    S("METRICS_TOKEN", str, None, "Bearer token a Prometheus scrape of /metrics must send; unset: /metrics answers "
      "only clients on the loopback that did not come through a proxy."),
    # Leaks bounded per researcher, secrets apart from the database
    S("DAILY_SUBMISSIONS", int, 20, "Uploads per researcher in any 24 hours (each run can carry something out)."),
    S("SECRETS_DIR", str, None, "Holds mlflow-key, which encrypts MLflow passwords in the database (0600). Keep "
      "it outside DATA_DIR in production; default DATA_DIR/secrets."),
    # The export airlock (gateway/core/airlock.py)
    S("RELEASE_APPROVALS", int, 2, "Distinct reviewers who must approve an export file before it leaves (2: the "
      "two-person rule)."),
    S("RELEASE_DAYS", int, 30, "Days a released export stays downloadable."),
    S("EXPORT_RETENTION_DAYS", int, 90, "Days after its job ended that an unreleased export is deleted (warned "
      "7 days before)."),
    # What a job can write while it runs: /mnt/export is a filesystem image of this size and number of
    # files (made by the job, read back into export/ when it ends); its stdout and stderr are cut.
    S("EXPORT_MAX_BYTES", int, 2 * 1024**3, "Largest export (bytes; default 2 GiB, a ResNet checkpoint and its "
      "results): /mnt/export holds no more, in the real job and the dry run; a job that fills it fails."),
    S("EXPORT_MAX_FILES", int, 10_000, "Most files and folders in /mnt/export (the real job's and the dry run's); "
      "a job that makes more fails."),
    S("JOB_LOG_MAX_BYTES", int, 10 * 1024**2, "Bytes of a job's stdout and of its stderr kept (Slurm's .out and "
      ".err); the rest is dropped and counted in a last line."),
    # What a job wrote is read once it ended (gateway/core/jobfiles.py), within bounds: past one, that
    # submission fails with the reason (a dry run: dry_run_failed), the poll cycle goes on.
    # What leaves, and differencing across releases (gateway/core/releases.py)
    S("RELEASE_SANITISED_MODELS", bool, True, "A released model file (PyTorch or safetensors, by content) leaves as "
      "the copy the disclosure report job re-saved as plain tensors (safetensors, no pickled code) with its floats "
      "rounded to RELEASE_MANTISSA_BITS bits of mantissa, which removes payloads hidden in the weights' low bits. "
      "A model it cannot re-save is `review` and leaves as written. Off: every file leaves as the job wrote it."),
    S("RELEASE_MANTISSA_BITS", int, 7, "Mantissa bits a sanitised model's floats keep, rounded to nearest "
      "(7: bfloat16's precision; float32 has 23)."),
    S("RELEASE_DIFF_MODEL", float, 0.02, "A model whose weights differ from one released to the same researcher "
      "before by less than this (relative distance) is flagged for review: differencing across releases."),
    S("RELEASE_DIFF_CELLS", int, 10, "A table with the header and shape of one released to the same researcher "
      "before, whose changed cells all moved by at most this much, is flagged for review."),
    S("EXPORT_MAX_DEPTH", int, 16, "Deepest folder nesting an export may have."),
    S("EXPORT_READ_SECONDS", float, 120.0, "Seconds the gateway may spend reading (hashing) one export."),
    # Disclosure control (gateway/core/disclosure.py): a sealed job on the data side checks every export file
    # (m2d/disclosure) before reviewers may release it; the gateway only reads the report it wrote.
    S("DISCLOSURE_REPORTS", bool, True, "Every ended job's export gets a disclosure report (pass, review or fail per "
      "file, with reasons) from a sealed Slurm job before any of its files can be released. Off: reviewers decide "
      "on the file list alone."),
    S("DISCLOSURE_INDEX_DIR", str, None, "The dataset's fingerprint index, one folder per DATASET_VERSION, built by "
      "the report job on first use: owned by JOB_USER with a group the gateway is not in (the dataset's), setgid, "
      "never readable by the gateway. Required with DISCLOSURE_REPORTS."),
    S("DISCLOSURE_SECONDS", int, 1800, "Seconds the checker may spend on one export (it marks what it could not "
      "finish `fail`); the report job's Slurm time limit is this plus 5 minutes."),
    S("DISCLOSURE_MEM", str, "4G", "Memory of a report job (Slurm's notation)."),
    S("DISCLOSURE_REPORT_MAX_BYTES", int, 16 * 1024**2, "Largest report (and SACRO results file) the gateway reads "
      "back; a larger one is a failed report."),
    S("DISCLOSURE_MIA_SECONDS", int, 600, "Seconds a submission's prediction entry point (m2d.toml's [disclosure] "
      "predict) may take, in its own image, to predict the membership attack's images; past it the membership check "
      "is `review`. Part of the report job's Slurm time limit."),
    S("DISCLOSURE_MIA_MAX_IMAGES", int, 500, "Images of each split (train: members, test: non-members) the "
      "membership attack asks predict about, the same ones every time (chosen by a hash of the image path)."),
    S("DISCLOSURE_MIA_FAIL_AUC", float, 0.8, "A model file whose loss-threshold membership attack reaches an AUC "
      "above this fails its `membership` check."),
    S("DISCLOSURE_MIA_REVIEW_AUC", float, 0.6, "Above this AUC (and up to DISCLOSURE_MIA_FAIL_AUC) the `membership` "
      "check is `review`; at most this, `pass`."),
    S("DISCLOSURE_MIA_MIN_CASES", int, 20, "Fewest distinct cases on each side (train, test) for a membership "
      "attack to count; fewer: `review`, saying so."),
    S("DISCLOSURE_SANITISED_MAX_AUC_DROP", float, 0.05, "A model file that leaves as its sanitised (rounded) copy, "
      "where the submission declares predict: the copy's held-out AUC may lie this much below the original's; "
      "further below (or predict failing on the copy) makes its `sanitised-metric` check `review`."),
    S("DISCLOSURE_OVERRIDES", int, 2, "Distinct reviewers who must override a `fail` file, each with a written "
      "reason, before it can be released."),
)

BY_NAME = {setting.name: setting for setting in SETTINGS}
DEFAULTS = {setting.name: setting.default for setting in SETTINGS}


def convert(key: str, raw: Any) -> Any:
    """``raw`` as ``key``'s type; a key outside the table (Flask's own, TESTING) passes as given."""
    setting = BY_NAME.get(key)
    return setting.parse(raw) if setting else raw


def from_environment(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """M2D_<KEY> values, converted to the key's type; ConfigError for a bad one.

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
    cfg["TWIN_DIR"] = os.path.abspath(cfg["TWIN_DIR"] or os.path.join(cfg["DATA_DIR"], "twins"))
    try:
        twin.check_version(cfg["DATASET_VERSION"])
    except ValueError as e:
        raise ConfigError(f"M2D_DATASET_VERSION: {e}") from None
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
            raise ConfigError("Set M2D_SECRET_KEY (make run generates one in the testbed's gateway.env)")
        cfg["SECRET_KEY"] = "test"
    return cfg


def required(cfg: Mapping[str, Any], key: str) -> Any:
    """A setting the caller cannot work without, or an error that names it."""
    if not cfg.get(key):
        raise ConfigError(f"Set M2D_{key}: {key} has no default (see docs/configuration.md)")
    return cfg[key]


def reference() -> str:
    """docs/configuration.md: the table above, as an admin reads it."""
    def shown(value: Any) -> str:
        if value is None or value == "" or value == () or value == {}:
            return "(none)"
        if isinstance(value, bool):
            return "1" if value else "0"
        if isinstance(value, tuple):
            value = ",".join(map(str, value))
        if isinstance(value, dict):
            value = ",".join(f"{k}={v}" for k, v in value.items())
        return f"`{value}`"

    lines = ["# Configuration reference", "",
             "Every setting the gateway reads, from the environment (`M2D_<NAME>`). A value that is not of its",
             "type stops the web server, the workers, the poller and the `flask` commands at start, naming it.",
             "Generated from `gateway/config.py` by `python -m gateway.config`; edit the table there, not this file.",
             "", "| name | type | default | meaning |", "| --- | --- | --- | --- |"]
    for s in SETTINGS:
        kind = ("one of " + ", ".join(s.choices)) if s.choices else {
            str: "text", int: "integer", float: "number", bool: "bool", tuple: "list", dict: "map"}[s.type]
        meaning = s.meaning.replace("|", r"\|")
        lines.append(f"| `M2D_{s.name}` | {kind} | {shown(s.default)} | {meaning} |")
    lines += ["", "Read elsewhere, not by the gateway's processes: `deploy/gateway.sh` takes `M2D_PORT`, `M2D_USER`,",
              "`M2D_ADMIN_EMAIL` and `M2D_PYTHON`; the tests take `M2D_TESTBED_DIR`; the researchers' `m2d` client",
              "takes `M2D_URL`, `M2D_TOKEN` and `M2D_CACHE_DIR`; a job sees `M2D_DRY_RUN=1` in a dry run."]
    return "\n".join(lines) + "\n"


REFERENCE_PATH = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

if __name__ == "__main__":
    REFERENCE_PATH.write_text(reference())
    print(f"wrote {REFERENCE_PATH}", file=sys.stderr)
