"""The MLflow adapter: the only code that talks to the MLflow server's admin API.

Each researcher gets an MLflow user of the same name, an experiment of the same name
created by the admin, and MANAGE on that experiment; with the server's default
permission at NO_PERMISSIONS they see nothing else. Endpoints as served by MLflow 3.17
with `--app-name basic-auth` (per-user grants moved to /api/3.0 in 3.13).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import requests

log = logging.getLogger(__name__)

CREATE_USER = "/api/2.0/mlflow/users/create"
GET_USER = "/api/2.0/mlflow/users/get"
UPDATE_PASSWORD = "/api/2.0/mlflow/users/update-password"
CREATE_EXPERIMENT = "/api/2.0/mlflow/experiments/create"
GET_EXPERIMENT_BY_NAME = "/api/2.0/mlflow/experiments/get-by-name"
RESTORE_EXPERIMENT = "/api/2.0/mlflow/experiments/restore"
GRANT_PERMISSION = "/api/3.0/mlflow/users/permissions/grant"
REVOKE_PERMISSION = "/api/3.0/mlflow/users/permissions/revoke"
GET_PERMISSION = "/api/3.0/mlflow/users/permissions/get"
SEARCH_RUNS = "/api/2.0/mlflow/runs/search"
# The UI's own endpoint (MLflow 2.8+): one metric's history of several runs,
# sampled evenly over the steps, at most max_results points per run.
METRIC_HISTORY_SAMPLED = "/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval"
# the tags the job's MLflow relay (singularity/relay.py --run-tag) puts on every run it creates
SLURM_JOB_TAG = "m2d.slurm_job_id"
SUBMISSION_TAG = "m2d.submission_id"

ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"


class MlflowError(Exception):
    """MLflow refused, or could not be reached. `status` is the HTTP status of the call
    that failed (None when there was no answer, or the refusal is ours); `message` is
    the server's, without any password we sent."""

    def __init__(self, status: int | None, message: str, error_code: str = ""):
        super().__init__(": ".join(str(part) for part in ("MLflow", status, error_code, message) if part))
        self.status = status
        self.error_code = error_code
        self.message = message


@dataclass(frozen=True)
class MlflowAccount:
    username: str
    password: str = field(repr=False)  # so that logging an account never logs it
    experiment_name: str
    experiment_id: str
    # the dry run's "<experiment>-dryrun", when provisioned with dry_run=True
    dry_run_experiment_id: str | None = None

    @property
    def dry_run_experiment_name(self) -> str:
        return dry_run_experiment_name(self.experiment_name)


DRY_RUN_SUFFIX = "-dryrun"


def dry_run_experiment_name(experiment_name: str) -> str:
    """The experiment a dry run logs to, beside the researcher's own."""
    return experiment_name + DRY_RUN_SUFFIX


