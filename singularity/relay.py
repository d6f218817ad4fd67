#!/usr/bin/env python3
"""The MLflow relay: the only way a job's code reaches MLflow.

Two modes, one file, standard library only (the shim half runs inside the job's
container with whatever python3 the image has, 3.9 or later):

    relay.py serve --socket /run/m2d/<job>/mlflow.sock --upstream http://127.0.0.1:5001
                   --password-file F --experiment-id ID --experiment-name NAME
                   [--ready-file F] [caps...]
    relay.py shim  --listen 127.0.0.1:PORT --socket /run/m2d/mlflow.sock [--ready-file F]

`serve` runs on the host, as the job account, before `apptainer exec`. It listens on
a Unix socket in a 0700 per-job folder that is bound read-only into the container,
and forwards a training run's REST calls to MLflow with the submission owner's basic
auth (read from a 0600 file, never from argv or the environment). Everything else is
refused with 403: a job's only way out is the reviewed export folder, so MLflow must
not become a second one (no artifacts, datasets, models, traces, searches or users).

`shim` runs inside the container (network namespace with only a loopback): it listens
on the port of the platform's public MLflow URL and pumps bytes to the relay's socket,
so an unmodified `mlflow` client with MLFLOW_TRACKING_URI=http://127.0.0.1:PORT works.

Two traps of the mlflow client (3.17) shape the answers:
- It retries 408, 429, 500, 502, 503 and 504 with exponential backoff for minutes, so
  every refusal here is a 400, 403, 411 or 413, and "MLflow is unreachable" is a 400
  too: a training script should fail fast with our message, not hang in retries.
- It does not read an error body it did not expect the server to accept; a refused
  request's body is still read to the end before answering, else it sees a reset.

MLflow's basic-auth server hashes the password on every request (about 300 ms on the
testbed), so a per-step `log_metric` would cost a training loop that much each time.
Log calls (metrics, params, tags, batches) are therefore validated here, answered at
once and buffered per run; a background thread sends them as `runs/log-batch` every
--flush-interval seconds (every 1 / --upstream-rate seconds when the job's share of
MLflow is under one call a second), and a run's buffer is also sent before any other
call on that run (get, update, delete-tag) and at SIGTERM/SIGINT. Since every run this
relay may touch was created through it, it knows every param of that run and can give
the "param already has another value" refusal that MLflow would have given.

What the job stores in MLflow is bounded, as every way out of a job: a per-job budget
of bytes of text and of metric points (every write counted, overwrites included),
MLflow's own limits on every field it keeps (names of 250 characters, 64-bit times
and steps, no mlflow.* tags but the relay's), and a share of the site's MLflow in
calls a second (--upstream-rate), so one job cannot starve the others. Refusals are
400s that name the budget and what is left of it.

Names and values are data too. With --identifiers (the dataset's identifier
index, keyed hashes of its patient ids, case names and paths: m2d/disclosure's
identifiers.json), a metric, param or tag key or value, or a run name, that holds
one of them is refused (its words are hashed as the index's were; the refusal
names the kind, never the value, as the job's stderr reaches its owner). Metrics
logged per training case (more distinct steps of a key, more metric keys, or
more keys of one numbered family such as loss_case_17 than --flag-* allow) are
not refused but flagged: an m2d.flag.per_case_metrics tag on the run, which
reviewers see, and the stats file's "flags".

When MLflow stops answering mid-job, log calls are still taken (up to --max-pending)
and sent once it answers again; every other call fails at once with a 400 that says
so, and the job goes on unless its code lets that error through. Values still held
when the job ends (after --shutdown-timeout) are named as lost in the job's stderr,
whose tail its owner is emailed (tests/test_faults.py, MLflow down during a job).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import math
import os
import posixpath
import random
import re
import signal
import socket
import socketserver
import stat
import sys
import threading
import time
import urllib.parse
from collections import deque
from http.server import BaseHTTPRequestHandler

API = "/api/2.0/mlflow"

# MLflow's own per-request limits for runs/log-batch (mlflow/utils/validation.py).
BATCH_MAX_METRICS = 1000
BATCH_MAX_PARAMS = 100
BATCH_MAX_TAGS = 100
BATCH_MAX_ITEMS = 1000
BATCH_MAX_BYTES = 900_000  # MLflow refuses log-batch bodies over 1 MB; keep a margin
KEY_MAX_LENGTH = 250  # MLflow's limit on metric, param and tag keys
RUN_NAME_MAX_LENGTH = 250  # MLflow's runs.name column (String(250); SQLite would keep any length)
INT64 = 2**63  # timestamps, steps and end times are 64-bit integers in MLflow
RUN_STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")
# MLflow's own tags (mlflow.user, mlflow.source.*, mlflow.runName, ...) are the relay's
# to set, never the job's. On runs/create the mlflow client sends these from its run
# context (user name, script, git): they are replaced by the relay's own, not refused,
# so that mlflow.start_run works unchanged; any other mlflow.* tag is refused.
SYSTEM_TAG_PREFIX = "mlflow."
CLIENT_CONTEXT_TAGS = frozenset({"mlflow.user", "mlflow.source.name", "mlflow.source.type",
                                 "mlflow.source.git.commit", "mlflow.source.git.branch",
                                 "mlflow.source.git.repoURL", "mlflow.source.git.dirty"})
RUN_NAME_TAG = "mlflow.runName"  # becomes the run name, checked as one
PARENT_RUN_TAG = "mlflow.parentRunId"  # nested runs: allowed when it names a run of this job

# The byte budget: what one job may store in MLflow over its life (README of the
# relay in docs/researchers.md). Text is counted in UTF-8 bytes: run names, param
# and tag keys and values (every tag write, overwrites included: whoever reads
# MLflow while the job runs sees each), the first use of a metric key in a run, and
# what a run's creation, update or tag deletion carries. A metric point carries its
# value, timestamp and step (8 bytes each), so it is counted apart, in points.
DEFAULT_TEXT_BUDGET = 1_000_000  # bytes
DEFAULT_METRIC_BUDGET = 100_000  # points
METRIC_POINT_BYTES = 24
RUN_CREATE_BYTES = 32  # start time, experiment; its name and tags are counted apart
RUN_UPDATE_BYTES = 16  # status and end time
TAG_DELETE_BYTES = 8
# A job's share of the site's MLflow, in calls the relay makes upstream a second
# (gateway setting MLFLOW_CALLS_PER_SECOND / MLFLOW_JOBS_AT_ONCE, 20 / 10 by default).
DEFAULT_UPSTREAM_RATE = 2.0
DEFAULT_UPSTREAM_BURST = 10.0
# Tags the relay itself puts on every run (--run-tag): which submission and Slurm
# job made it, for the submission's provenance. The job's code may not set them.
PLATFORM_TAG_PREFIX = "m2d."
# MLflow's rule for metric, param and tag names (same on the server, POSIX flavour).
KEY_CHARACTERS = re.compile(r"^[/\w.\- :]*$")

ALLOWED_CALLS = (
    "GET experiments/get and experiments/get-by-name (your own experiment; POST experiments/create of its "
    "name answers that it exists), POST runs/create "
    "(in your own experiment), and, on runs this job created, GET runs/get and POST "
    "runs/update, runs/log-metric, runs/log-parameter, runs/log-batch, runs/set-tag, "
    "runs/delete-tag. Artifacts, datasets, models, traces, searches and user APIs are "
    "closed: results leave a job only through the reviewed export folder (/mnt/export)."
)


LOG_NAME = "relay"  # "shim" in the container


def log(message: str) -> None:
    print(f"{LOG_NAME}[{os.getpid()}] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


class Refused(Exception):
    """A request the relay answers itself, with MLflow's error shape."""

    def __init__(self, status: int, error_code: str, message: str):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message


