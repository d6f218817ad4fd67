"""What operators and their monitoring ask of a running gateway: /healthz and
/metrics (the counters behind it: gateway.metrics).

/healthz: whether each part the gateway works with answers, and which does not.

Every part is asked at once, each in its own thread with HEALTH_TIMEOUT
seconds: a part that hangs (a firewalled port, a stuck slurmctld) costs the
check its timeout, not the whole answer, and is named as down. 200 with
``{"ok": true, ...}`` when all answer; 503 naming the parts that are down.
A load balancer or monitoring polls it; tests/helpers/stack.py waits on it.
"""
from __future__ import annotations

import hmac
import ipaddress
import shutil
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from flask import Blueprint, Response, current_app, request
from prometheus_client import CONTENT_TYPE_LATEST
from redis import Redis
from sqlalchemy import text

from .. import metrics
from ..adapters.mlflow import MlflowAdmin
from ..adapters.smtp import Mailer
from ..core import scheduling
from ..extensions import db
from .errors import json_error

bp = Blueprint("ops", __name__)


def _database(engine, timeout: float) -> str:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    return f"{engine.url.get_backend_name()} answers"


def _redis(url: str, timeout: float) -> str:
    Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout).ping()
    return "answers PING"


def _disk(cfg: Mapping[str, Any], timeout: float) -> str:
    """The folders the gateway writes (uploads, exports, logs; images) have room."""
    floor = cfg["HEALTH_MIN_FREE_MB"] * 1024**2
    free = []
    for key in ("DATA_DIR", "IMAGE_DIR"):
        if not cfg.get(key):
            continue
        left = shutil.disk_usage(cfg[key]).free
        if left < floor:
            raise OSError(f"{key} {cfg[key]} has {left // 1024**2} MB free, under HEALTH_MIN_FREE_MB "
                          f"({cfg['HEALTH_MIN_FREE_MB']})")
        free.append(f"{key} {left // 1024**2} MB free")
    return ", ".join(free)


def checks(cfg: Mapping[str, Any], engine) -> dict[str, Callable[[float], str]]:
    """Each part: a call that returns what it said, or raises saying what is wrong."""
    return {
        "database": lambda timeout: _database(engine, timeout),
        "redis": lambda timeout: _redis(cfg["REDIS_URL"], timeout),
        "slurm": lambda timeout: scheduling.scheduler(cfg).ping(timeout),
        "mlflow": lambda timeout: MlflowAdmin.from_config(cfg).ping(timeout),
        "smtp": lambda timeout: Mailer.from_config(cfg).ping(timeout),
        "disk": lambda timeout: _disk(cfg, timeout),
    }


def report(cfg: Mapping[str, Any], engine) -> dict[str, Any]:
    """``{"ok": bool, "down": [names], "checks": {name: {"ok", "detail"|"error", "seconds"}}}``."""
    timeout = cfg["HEALTH_TIMEOUT"]
    parts = checks(cfg, engine)
    started = time.monotonic()
    # not a with-block: its exit would wait for a hung check's thread
    pool = ThreadPoolExecutor(max_workers=len(parts), thread_name_prefix="healthz")
    futures = {name: pool.submit(_timed, check, timeout) for name, check in parts.items()}
    wait(futures.values(), timeout=timeout + 1)
    pool.shutdown(wait=False, cancel_futures=True)
    results = {}
    for name, future in futures.items():
        if future.done():
            results[name] = future.result()
        else:
            results[name] = {"ok": False, "error": f"no answer within {timeout:g} s",
                             "seconds": round(time.monotonic() - started, 3)}
    down = [name for name, result in results.items() if not result["ok"]]
    return {"ok": not down, "down": down, "checks": results}


def _timed(check: Callable[[float], str], timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    try:
        result = {"ok": True, "detail": check(timeout)}
    except Exception as e:  # noqa: BLE001 - any failure means the part is down; say which
        # the first line only: drivers append SQL and parameters below it
        message = (str(e).strip().splitlines() or [""])[0][:300]
        result = {"ok": False, "error": f"{type(e).__name__}: {message}"}
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


@bp.get("/healthz")
def healthz():
    body = report(current_app.config, db.engine)
    return body, 200 if body["ok"] else 503


def scrape_allowed() -> bool:
    """With METRICS_TOKEN: whoever sends it. Without: this host only, and not
    through a proxy (nginx on this host would make every client look local)."""
    token = current_app.config["METRICS_TOKEN"]
    if token:
        return hmac.compare_digest(request.headers.get("Authorization", ""), f"Bearer {token}")
    try:
        local = ipaddress.ip_address(request.remote_addr or "").is_loopback
    except ValueError:
        return False
    return local and "X-Forwarded-For" not in request.headers


@bp.get("/metrics")
def scrape():
    if not scrape_allowed():
        return json_error(403, "forbidden", "/metrics answers this host's loopback only; from elsewhere, set "
                          "M2D_METRICS_TOKEN and send it as 'Authorization: Bearer TOKEN'.")
    return Response(metrics.exposition(), content_type=CONTENT_TYPE_LATEST)
