"""The MLflow runs a submission's jobs made, as its page shows them: each run's
last metric values, a small chart of each metric it logged per step, and a link
to the run in MLflow's own UI, so that its owner need not search MLflow.

MLflow is read with the admin's login through the adapter, with a short
timeout (MLFLOW_PAGE_TIMEOUT), and the answer is kept in Redis for
MLFLOW_PAGE_CACHE_SECONDS, so page views do not each ask MLflow; when MLflow
does not answer the page says so and shows the rest. Everything in a run was
written by the job (run names, metric keys, values): what is read and drawn is
bounded here, the template escapes the text, and a chart is numbers only.
"""
from __future__ import annotations

import math
import re
import time
from urllib.parse import quote

from flask import current_app
from markupsafe import Markup, escape

from .. import queue
from ..adapters.mlflow import MlflowAdmin, MlflowError

MAX_RUNS = 10  # runs read and shown per submission
MAX_METRICS = 30  # last values shown per run
MAX_CHARTS = 8  # metrics charted per page (one MLflow call each, for all runs)
POINTS = 200  # points read per run and chart, sampled evenly over the steps
NAME_MAX = 120  # characters of a run name or metric key shown
CHART_SIZE = (220, 56)
UNREACHABLE = "MLflow unreachable: the runs cannot be shown now (try again in a minute)."
_RUN_ID = re.compile(r"[0-9a-f]{32}")


def for_submission(submission) -> dict | None:
    """{"runs": [...], "more_runs": bool, "error": str | None}; None before any job was submitted."""
    user = submission.user
    if not (submission.slurm_job_id or submission.dry_run_job_id):
        return None
    kinds = {user.mlflow_experiment_id: "Real run", user.mlflow_dry_run_experiment_id: "Dry run"}
    kinds.pop(None, None)
    if not kinds:
        return None
    cfg = current_app.config
    read = queue.cached(f"mlflow-runs-{submission.id}", cfg["MLFLOW_PAGE_CACHE_SECONDS"],
                        lambda: _read(sorted(kinds), submission.id))
    return view(read, kinds, cfg["MLFLOW_PUBLIC_URL"])


def _read(experiment_ids: list[str], submission_id: int) -> dict:
    """What MLflow says, bounded and JSON-able (it is cached as it is)."""
    admin = MlflowAdmin.from_config(current_app.config, timeout=current_app.config["MLFLOW_PAGE_TIMEOUT"])
    try:
        found = admin.runs_of_submission(experiment_ids, submission_id, MAX_RUNS + 1)
    except MlflowError as e:
        current_app.logger.warning("submission %s: MLflow runs not read: %s", submission_id, e)
        error = UNREACHABLE if e.status is None else f"MLflow refused to list the runs (HTTP {e.status}); the admins have the log."
        return {"runs": [], "more_runs": False, "error": error}
    runs = []
    for run in found[:MAX_RUNS]:
        info, data = run.get("info", {}), run.get("data", {})
        metrics = sorted(data.get("metrics", []), key=lambda m: str(m.get("key")))
        runs.append({"run_id": str(info.get("run_id", "")), "experiment_id": str(info.get("experiment_id", "")),
                     "name": str(info.get("run_name", ""))[:NAME_MAX], "status": str(info.get("status", "")),
                     "metrics": [{"key": str(m.get("key"))[:NAME_MAX], "value": _number(m.get("value")),
                                  "step": m.get("step", 0)} for m in metrics[:MAX_METRICS]],
                     "more_metrics": max(0, len(metrics) - MAX_METRICS), "history": {}})
    # a metric logged at a step past 0 has a history worth drawing
    stepped = sorted({m["key"] for run in runs for m in run["metrics"] if _number(m["step"]) not in (None, 0)})
    error = None
    # every call has its timeout; all the charts together get two of them
    deadline = time.monotonic() + 2 * current_app.config["MLFLOW_PAGE_TIMEOUT"]
    for key in stepped[:MAX_CHARTS]:
        ids = [run["run_id"] for run in runs if any(m["key"] == key for m in run["metrics"])]
        try:
            if time.monotonic() > deadline:
                raise MlflowError(None, "out of time for this page view")
            history = admin.metric_history(ids, key, POINTS)
        except MlflowError as e:
            current_app.logger.warning("submission %s: MLflow history of %r not read: %s", submission_id, key, e)
            error = "MLflow did not answer in time for every chart; some are left out."
            break
        for run in runs:
            points = history.get(run["run_id"], [])[:POINTS]
            run["history"][key] = [[_number(step), _number(value)] for step, value in points]
    return {"runs": runs, "more_runs": len(found) > MAX_RUNS, "error": error}


def view(read: dict, kinds: dict[str, str], public_url: str) -> dict:
    """The page's runs: kind, link, last values and their charts."""
    runs = []
    for run in read["runs"]:
        link = None
        if _RUN_ID.fullmatch(run["run_id"]) and run["experiment_id"].isdigit():
            link = f"{public_url.rstrip('/')}/#/experiments/{quote(run['experiment_id'])}/runs/{run['run_id']}"
        metrics = [{**m, "shown": _shown(m["value"]),
                    "chart": chart(run["history"].get(m["key"], []), m["key"])} for m in run["metrics"]]
        runs.append({**run, "kind": kinds.get(run["experiment_id"], "Run"), "url": link, "metrics": metrics})
    return {"runs": runs, "more_runs": read["more_runs"], "error": read["error"]}


def chart(points: list, label: str) -> Markup | None:
    """A small SVG line of (step, value) points, or None with fewer than two
    finite ones. Only numbers this function formats go into it; the label is
    escaped."""
    finite = sorted((s, v) for s, v in ((_number(s), _number(v)) for s, v in points[:POINTS])
                    if s is not None and v is not None)
    if len(finite) < 2:
        return None
    width, height = CHART_SIZE
    pad = 4
    steps, values = [s for s, _ in finite], [v for _, v in finite]
    low, high = min(values), max(values)
    first, last = steps[0], steps[-1]
    x_span, y_span = (last - first) or 1.0, (high - low) or 1.0

    def x(step):
        return pad + (step - first) / x_span * (width - 2 * pad)

    def y(value):
        return height - pad - (value - low) / y_span * (height - 2 * pad)

    line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in finite)
    return Markup(
        f'<svg class="metric-chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img">'
        f"<title>{escape(label)}: {_shown(low)} to {_shown(high)} over steps {_shown(first)} to {_shown(last)}</title>"
        f'<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="{line}"/></svg>')


def _number(value) -> float | None:
    """A finite float, else None (MLflow sends NaN and infinities as strings)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _shown(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"