def denied(why: str) -> Refused:
    return Refused(403, "PERMISSION_DENIED", f"{why}. The MLflow relay allows only: {ALLOWED_CALLS}")


def invalid(message: str) -> Refused:
    return Refused(400, "INVALID_PARAMETER_VALUE", message)


def over_limit(message: str) -> Refused:
    return Refused(400, "RESOURCE_LIMIT_EXCEEDED", message)


class RateLimited(Refused):
    def __init__(self, message: str):
        # 400, not 429: the client would retry a 429 for minutes.
        super().__init__(400, "REQUEST_LIMIT_EXCEEDED", message)


class OverBudget(Refused):
    def __init__(self, message: str):
        super().__init__(400, "RESOURCE_LIMIT_EXCEEDED", message)


class UpstreamDown(Exception):
    pass


# ---------------------------------------------------------------- the MLflow side


class Upstream:
    """Calls to the real MLflow server, always with the owner's credentials and never
    with any header of the client's. Keeps a few idle connections for reuse."""

    def __init__(self, url: str, username: str, password: str, timeout: float):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SystemExit(f"--upstream must be an http(s) URL, not {url!r}")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.base_path = parts.path.rstrip("/")
        self.timeout = timeout
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        self._authorization = "Basic " + token
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _connect(self) -> http.client.HTTPConnection:
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def call(self, method: str, path: str, query: str = "", body: bytes | None = None):
        """(status, content type, body bytes) of MLflow's answer; UpstreamDown when
        there was none."""
        url = self.base_path + path + (f"?{query}" if query else "")
        headers = {"Authorization": self._authorization, "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        with self._lock:
            connection = self._idle.pop() if self._idle else None
        # A pooled connection the server has since closed fails before any answer; that
        # (and only that) is worth one more try on a fresh connection.
        for fresh in ((False, True) if connection else (True,)):
            if fresh:
                connection = self._connect()
            try:
                connection.request(method, url, body=body, headers=headers)
                response = connection.getresponse()
                content = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                connection.close()
                if fresh:
                    raise UpstreamDown(f"{type(e).__name__}") from e
                continue
            except (OSError, http.client.HTTPException) as e:
                connection.close()
                raise UpstreamDown(f"{type(e).__name__}: {e}") from e
            if response.will_close:
                connection.close()
            else:
                with self._lock:
                    if len(self._idle) < 8:
                        self._idle.append(connection)
                        connection = None
                if connection is not None:
                    connection.close()
            return response.status, response.getheader("Content-Type") or "application/json", content
        raise AssertionError("unreachable")


# ---------------------------------------------------------------- the policy


class RelayLimits:
    def __init__(self, args):
        self.param_value = args.max_param_value
        self.tag_value = args.max_tag_value
        self.body = args.max_body
        self.batch_items = args.max_batch_items
        self.params_per_run = args.max_params_per_run
        self.tags_per_run = args.max_tags_per_run
        self.pending = args.max_pending
        self.runs = args.max_runs


class TokenBucket:
    """`rate` requests a second on average, up to `burst` at once."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.updated = burst, time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens < 1:
                return False
            self.tokens -= 1
            return True

    def wait(self, timeout: float) -> bool:
        """take(), waiting up to ``timeout`` seconds for a token."""
        deadline = time.monotonic() + timeout
        while not self.take():
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.05, 1 / self.rate))
        return True


class Budget:
    """What this job may still store in MLflow: bytes of text and metric points.
    A call is charged in full or refused in full, before anything of it is sent."""

    def __init__(self, text_bytes: int, metric_points: int):
        self.text_limit, self.points_limit = text_bytes, metric_points
        self.text_used = self.points_used = 0
        self._lock = threading.Lock()

    def charge(self, text: int, points: int = 0) -> None:
        with self._lock:
            if self.text_used + text <= self.text_limit and self.points_used + points <= self.points_limit:
                self.text_used += text
                self.points_used += points
                return
            text_left, points_left = self.text_limit - self.text_used, self.points_limit - self.points_used
        raise OverBudget(
            f"over this job's MLflow budget: a job may store {self.text_limit:,} bytes of text (run names, "
            f"param and tag keys and values, each tag write counted, metric names) and {self.points_limit:,} "
            f"metric points in MLflow. This call needs {text:,} bytes and {points:,} points; {text_left:,} "
            f"bytes and {points_left:,} points are left. Log fewer or shorter values, or write results "
            "to /mnt/export (reviewed before release)")

    def refund(self, text: int, points: int = 0) -> None:
        with self._lock:
            self.text_used -= text
            self.points_used -= points

    def used(self) -> str:
        return (f"{self.text_used:,} of {self.text_limit:,} bytes of text and {self.points_used:,} of "
                f"{self.points_limit:,} metric points")


class Run:
    """What the relay knows of a run it created: every param (so it can refuse a
    changed value as MLflow would), the tag keys (for the cap), and the log items not
    yet sent. `sending` is held while this run's items go upstream, so that a call on
    the run waits until everything logged before it has arrived."""

    def __init__(self, run_id: str, tag_keys):
        self.run_id = run_id
        self.params: dict[str, str] = {}
        self.tag_keys = set(tag_keys)
        self.metric_keys: set[str] = set()  # a key's bytes are counted once per run
        self.pending: deque = deque()  # (kind, item, size in bytes), kind in metrics/params/tags
        self.sending = threading.Lock()


def check_text_item(kind: str, item, limit: int) -> dict:
    """A param or a tag: a JSON object with a valid key and a string value of at most ``limit``."""
    if not isinstance(item, dict):
        raise invalid(f"a {kind} must be a JSON object")
    key, value = check_key(kind, item.get("key")), item.get("value")
    if not isinstance(value, str):
        raise invalid(f"{kind} {key!r} needs a string value")
    if len(value) > limit:
        raise invalid(f"{kind} {key!r} is {len(value)} characters long; the limit is {limit}")
    return {"key": key, "value": value}


def check_key(kind: str, key) -> str:
    if not isinstance(key, str) or not key:
        raise invalid(f"a {kind} needs a non-empty string key")
    if len(key) > KEY_MAX_LENGTH:
        raise invalid(f"{kind} key {key[:40]!r}... is longer than {KEY_MAX_LENGTH} characters")
    if not KEY_CHARACTERS.match(key):
        raise invalid(f"{kind} key {key!r}: names may only contain alphanumerics, underscores, "
                      "dashes, periods, spaces, colons and slashes")
    normal = posixpath.normpath(key)
    if normal != key or normal.startswith("..") or normal.startswith("/"):
        raise invalid(f"{kind} key {key!r} would resolve to {normal!r} as a path")
    return key


def text_bytes(*texts: str) -> int:
    return sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)


def check_integer(what: str, value, minimum: int = -INT64):
    """A 64-bit integer, as MLflow's JSON carries one (a number, or a string of digits);
    at least ``minimum`` (0 for times: MLflow refuses negative ones, and only when it
    stores them, which would split a whole batch)."""
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,19}", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value < INT64:
        bounds = "0" if minimum == 0 else f"{minimum}"
        raise invalid(f"{what} must be a whole number from {bounds} to {INT64 - 1} (a 64-bit integer"
                      f"{', not negative' if minimum == 0 else ''}), not {str(value)[:40]!r}")
    return value


def check_double(what: str, value):
    """A 64-bit float as MLflow takes one: a number, or NaN, Infinity and -Infinity
    (as JSON strings, which is how the mlflow client sends them); sent on normalised."""
    if value in ("NaN", "Infinity", "-Infinity"):
        return value
    if isinstance(value, str) and len(value) <= 40:
        try:
            parsed = float(value)
        except ValueError:
            raise invalid(f"{what} must be a number, not {value[:40]!r}") from None
        if math.isnan(parsed):
            raise invalid(f"{what}: write NaN as 'NaN'")
        value = parsed
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"{what} must be a number, not {str(value)[:40]!r}")
    try:
        value = float(value)
    except OverflowError:
        raise invalid(f"{what}: {str(value)[:40]}... does not fit a 64-bit float") from None
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def check_run_name(name) -> str:
    if not isinstance(name, str):
        raise invalid("run_name must be a string")
    if len(name) > RUN_NAME_MAX_LENGTH:
        raise invalid(f"a run name is at most {RUN_NAME_MAX_LENGTH} characters (MLflow's limit); this one has "
                      f"{len(name):,}")
    return name


def single(params: dict, name: str, call: str):
    """A GET parameter's one value (parse_qs gives lists; repeats could make MLflow
    read another one than the one checked here)."""
    values = params.get(name, [])
    if len(values) != 1:
        raise invalid(f"{call} needs exactly one {name} parameter; this request had {len(values)}")
    return values[0]


class Identifiers:
    """The dataset's identifier values as keyed hashes (m2d/disclosure/identifiers.py
    writes them, BLAKE2b with the index's salt, lower-cased): a text holds one
    when a span of its words (runs of ASCII letters and digits), separators as
    written, hashes to one. The same matching as the report's, in the standard
    library, since this file runs by path on the node."""

    WORD = re.compile(r"[A-Za-z0-9]+")

    def __init__(self, path: str):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        self.salt = bytes.fromhex(data["salt"])
        self.values = {bytes.fromhex(h): kind for h, kind in data["values"].items()}
        self.first_words = {bytes.fromhex(h) for h in data["first_words"]}
        self.max_words = int(data["max_words"])

    def _hash(self, text: str) -> bytes:
        return hashlib.blake2b(text.lower().encode("utf-8", "surrogatepass"), key=self.salt, digest_size=16).digest()

    def kind_in(self, text: str) -> str | None:
        """What kind of identifier ``text`` holds ("a patient id"...), or None."""
        words = [(m.start(), m.end()) for m in self.WORD.finditer(text)]
        for i, (start, end) in enumerate(words):
            if self._hash(text[start:end]) in self.first_words:
                for n in range(min(self.max_words, len(words) - i), 0, -1):
                    kind = self.values.get(self._hash(text[start:words[i + n - 1][1]]))
                    if kind:
                        return kind
        return None


FLAG_TAG = "m2d.flag.per_case_metrics"
NUMBERS = re.compile(r"[0-9]+")


class PerCaseWatch:
    """Signs of metrics logged per training case, one run at a time: a key with
    more distinct steps than ``steps``, more metric keys than ``keys``, or a
    family of keys that differ only in their numbers (loss_case_1, loss_case_2...)
    with more members than ``numbered``. Counts stop at the limit (the memory
    held is bounded); the first sign found is the run's flag."""

    def __init__(self, steps: int, keys: int, numbered: int):
        self.steps_limit, self.keys_limit, self.numbered_limit = steps, keys, numbered
        self.steps: dict[tuple[str, str], set] = {}  # (run, key) -> steps, up to the limit
        self.families: dict[tuple[str, str], set] = {}  # (run, key with # for numbers) -> keys
        self.flagged: dict[str, str] = {}  # run -> reason

    def see(self, run: Run, metric: dict) -> str | None:
        """The reason to flag ``run`` once this metric is logged, the first time only."""
        if run.run_id in self.flagged:
            return None
        key = metric["key"]
        reason = None
        steps = self.steps.setdefault((run.run_id, key), set())
        if len(steps) <= self.steps_limit:
            steps.add(metric["step"])
            if len(steps) > self.steps_limit:
                reason = f"a metric logged at more than {self.steps_limit} distinct steps"
        if len(run.metric_keys) > self.keys_limit:
            reason = f"more than {self.keys_limit} distinct metric keys in one run"
        family = self.families.setdefault((run.run_id, NUMBERS.sub("#", key)), set())
        if NUMBERS.search(key) and len(family) <= self.numbered_limit:
            family.add(key)
            if len(family) > self.numbered_limit:
                reason = f"more than {self.numbered_limit} metric keys that differ only in a number"
        if reason:
            self.flagged[run.run_id] = reason + " (metrics per training case?)"
            return self.flagged[run.run_id]
        return None