class MlflowAdmin:
    def __init__(self, url: str, admin_username: str, admin_password: str, timeout: float = 10) -> None:
        self.url = url.rstrip("/")
        self.admin_username = admin_username
        self.timeout = timeout
        self._session = requests.Session()
        self._session.auth = (admin_username, admin_password)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], timeout: float = 10) -> MlflowAdmin:
        return cls(cfg["MLFLOW_URL"], cfg["MLFLOW_ADMIN_USERNAME"], cfg["MLFLOW_ADMIN_PASSWORD"], timeout=timeout)

    def ping(self, timeout: float) -> str:
        """Whether the server answers its /health within ``timeout`` seconds
        (no login: the check costs no password hash)."""
        try:
            response = requests.get(self.url + "/health", timeout=timeout)
        except requests.RequestException as e:
            raise MlflowError(None, f"cannot reach {self.url}: {type(e).__name__}") from e
        if not response.ok:
            raise MlflowError(response.status_code, f"{self.url}/health answered {response.status_code}")
        return f"{self.url} answers"

    def provision(self, username: str, dry_run: bool = False) -> MlflowAccount:
        """Make `username` an MLflow user who can manage the experiment of the same
        name (and, with `dry_run`, the dry runs' "<name>-dryrun" too), completing
        whatever an earlier attempt left undone. The password is new on every call,
        so the caller always holds the current one."""
        if username == self.admin_username:
            raise ValueError("the MLflow admin account is not a researcher account")
        password = secrets.token_urlsafe(24)
        self._create_or_reset_user(username, password)
        experiment_id = self._experiment(username)
        self._grant_manage(username, experiment_id)
        log.info("MLflow account %s manages experiment %s", username, experiment_id)
        dry_run_id = self.provision_dry_run(username) if dry_run else None
        return MlflowAccount(username, password, experiment_name=username, experiment_id=experiment_id,
                             dry_run_experiment_id=dry_run_id)

    def provision_dry_run(self, username: str) -> str:
        """The dry runs' experiment of an existing user, with MANAGE; its id.
        Safe to repeat; the user's password is left alone."""
        if username == self.admin_username:
            raise ValueError("the MLflow admin account is not a researcher account")
        experiment_id = self._experiment(dry_run_experiment_name(username))
        self._grant_manage(username, experiment_id)
        log.info("MLflow account %s manages dry-run experiment %s", username, experiment_id)
        return experiment_id

    def runs_of_job(self, experiment_id: str, slurm_job_id: str) -> list[str]:
        """Ids of the runs Slurm job ``slurm_job_id`` created in the experiment, oldest
        first: the relay tagged each with the job's id, and the job cannot change that tag."""
        if not slurm_job_id.isdigit():
            raise ValueError(f"not a Slurm job id: {slurm_job_id!r}")
        query = {"experiment_ids": [experiment_id], "filter": f"tags.`{SLURM_JOB_TAG}` = '{slurm_job_id}'",
                 "run_view_type": "ALL", "max_results": 1000, "order_by": ["attributes.start_time ASC"]}
        found: list[str] = []
        while True:
            page = self._call("POST", SEARCH_RUNS, json=query)
            found += [run["info"]["run_id"] for run in page.get("runs", [])]
            if not page.get("next_page_token"):
                return found
            query["page_token"] = page["next_page_token"]

    def runs_of_submission(self, experiment_ids: list[str], submission_id: int, limit: int) -> list[dict]:
        """The first ``limit`` runs (oldest first) the submission's jobs made in
        these experiments, as runs/search gives them (info, data.metrics with
        each metric's last value): the relay tagged each with the submission's
        id, and a job cannot set or change that tag."""
        query = {"experiment_ids": experiment_ids, "filter": f"tags.`{SUBMISSION_TAG}` = '{int(submission_id)}'",
                 "run_view_type": "ACTIVE_ONLY", "max_results": limit, "order_by": ["attributes.start_time ASC"]}
        return self._call("POST", SEARCH_RUNS, json=query).get("runs", [])[:limit]

    def metric_history(self, run_ids: list[str], key: str, points: int) -> dict[str, list[tuple[float, float]]]:
        """Metric ``key`` of each run as (step, value), at most ``points`` per run,
        sampled evenly over its steps (the first and last included)."""
        answer = self._call("GET", METRIC_HISTORY_SAMPLED,
                            params={"run_ids": run_ids, "metric_key": key, "max_results": points})
        found: dict[str, list[tuple[float, float]]] = {}
        for metric in answer.get("metrics", []):
            found.setdefault(metric.get("run_id", ""), []).append((metric.get("step", 0), metric.get("value")))
        return found

    def _create_or_reset_user(self, username: str, password: str) -> None:
        try:
            self._call("POST", CREATE_USER, json={"username": username, "password": password}, secret=password)
            return
        except MlflowError as e:
            if e.error_code != ALREADY_EXISTS:
                raise
        # Handing out an admin's password would make a researcher an MLflow admin.
        user = self._call("GET", GET_USER, params={"username": username})["user"]
        if user.get("is_admin"):
            raise MlflowError(None, f"{username!r} is an MLflow admin; refusing to reset its password")
        self._call("PATCH", UPDATE_PASSWORD, json={"username": username, "password": password}, secret=password)

    def _experiment(self, name: str) -> str:
        try:
            return self._call("POST", CREATE_EXPERIMENT, json={"name": name})["experiment_id"]
        except MlflowError as e:
            if e.error_code != ALREADY_EXISTS:
                raise
        experiment = self._call("GET", GET_EXPERIMENT_BY_NAME, params={"experiment_name": name})["experiment"]
        # A deleted experiment keeps its name, so it cannot be created again; bring it back.
        if experiment.get("lifecycle_stage") == "deleted":
            self._call("POST", RESTORE_EXPERIMENT, json={"experiment_id": experiment["experiment_id"]})
        return experiment["experiment_id"]

    def _grant_manage(self, username: str, experiment_id: str) -> None:
        grant = {"username": username, "resource_type": "experiment", "resource_id": experiment_id}
        try:
            self._call("POST", GRANT_PERMISSION, json=grant | {"permission": "MANAGE"})
            return
        except MlflowError as e:
            if e.error_code != ALREADY_EXISTS:
                raise
        # A grant exists; the server will not overwrite it, so replace it if it is less.
        if self._call("GET", GET_PERMISSION, params=grant).get("permission") != "MANAGE":
            self._call("POST", REVOKE_PERMISSION, json=grant)
            self._call("POST", GRANT_PERMISSION, json=grant | {"permission": "MANAGE"})

    def _call(self, method: str, path: str, *, json=None, params=None, secret: str | None = None) -> dict:
        try:
            response = self._session.request(method, self.url + path, json=json, params=params, timeout=self.timeout)
        except requests.RequestException as e:
            raise MlflowError(None, f"cannot reach {self.url}: {type(e).__name__}") from e
        if response.ok:
            return response.json() if response.content else {}
        try:
            body = response.json()
            error_code, message = body.get("error_code", ""), body.get("message", "")
        except ValueError:
            error_code, message = "", response.text
        # Only the first line: database errors append the SQL and its parameters, which
        # for user rows include the password hash. And never echo what we sent.
        message = (message.strip().splitlines() or [response.reason or ""])[0][:500]
        if secret:
            message = message.replace(secret, "[password]")
        raise MlflowError(response.status_code, message, error_code)