class Relay:
    """The allow-list, the caps and the buffers: what `serve` does with one request,
    apart from HTTP itself."""

    def __init__(self, upstream: Upstream, experiment_id: str, experiment_name: str, limits: RelayLimits,
                 rate: TokenBucket, experiment_alias: str | None = None,
                 run_tags: dict[str, str] | None = None, budget: Budget | None = None,
                 upstream_rate: TokenBucket | None = None, upstream_wait: float = 10.0,
                 user_id: str | None = None, identifiers: Identifiers | None = None,
                 per_case: PerCaseWatch | None = None):
        self.upstream = upstream
        self.experiment_id = experiment_id
        self.experiment_name = experiment_name
        # a dry run: code that names the owner's real experiment itself
        # (mlflow.set_experiment) gets the dry run's instead
        self.experiment_alias = experiment_alias
        self.run_tags = [{"key": k, "value": v} for k, v in (run_tags or {}).items()]
        self.limits = limits
        self.rate = rate
        self.budget = budget or Budget(DEFAULT_TEXT_BUDGET, DEFAULT_METRIC_BUDGET)
        # calls this relay makes to MLflow, this job's share of what the site's server serves
        self.upstream_rate = upstream_rate or TokenBucket(DEFAULT_UPSTREAM_RATE, DEFAULT_UPSTREAM_BURST)
        self.upstream_wait = upstream_wait
        self.user_id = user_id  # the owner's MLflow user, as runs/create's user_id
        self.identifiers = identifiers
        self.per_case = per_case or PerCaseWatch(10_000, 1_000, 100)
        self.closing = False  # the job has ended: what is left is sent without waiting for the rate
        self.runs: dict[str, Run] = {}
        self.pending_count = 0
        self.down_since: float | None = None  # when MLflow stopped answering (monotonic)
        self._lock = threading.Lock()  # runs, and each run's params, tag keys and pending, down_since
        self.routes = {
            ("GET", f"{API}/experiments/get"): self.get_experiment,
            ("GET", f"{API}/experiments/get-by-name"): self.get_experiment_by_name,
            ("POST", f"{API}/experiments/create"): self.create_experiment,
            ("POST", f"{API}/runs/create"): self.create_run_within_budget,
            ("GET", f"{API}/runs/get"): self.call_on_run,
            ("POST", f"{API}/runs/update"): self.update_run,
            ("POST", f"{API}/runs/delete-tag"): self.delete_tag,
            ("POST", f"{API}/runs/log-metric"): self.log_metric,
            ("POST", f"{API}/runs/log-parameter"): self.log_param,
            ("POST", f"{API}/runs/set-tag"): self.set_tag,
            ("POST", f"{API}/runs/log-batch"): self.log_batch,
        }

    # -- one request

    def handle(self, method: str, target: str, body: bytes):
        """(status, content type, body) for one request whose body was read in full."""
        path, _, query = target.partition("?")
        # Refusals count too: each one is also a log line in the job's stderr.
        if not self.rate.take():
            raise RateLimited(f"more than {self.rate.rate:g} MLflow calls a second (bursts up to "
                              f"{self.rate.burst:g}); log less often or use log_batch")
        route = self.routes.get((method, path))
        if route is None:
            raise denied(f"{method} {path[:200]} is not allowed")
        if method == "GET":
            # Parsed and encoded again, so MLflow reads exactly what was checked.
            params = urllib.parse.parse_qs(query, keep_blank_values=True)
        else:
            try:
                params = json.loads(body or b"{}")
            except ValueError:
                raise invalid("the request body is not JSON") from None
            if not isinstance(params, dict):
                raise invalid("the request body must be a JSON object")
        return route(method, path, params)

    def forward(self, method: str, path: str, params: dict):
        if not self.upstream_rate.wait(self.upstream_wait):
            raise RateLimited(f"this job's share of the platform's MLflow is {self.upstream_rate.rate:g} calls a second "
                              f"(bursts of {self.upstream_rate.burst:g}), and this call waited "
                              f"{self.upstream_wait:g} s for its turn. Calls other than logging (start_run, get_run, "
                              "end_run) count; log calls do not (the relay sends them in batches)")
        try:
            if method == "GET":
                answer = self.upstream.call(method, path, query=urllib.parse.urlencode(params, doseq=True))
            else:
                answer = self.upstream.call(method, path, body=json.dumps(params).encode())
        except UpstreamDown as e:
            self.upstream_down(e)
            raise unreachable() from e
        self.upstream_up()
        status, content_type, content = answer
        if status in (408, 429) or status >= 500:
            # The client would retry these for minutes; MLflow's own words instead.
            raise Refused(400, "TEMPORARILY_UNAVAILABLE",
                          f"MLflow answered {status} to the relay: {content[:300].decode('utf-8', 'replace')}")
        return status, content_type, content

    # -- experiments

    def own_experiment_name(self, name) -> str | None:
        """The experiment that `name` means for this job: its own experiment's
        name, and in a dry run also the owner's real experiment name (code written
        for the platform calls mlflow.set_experiment(username)), both answered with
        this job's experiment; None for any other name."""
        if name == self.experiment_name or (self.experiment_alias and name == self.experiment_alias):
            return self.experiment_name
        return None

    def not_own_experiment(self, call: str, asked: str) -> Refused:
        own = repr(self.experiment_name)
        if self.experiment_alias:
            own = f"{self.experiment_alias!r} (in this dry run, {self.experiment_name!r})"
        return denied(f"{call} asked for {asked}, which is not yours: a job reads "
                      f"and writes only its owner's experiment, {own} (id {self.experiment_id}); call "
                      f"mlflow.set_experiment({(self.experiment_alias or self.experiment_name)!r}) or leave "
                      "MLFLOW_EXPERIMENT_NAME as the platform sets it")

    def get_experiment(self, method, path, params):
        asked = single(params, "experiment_id", "experiments/get")
        if asked != self.experiment_id:
            raise self.not_own_experiment("experiments/get", f"experiment id {asked[:40]!r}")
        return self.forward(method, path, params)

    def get_experiment_by_name(self, method, path, params):
        asked = single(params, "experiment_name", "experiments/get-by-name")
        name = self.own_experiment_name(asked)
        if name is None:
            raise self.not_own_experiment("experiments/get-by-name", f"experiment {asked[:100]!r}")
        return self.forward(method, path, {**params, "experiment_name": [name]})

    def create_experiment(self, method, path, params):
        """Code that creates its experiment when get-by-name finds none (or always,
        catching the error) gets MLflow's own 'already exists' for its own name."""
        asked = params.get("name")
        if self.own_experiment_name(asked) is None:
            raise denied(f"experiments/create asked for a new experiment {str(asked)[:100]!r}: a job cannot "
                         f"create experiments; it logs to its owner's experiment, {self.experiment_name!r}")
        raise Refused(400, "RESOURCE_ALREADY_EXISTS",
                      f"Experiment(name={asked}) already exists: it is yours; mlflow.set_experiment({asked!r}) "
                      "selects it")

    # -- runs

    def create_run(self, method, path, params):
        asked = str(params.get("experiment_id", ""))
        if asked != self.experiment_id:
            default = " (MLflow's Default experiment, which the client uses when none is set)" if asked == "0" else ""
            raise self.not_own_experiment("runs/create", f"experiment id {asked[:40]!r}{default}")
        tags = params.get("tags") or []
        if not isinstance(tags, list) or len(tags) > self.limits.tags_per_run:
            raise over_limit(f"a run may have at most {self.limits.tags_per_run} tags")
        for tag in tags:
            self.check_tag(tag)
        with self._lock:
            if len(self.runs) >= self.limits.runs:
                raise over_limit(f"a job may create at most {self.limits.runs} runs")
        params = {**params, "tags": tags + self.run_tags}
        status, content_type, content = self.forward(method, path, params)
        if status == 200:
            run = json.loads(content)["run"]
            run_id = run["info"]["run_id"]
            tag_keys = [tag["key"] for tag in run.get("data", {}).get("tags", [])]
            with self._lock:
                self.runs[run_id] = Run(run_id, tag_keys)
            log(f"created run {run_id}")
        return status, content_type, content

    def create_run_within_budget(self, method, path, params):
        """runs/create with only what MLflow should keep from the job: a run name of at
        most 250 characters (also given as the mlflow.runName tag), a start time, the
        job's own tags; the owner as user_id and the relay's mlflow.* tags. Charged to
        the budget first, given back if the run is not made. Then create_run's checks."""
        tags = params.get("tags") or []
        if not isinstance(tags, list):
            raise invalid("tags must be a list")
        name, job_tags = params.get("run_name") or "", []
        for tag in tags:
            key = tag.get("key") if isinstance(tag, dict) else None
            if key == RUN_NAME_TAG:
                value = check_run_name(tag.get("value"))
                if name and value and value != name:
                    raise invalid(f"run_name {name[:100]!r} and the mlflow.runName tag {value[:100]!r} differ")
                name = name or value
            elif key not in CLIENT_CONTEXT_TAGS:
                job_tags.append(self.check_tag(tag))
        name = self.no_identifier("the run name", check_run_name(name))
        start_time = check_integer("start_time", params.get("start_time", int(time.time() * 1000)), minimum=0)
        cost = RUN_CREATE_BYTES + text_bytes(name) + sum(text_bytes(t["key"], t["value"]) for t in job_tags)
        self.budget.charge(cost)
        request = {"experiment_id": params.get("experiment_id"), "start_time": start_time, "tags": job_tags}
        if name:
            request["run_name"] = name  # else MLflow makes one up
        if self.user_id:
            request["user_id"] = self.user_id
        try:
            answer = self.create_run(method, path, request)
        except Exception:
            self.budget.refund(cost)
            raise
        if answer[0] != 200:
            self.budget.refund(cost)
        return answer

    def update_run(self, method, path, params):
        """runs/update: a status, an end time, a new run name; nothing else is sent."""
        self.own_run(params)
        request = {name: params[name] for name in ("run_id", "run_uuid") if name in params}
        if params.get("status") is not None:
            if params["status"] not in RUN_STATUSES:
                raise invalid(f"status must be one of {', '.join(RUN_STATUSES)}")
            request["status"] = params["status"]
        if params.get("end_time") is not None:
            request["end_time"] = check_integer("end_time", params["end_time"], minimum=0)
        if params.get("run_name") is not None:
            request["run_name"] = self.no_identifier("the run name", check_run_name(params["run_name"]))
        self.budget.charge(RUN_UPDATE_BYTES + text_bytes(request.get("run_name", "")))
        return self.call_on_run(method, path, request)

    def own_run(self, params: dict) -> Run:
        """The run the request is about; every run id in it must be one this relay
        created (MLflow accepts both `run_id` and the older `run_uuid`)."""
        ids = []
        for name in ("run_id", "run_uuid"):
            value = params.get(name)
            ids.extend(value if isinstance(value, list) else [] if value is None else [value])
        if not ids:
            raise invalid("the request names no run_id")
        with self._lock:
            runs = {self.runs.get(run_id) if isinstance(run_id, str) else None for run_id in ids}
        if None in runs or len(runs) != 1:
            raise denied("only runs this job created can be read or written")
        return runs.pop()

    def call_on_run(self, method, path, params):
        run = self.own_run(params)
        with run.sending:
            self.send_pending(run)
            return self.forward(method, path, params)

    def delete_tag(self, method, path, params):
        run = self.own_run(params)
        if str(params.get("key", "")).startswith(PLATFORM_TAG_PREFIX):
            raise denied(f"tags named {PLATFORM_TAG_PREFIX}* are the platform's; they cannot be deleted")
        if str(params.get("key", "")).startswith(SYSTEM_TAG_PREFIX):
            raise denied(f"tags named {SYSTEM_TAG_PREFIX}* are MLflow's own; the relay sets them, the job "
                         "cannot delete them")
        key = check_key("tag", params.get("key"))
        self.budget.charge(TAG_DELETE_BYTES + text_bytes(key))  # a tag that comes and goes is a signal too
        params = {name: params[name] for name in ("run_id", "run_uuid", "key") if name in params}
        with run.sending:
            self.send_pending(run)
            answer = self.forward(method, path, params)
        if answer[0] == 200 and isinstance(params.get("key"), str):
            with self._lock:
                run.tag_keys.discard(params["key"])
        return answer

    # -- log calls: validated, answered at once, sent in batches

    def no_identifier(self, what: str, text: str) -> str:
        """``text``, unless it holds an identifier of the dataset; the refusal names its kind, never it."""
        kind = self.identifiers.kind_in(text) if self.identifiers and text else None
        if kind:
            raise invalid(f"{what} holds an identifier of the dataset ({kind}): names and values logged to "
                          "MLflow leave the platform unreviewed, so they may not name patients, cases or "
                          "images. Log aggregates (a loss, an AUC), never values per case")
        return text

    def check_metric(self, metric) -> dict:
        if not isinstance(metric, dict):
            raise invalid("a metric must be a JSON object")
        key = self.no_identifier("a metric key", check_key("metric", metric.get("key")))
        value = check_double(f"metric {key!r} value", metric.get("value"))
        if isinstance(value, float) and value.is_integer() and abs(value) < INT64:
            self.no_identifier(f"metric {key!r}'s value", str(int(value)))  # a numeric id, logged as a number
        # Only what a metric is; links to models or datasets are dropped, as those APIs are closed.
        return {"key": key, "value": value,
                "timestamp": check_integer(f"metric {key!r} timestamp", metric.get("timestamp"), minimum=0),
                "step": check_integer(f"metric {key!r} step", metric.get("step", 0))}

    def check_param(self, param) -> dict:
        return self.no_identifiers_in("param", check_text_item("param", param, self.limits.param_value))

    def no_identifiers_in(self, kind: str, item: dict) -> dict:
        self.no_identifier(f"a {kind} key", item["key"])
        self.no_identifier(f"{kind} {item['key']!r}'s value", item["value"])
        return item

    def check_tag(self, tag) -> dict:
        item = self.no_identifiers_in("tag", check_text_item("tag", tag, self.limits.tag_value))
        if item["key"].startswith(PLATFORM_TAG_PREFIX):
            raise denied(f"tags named {PLATFORM_TAG_PREFIX}* are the platform's (which submission and job "
                         "made the run); choose another name")
        if item["key"].startswith(SYSTEM_TAG_PREFIX) and not (item["key"] == PARENT_RUN_TAG
                                                             and item["value"] in self.runs):
            raise denied(f"tags named {SYSTEM_TAG_PREFIX}* are MLflow's own, which the relay sets (the run name: "
                         "mlflow.start_run(run_name=...)); choose another name")
        return item

    def log_metric(self, method, path, params):
        return self.buffer(self.own_run(params), metrics=[params])

    def log_param(self, method, path, params):
        return self.buffer(self.own_run(params), params=[params])

    def set_tag(self, method, path, params):
        return self.buffer(self.own_run(params), tags=[params])

    def log_batch(self, method, path, params):
        run = self.own_run(params)
        parts = [params.get(name) or [] for name in ("metrics", "params", "tags")]
        if not all(isinstance(part, list) for part in parts):
            raise invalid("metrics, params and tags must be lists")
        if sum(map(len, parts)) > self.limits.batch_items:
            raise over_limit(f"a log_batch may hold at most {self.limits.batch_items} items")
        return self.buffer(run, *parts)

    def buffer(self, run: Run, metrics=(), params=(), tags=()):
        """Check every item, then take all of them or none."""
        items = [("metrics", self.check_metric(m)) for m in metrics]
        items += [("params", self.check_param(p)) for p in params]
        items += [("tags", self.check_tag(t)) for t in tags]
        sizes = [len(json.dumps(item)) for _, item in items]
        with self._lock:
            new_params, new_tag_keys, new_metric_keys, fresh = {}, set(), set(), []
            text = points = 0
            for (kind, item), size in zip(items, sizes):
                if kind == "metrics":
                    points += 1
                    if item["key"] not in run.metric_keys and item["key"] not in new_metric_keys:
                        new_metric_keys.add(item["key"])
                        text += text_bytes(item["key"])
                else:
                    text += text_bytes(item["key"], item["value"])  # a param logged again is not sent
                if kind == "params":
                    known = run.params.get(item["key"], new_params.get(item["key"]))
                    if known is not None and known != item["value"]:
                        raise invalid(f"param {item['key']!r} already has the value {known[:100]!r} in this "
                                      f"run; a param cannot be changed (log a metric or a tag instead)")
                    if known is not None:
                        text -= text_bytes(item["key"], item["value"])
                        continue  # MLflow takes the same value again as a no-op
                    new_params[item["key"]] = item["value"]
                elif kind == "tags" and item["key"] not in run.tag_keys:
                    new_tag_keys.add(item["key"])
                fresh.append((kind, item, size))
            if len(run.params) + len(new_params) > self.limits.params_per_run:
                raise over_limit(f"a run may have at most {self.limits.params_per_run} params")
            if len(run.tag_keys) + len(new_tag_keys) > self.limits.tags_per_run:
                raise over_limit(f"a run may have at most {self.limits.tags_per_run} tags")
            if self.pending_count + len(fresh) > self.limits.pending:
                raise Refused(400, "TEMPORARILY_UNAVAILABLE",
                              f"{self.pending_count} logged values are still waiting for MLflow to take "
                              "them (is it reachable?); the relay holds no more")
            self.budget.charge(text, points)
            run.params.update(new_params)
            run.tag_keys |= new_tag_keys
            run.metric_keys |= new_metric_keys
            run.pending.extend(fresh)
            self.pending_count += len(fresh)
            for kind, item, _ in fresh:
                if kind == "metrics" and (reason := self.per_case.see(run, item)):
                    flag = {"key": FLAG_TAG, "value": reason}  # the platform's tag: not the job's budget or caps
                    run.pending.append(("tags", flag, len(json.dumps(flag))))
                    self.pending_count += 1
                    log(f"run {run.run_id} flagged for its reviewers: {reason}")
        return 200, "application/json", b"{}"

    # -- sending what was buffered

    def take_batch(self, run: Run) -> list:
        """The next items of `run` that fit in one runs/log-batch."""
        counts = {"metrics": 0, "params": 0, "tags": 0}
        caps = {"metrics": BATCH_MAX_METRICS, "params": BATCH_MAX_PARAMS, "tags": BATCH_MAX_TAGS}
        batch, size = [], 0
        with self._lock:
            while run.pending and len(batch) < BATCH_MAX_ITEMS:
                kind, _, item_size = run.pending[0]
                if counts[kind] == caps[kind] or (batch and size + item_size > BATCH_MAX_BYTES):
                    break
                batch.append(run.pending.popleft())
                counts[kind] += 1
                size += item_size
            self.pending_count -= len(batch)
        return batch

    def put_back(self, run: Run, batch: list) -> None:
        with self._lock:
            run.pending.extendleft(reversed(batch))
            self.pending_count += len(batch)

    def send_pending(self, run: Run) -> bool:
        """Send all of `run`'s buffer (caller holds run.sending). False when MLflow
        could not be reached: the rest stays buffered for the next try."""
        while run.pending:
            # This job's turn first, then the batch: what the job logs while it waits
            # for its share of MLflow goes out in this call, not one turn later.
            self.wait_for_share()
            batch = self.take_batch(run)
            if not batch:
                return True
            try:
                self.send_batch(run, batch)
            except UpstreamDown as e:
                self.put_back(run, batch)
                self.upstream_down(e)
                return False
            self.upstream_up()
        return True

    def wait_for_share(self) -> None:
        while not self.closing and not self.upstream_rate.wait(1):
            pass  # this job's share of MLflow's calls; what waits stays in the buffer

    def send_batch(self, run: Run, batch: list) -> None:
        body = {"run_id": run.run_id, "metrics": [], "params": [], "tags": []}
        for kind, item, _ in batch:
            body[kind].append(item)
        status, _, content = self.upstream.call("POST", f"{API}/runs/log-batch", body=json.dumps(body).encode())
        if status == 200:
            return
        if status in (408, 429) or status >= 500:
            raise UpstreamDown(f"MLflow answered {status}")
        reason = content[:300].decode("utf-8", "replace")
        try:
            error_code = json.loads(content).get("error_code")
        except (ValueError, AttributeError):
            error_code = None
        if error_code != "INVALID_PARAMETER_VALUE" or len(batch) == 1:
            # Refused for a reason that splitting cannot change (a deleted run, lost
            # permission), or down to the one bad value.
            log(f"MLflow refused {len(batch)} values of run {run.run_id} ({status}), dropped: {reason}")
            return
        # One bad value must not lose the others: halve until the culprit is alone.
        middle = len(batch) // 2
        for half in (batch[:middle], batch[middle:]):
            self.wait_for_share()
            self.send_batch(run, half)

    # An outage is one line when it starts and one when it ends: the buffer is
    # retried every second, and a line each time would push the job's own
    # error out of the stderr tail its owner is sent.
    def upstream_down(self, error: Exception) -> None:
        with self._lock:
            started, self.down_since = self.down_since is None, self.down_since or time.monotonic()
        if started:
            log(f"the platform's MLflow server is unreachable ({error}); logged values are kept, "
                "other MLflow calls fail until it is back")

    def upstream_up(self) -> None:
        with self._lock:
            since, self.down_since = self.down_since, None
        if since is not None:
            log(f"MLflow answers again after {time.monotonic() - since:.0f} s; kept values are being sent")

    def send_all(self) -> bool:
        with self._lock:
            runs = [run for run in self.runs.values() if run.pending]
        all_sent = True
        for run in runs:
            with run.sending:
                all_sent = self.send_pending(run) and all_sent
        return all_sent


def unreachable() -> Refused:
    # 400, not 503: the client would retry a 503 with backoff for minutes while the
    # job's clock runs; failing at once with the reason lets the script decide.
    # Log calls are still taken (buffered) meanwhile, up to --max-pending, and the
    # buffer is sent once MLflow answers; the job's end waits --shutdown-timeout.
    return Refused(400, "TEMPORARILY_UNAVAILABLE",
                   "MLflow is not reachable from the relay: the platform's MLflow server did not answer, so this "
                   "call failed. Your job goes on; metrics, params and tags you log meanwhile are kept and sent "
                   "when MLflow is back (lost if the job ends before). Catch mlflow's MlflowException around "
                   "other MLflow calls to keep training through an outage")


# ---------------------------------------------------------------- HTTP over the Unix socket


class RelayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the mlflow client reuses its connection
    wbufsize = 65536  # status, headers and body leave in one write (flushed after each request)
    timeout = 600  # an idle connection is closed after this long
    server_version = "m2d-mlflow-relay"
    sys_version = ""
    discard_limit = 64 * 1024 * 1024  # past this, an oversized body closes the connection

    def relay_request(self):
        relay: Relay = self.server.relay
        if "Transfer-Encoding" in self.headers:
            # The mlflow client always sends a Content-Length; a chunked body could not
            # be measured before reading it.
            self.close_connection = True
            return self.answer_refusal(Refused(411, "BAD_REQUEST", "send a Content-Length, not a chunked body"))
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            return self.answer_refusal(invalid("bad Content-Length"))
        if length > relay.limits.body:
            self.discard(length)
            return self.answer_refusal(Refused(413, "RESOURCE_LIMIT_EXCEEDED",
                                               f"request body of {length} bytes; the relay takes at most "
                                               f"{relay.limits.body}"))
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            self.close_connection = True
            return
        try:
            status, content_type, content = relay.handle(self.command, self.path, body)
        except RateLimited as refusal:
            # One line per burst, not one per refused call.
            if self.server.rate_refusals.take():
                log(f"refusing calls over the rate limit: {refusal.message}")
            return self.answer_refusal(refusal, quiet=True)
        except OverBudget as refusal:
            # A loop past the budget: one line now and then, so the job's own error stays in the tail.
            if self.server.budget_refusals.take():
                log(f"refusing calls over the budget: {refusal.message}")
            return self.answer_refusal(refusal, quiet=True)
        except Refused as refusal:
            return self.answer_refusal(refusal)
        except Exception as e:  # a bug here must still not be a 500 that the client retries
            log(f"error on {self.command} {self.path[:200]}: {type(e).__name__}: {e}")
            return self.answer_refusal(Refused(400, "BAD_REQUEST", f"the relay failed: {type(e).__name__}"))
        self.answer(status, content_type, content)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = relay_request

    def discard(self, length: int) -> None:
        if length > self.discard_limit:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 65536))
            if not chunk:
                self.close_connection = True
                return
            length -= len(chunk)

    def answer_refusal(self, refusal: Refused, quiet: bool = False) -> None:
        self.server.count_refusal()
        if not quiet:
            log(f"refused {self.command} {self.path.partition('?')[0][:200]}: {refusal.status} "
                f"{refusal.error_code}: {refusal.message[:300]}")
        body = json.dumps({"error_code": refusal.error_code, "message": refusal.message}).encode()
        self.answer(refusal.status, "application/json", body)

    def answer(self, status: int, content_type: str, content: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(content)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)

    def log_message(self, format, *args):  # refusals and errors are logged, not every request
        pass


class UnixRelayServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    max_connections = 64  # one thread each; a job must not exhaust the host's threads

    def __init__(self, socket_path: str, relay: Relay):
        self.relay = relay
        self.rate_refusals = TokenBucket(0.1, 1)  # log lines about the rate limit
        self.budget_refusals = TokenBucket(0.1, 1)  # and about the budget
        self.refusals = 0  # every refused call, for the gateway's m2d_relay_refusals_total
        self._refusals_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.max_connections)
        if os.path.exists(socket_path) and stat.S_ISSOCK(os.lstat(socket_path).st_mode):
            os.unlink(socket_path)  # left by an earlier relay of this job
        old_umask = os.umask(0o177)  # the socket is the owner's alone, like its folder
        try:
            super().__init__(socket_path, RelayHandler)
        finally:
            os.umask(old_umask)

    def count_refusal(self) -> None:
        with self._refusals_lock:
            self.refusals += 1

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            log(f"more than {self.max_connections} connections; closing a new one")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def read_credentials(path: str):
    # "-": stdin, a pipe from the wrapper (deploy/libexec/m2d-slurm credential).
    # A file: a gateway without a job account writes it 0600; nobody else may read it.
    if path == "-":
        lines = sys.stdin.read(4096).splitlines()
    else:
        mode = os.stat(path).st_mode
        if mode & 0o007:
            raise SystemExit(f"{path} is readable by others (mode {stat.S_IMODE(mode):o}); it must be 0600 or 0640")
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    if len(lines) < 2 or not lines[0] or not lines[1]:
        raise SystemExit(f"{path} must hold the MLflow username on line 1 and the password on line 2")
    return lines[0], lines[1]


def touch(path: str | None) -> None:
    if path:
        with open(path, "w"):
            pass


def not_dumpable() -> None:
    """No other process of the job account (every job runs as it) may read
    this one's memory or open its files through /proc, nor ptrace it: it
    holds its owner's MLflow login (prctl PR_SET_DUMPABLE 0)."""
    import ctypes
    if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:
        raise SystemExit(f"prctl(PR_SET_DUMPABLE, 0) failed: {os.strerror(ctypes.get_errno())}")


def load_identifiers(path: str | None) -> Identifiers | None:
    """The identifier index; an index not built yet (the first job on a new dataset
    version: the report job builds it) is said in the job's log, and nothing is checked."""
    if not path:
        return None
    try:
        return Identifiers(path)
    except FileNotFoundError:
        log("no identifier index yet: names and values logged to MLflow are not checked for the dataset's "
            "identifiers in this job")
        return None


def batch_interval(args) -> float:
    """Seconds between two sends of what the job logged. A share of MLflow under one
    call a second sends fewer, larger batches at the share's own pace, so that the
    share's burst stays for the job's other calls (a run's creation, a read)."""
    return max(args.flush_interval, 1 / args.upstream_rate)


def serve(args) -> int:
    not_dumpable()
    username, password = read_credentials(args.password_file)
    upstream = Upstream(args.upstream, username, password, args.upstream_timeout)
    # MLflow's own tags on every run: the relay's values, whatever the job's client sent
    run_tags = {"mlflow.user": username, "mlflow.source.type": "JOB", "mlflow.source.name": "main.py"}
    run_tags.update(tag.split("=", 1) for tag in args.run_tag or ())
    relay = Relay(upstream, args.experiment_id, args.experiment_name, RelayLimits(args),
                  TokenBucket(args.rate, args.burst), experiment_alias=args.experiment_alias,
                  run_tags=run_tags, budget=Budget(args.text_budget, args.metric_budget),
                  upstream_rate=TokenBucket(args.upstream_rate, args.upstream_burst),
                  upstream_wait=args.upstream_wait, user_id=username,
                  identifiers=load_identifiers(args.identifiers),
                  per_case=PerCaseWatch(args.flag_steps, args.flag_keys, args.flag_numbered_keys))
    server = UnixRelayServer(args.socket, relay)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, name="server", daemon=True).start()

    # The first batch waits a random part of the interval: jobs that start together
    # (an array job, a cluster after maintenance) do not call MLflow in step.
    interval = batch_interval(args)

    def send_periodically():
        wait = random.uniform(0, interval)
        while not stop.wait(wait):
            relay.send_all()
            wait = interval

    sender = threading.Thread(target=send_periodically, name="sender", daemon=True)
    sender.start()
    touch(args.ready_file)
    log(f"serving {args.socket} for {username}, experiment {args.experiment_id} ({args.experiment_name!r})")
    while not stop.wait(3600):  # a bare wait() would not let the signal handler run
        pass
    relay.closing = True  # the sender stops waiting for its turn, so the join below cannot hang
    server.shutdown()
    sender.join()
    # The job is ending: what it logged must arrive, but Slurm kills us after KillWait.
    deadline = time.monotonic() + args.shutdown_timeout
    while not relay.send_all() and time.monotonic() < deadline:
        time.sleep(1)
    if relay.pending_count:
        log(f"the job ended while the platform's MLflow server was unreachable: {relay.pending_count} logged "
            "values (metrics, params, tags) never reached MLflow and are lost")
    server.server_close()
    try:
        os.unlink(args.socket)
    except OSError:
        pass
    if args.stats_file:  # in the job's log folder, beyond the job's code: its own output cannot forge it
        with open(args.stats_file, "w") as f:
            flags = {"flags": relay.per_case.flagged} if relay.per_case.flagged else {}
            json.dump({"refused": server.refusals, "undelivered": relay.pending_count, **flags}, f)
    log(f"stopped; {server.refusals} calls refused; MLflow budget used: {relay.budget.used()}")
    return 0


# ---------------------------------------------------------------- the shim in the container


def pump(source: socket.socket, target: socket.socket) -> None:
    try:
        while True:
            data = source.recv(65536)
            if not data:
                target.shutdown(socket.SHUT_WR)  # pass the end of the request or answer on
                return
            target.sendall(data)
    except OSError:
        # One side broke: stop the other direction too, instead of leaving it blocked.
        for side in (source, target):
            try:
                side.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def connect_pair(client: socket.socket, socket_path: str) -> None:
    relay = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        relay.connect(socket_path)
    except OSError as e:
        log(f"cannot reach the relay at {socket_path}: {e}")
        relay.close()
        answer_relay_gone(client)
        return
    back = threading.Thread(target=pump, args=(relay, client), daemon=True)
    back.start()
    pump(client, relay)
    back.join()
    relay.close()
    client.close()


def answer_relay_gone(client: socket.socket) -> None:
    """A clear 400 instead of a dropped connection, which the client would retry for
    minutes. The request is drained after the answer: closing with unread bytes would
    reset the connection before the client reads it."""
    body = json.dumps({"error_code": "TEMPORARILY_UNAVAILABLE",
                       "message": "this job's MLflow relay is not running; nothing can be logged"}).encode()
    head = ("HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    try:
        client.sendall(head + body)
        client.shutdown(socket.SHUT_WR)
        client.settimeout(2)
        while client.recv(65536):
            pass
    except OSError:
        pass
    client.close()


def shim(args) -> int:
    global LOG_NAME
    LOG_NAME = "shim"
    host, _, port = args.listen.rpartition(":")
    listener = socket.create_server((host, int(port)))
    touch(args.ready_file)
    log(f"shim on {args.listen} -> {args.socket}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        client, _ = listener.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small requests, answered at once
        threading.Thread(target=connect_pair, args=(client, args.socket), daemon=True).start()


# ---------------------------------------------------------------- command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="MLflow relay for a sealed job (see the module docstring)")
    modes = parser.add_subparsers(dest="mode", required=True)

    s = modes.add_parser("serve", help="host side: Unix socket -> MLflow, with the owner's credentials")
    s.add_argument("--socket", required=True, help="Unix socket to listen on (in a 0700 per-job folder)")
    s.add_argument("--upstream", required=True, help="MLflow server URL, e.g. http://127.0.0.1:5001")
    s.add_argument("--password-file", required=True, help="0600 file: username on line 1, password on line 2 "
                   "(-: read them from stdin)")
    s.add_argument("--experiment-id", required=True, help="the owner's experiment, the only one it may touch")
    s.add_argument("--experiment-name", required=True)
    s.add_argument("--experiment-alias", help="a dry run: the owner's real experiment name, answered "
                   "with the experiment above (code that names it itself logs to the dry run's)")
    s.add_argument("--ready-file", help="created once the socket listens")
    s.add_argument("--stats-file", help='written at exit: {"refused": N, "undelivered": N, "flags": {run: reason}} '
                   "(the gateway counts them)")
    s.add_argument("--identifiers", help="the dataset's identifier index (identifiers.json of m2d/disclosure's "
                   "index, keyed hashes): keys, values and run names that hold one are refused")
    s.add_argument("--flag-steps", type=int, default=10_000,
                   help="flag a run (per-case metrics) with a metric at more distinct steps (default 10000)")
    s.add_argument("--flag-keys", type=int, default=1_000,
                   help="... with more distinct metric keys (default 1000)")
    s.add_argument("--flag-numbered-keys", type=int, default=100,
                   help="... with more keys that differ only in a number, e.g. loss_case_<n> (default 100)")
    s.add_argument("--run-tag", action="append", metavar="KEY=VALUE",
                   help=f"a tag put on every run created (repeatable; keys start with {PLATFORM_TAG_PREFIX})")
    s.add_argument("--max-param-value", type=int, default=6000, help="characters (default 6000)")
    s.add_argument("--max-tag-value", type=int, default=8000, help="characters (default 8000)")
    s.add_argument("--max-body", type=int, default=1_000_000, help="bytes per request (default 1 MB)")
    s.add_argument("--max-batch-items", type=int, default=1000, help="items per log_batch (default 1000)")
    s.add_argument("--max-params-per-run", type=int, default=500)
    s.add_argument("--max-tags-per-run", type=int, default=100)
    s.add_argument("--max-runs", type=int, default=1000, help="runs a job may create (default 1000)")
    s.add_argument("--max-pending", type=int, default=100_000,
                   help="logged values held while MLflow is unreachable (default 100000)")
    s.add_argument("--text-budget", type=int, default=DEFAULT_TEXT_BUDGET,
                   help="bytes of text the job may store in MLflow: run names, param and tag keys and values "
                   f"(each tag write), metric names (default {DEFAULT_TEXT_BUDGET})")
    s.add_argument("--metric-budget", type=int, default=DEFAULT_METRIC_BUDGET,
                   help=f"metric points the job may store in MLflow (default {DEFAULT_METRIC_BUDGET})")
    s.add_argument("--rate", type=float, default=200,
                   help="requests a second on average the relay answers (default 200; log calls are answered here)")
    s.add_argument("--burst", type=float, default=2000, help="requests at once (default 2000)")
    s.add_argument("--upstream-rate", type=float, default=DEFAULT_UPSTREAM_RATE,
                   help="calls a second the relay makes to MLflow: this job's share of the server "
                   f"(default {DEFAULT_UPSTREAM_RATE:g})")
    s.add_argument("--upstream-burst", type=float, default=DEFAULT_UPSTREAM_BURST,
                   help=f"calls to MLflow at once (default {DEFAULT_UPSTREAM_BURST:g})")
    s.add_argument("--upstream-wait", type=float, default=10,
                   help="seconds a call other than logging waits for its turn before a refusal (default 10)")
    s.add_argument("--flush-interval", type=float, default=1.0,
                   help="seconds between batches (default 1; 1 / --upstream-rate when that is longer)")
    s.add_argument("--upstream-timeout", type=float, default=30, help="seconds per MLflow call (default 30)")
    s.add_argument("--shutdown-timeout", type=float, default=20,
                   help="seconds to keep trying to send the buffer at SIGTERM (default 20)")

    c = modes.add_parser("shim", help="container side: TCP on the loopback -> the relay's socket")
    c.add_argument("--listen", required=True, help="HOST:PORT of the MLflow URL the job uses")
    c.add_argument("--socket", required=True, help="the relay's Unix socket")
    c.add_argument("--ready-file", help="created once listening")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return serve(args) if args.mode == "serve" else shim(args)


if __name__ == "__main__":
    sys.exit(main())
