"""How many bytes each way out lets one job carry, per job and per day.

    .venv/bin/python -m bench.channels               # from the settings (M2D_* of the environment, else defaults)
    set -a; . /opt/testbed/gateway.env; set +a
    .venv/bin/python -m bench.channels --measure     # and the MLflow text budget tried on the testbed

Every figure is an upper bound computed from the settings in gateway/config.py: what
the researcher (or whoever reads their MLflow, mail or pages) can receive from a job
that wants to carry the data out, before any reviewer has looked. A day is
DAILY_SUBMISSIONS real jobs (each upload has one real job; its dry run runs on the
synthetic twin). The reviewed export itself is not in the table: it leaves only when
reviewers release it. `--measure` runs the MLflow channel's text part for real: a
relay with the default budget, a job that writes the largest tags and params it can
until refused, and what MLflow then holds, read back.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from gateway.config import DEFAULTS, from_environment
from tests.helpers.relay import relay  # singularity/relay.py, loaded by path

DAY = 24 * 3600


def bits(choices: int) -> float:
    """Bits carried by picking one of `choices` values."""
    return math.log2(max(1, choices))


def channels(cfg) -> list[tuple[str, float, float, str]]:
    """(channel, bytes per job, bytes per day, why) for these settings."""
    jobs_a_day = cfg["DAILY_SUBMISSIONS"]
    rows = []

    def row(name, per_job, why, per_day=None):
        rows.append((name, per_job, per_job * jobs_a_day if per_day is None else per_day, why))

    points = cfg["MLFLOW_METRIC_BUDGET"]
    # a point: value, timestamp, step (8 bytes each) and which of the run's keys it is on
    # (the keys are text, within the text budget: at most text budget / 1 byte of them)
    key_choice = bits(cfg["MLFLOW_TEXT_BUDGET"]) / 8
    row("MLflow via the relay", cfg["MLFLOW_TEXT_BUDGET"] + points * (relay.METRIC_POINT_BYTES + key_choice),
        f"MLFLOW_TEXT_BUDGET bytes of text + MLFLOW_METRIC_BUDGET points x ({relay.METRIC_POINT_BYTES} bytes + "
        f"{key_choice:.1f} for the key)")
    row("stderr tail (API, page, failure e-mail)", cfg["STDERR_TAIL_BYTES"],
        "STDERR_TAIL_BYTES of a failed real job's stderr (the same bytes in the page and the e-mail)")
    time_limit = _seconds(cfg["SLURM_TIME"])
    row("exit code, state, end time", (bits(256) + bits(8) + bits(time_limit / cfg["POLL_INTERVAL"])) / 8,
        "one of 256 exit codes, of ~8 end states, and when it ended to POLL_INTERVAL within SLURM_TIME")
    row("e-mails", (bits(2) + bits(time_limit / 60)) / 8,
        "finished or failed, and the minute it says; the failure e-mail's stderr tail is the row above")
    files = cfg.get("EXPORT_MAX_FILES") or 2**32
    row("export: count and total size seen by the owner", (bits(files + 1) + bits(cfg["EXPORT_MAX_BYTES"] + 1)) / 8,
        f"before release the owner sees how many files ({'EXPORT_MAX_FILES' if cfg.get('EXPORT_MAX_FILES') else 'up to 2^32'}) "
        "and their total size (up to EXPORT_MAX_BYTES); names, sizes and hashes only reviewers")
    row("dry run's log (not data)", 2 * cfg["DRY_RUN_LOG_BYTES"],
        "DRY_RUN_LOG_BYTES of stdout and of stderr, shown in full: the dry run is a separate job on the synthetic "
        "twin, the real dataset is not in its container, so what it writes is computed from the twin and the code",
        per_day=0)
    return rows


def _seconds(slurm_time: str) -> int:
    days, _, clock = slurm_time.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if len(parts) == 1:
        parts = [0, parts[0], 0]  # minutes
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * DAY + parts[0] * 3600 + parts[1] * 60 + parts[2]


def shown(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:,.1f} MB"
    if n >= 1e3:
        return f"{n / 1e3:,.1f} kB"
    return f"{n:,.0f} B"


def table(cfg) -> str:
    rows = channels(cfg)
    lines = [f"For DAILY_SUBMISSIONS={cfg['DAILY_SUBMISSIONS']} real jobs a day per researcher:", "",
             "| channel | per job | per day | from |", "| --- | --- | --- | --- |"]
    for name, per_job, per_day, why in rows:
        lines.append(f"| {name} | {shown(per_job)} | {shown(per_day)} | {why} |")
    data_rows = [r for r in rows if r[2]]
    lines.append(f"| **all that carry data** | **{shown(sum(r[1] for r in data_rows))}** | "
                 f"**{shown(sum(r[2] for r in data_rows))}** | |")
    return "\n".join(lines)


def measure() -> str:
    """The MLflow text budget on the testbed: tags of 8,000 characters overwritten and
    params of 6,000 until refused, then what MLflow holds and what was accepted."""
    import tempfile
    import uuid
    from pathlib import Path

    import requests
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from gateway.adapters.mlflow import MlflowAdmin
    from tests.helpers.relay import API, RelayProcesses

    url = os.environ["M2D_MLFLOW_URL"].rstrip("/")
    admin = (os.environ["M2D_MLFLOW_ADMIN_USERNAME"], os.environ["M2D_MLFLOW_ADMIN_PASSWORD"])
    account = MlflowAdmin(url, *admin).provision(f"m2d-channels-{uuid.uuid4().hex[:8]}")
    accepted = 0
    try:
        with tempfile.TemporaryDirectory() as folder:
            job = RelayProcesses(Path(folder) / "job", account, url)
            try:
                client = MlflowClient(job.url)
                run_id = client.create_run(account.experiment_id).info.run_id
                refused = None
                for n in range(1000):
                    try:
                        if n % 2:
                            client.set_tag(run_id, "blob", "x" * 8000)
                            accepted += 8004
                        else:
                            client.log_batch(run_id, params=[Param(f"p{n:04}", "y" * 6000)])
                            accepted += 6005
                    except Exception as e:  # noqa: BLE001 (the refusal ends the loop)
                        refused = str(e)
                        break
            finally:
                job.stop()
            run = requests.get(f"{url}{API}/runs/get", params={"run_id": run_id}, auth=admin, timeout=30).json()
            data = run["run"]["data"]
            held = sum(len(p["key"]) + len(p["value"]) for p in data.get("params", []))
            held += sum(len(t["key"]) + len(t["value"]) for t in data.get("tags", []) if t["key"] == "blob")
    finally:
        requests.delete(f"{url}{API}/users/delete", json={"username": account.username}, auth=admin, timeout=10)
        requests.post(f"{url}{API}/experiments/delete", json={"experiment_id": account.experiment_id}, auth=admin,
                      timeout=10)
    return (f"measured (default relay, testbed MLflow): {accepted:,} bytes of params and tag writes accepted before "
            f"the refusal ({(refused or 'none')[:120]}...); MLflow holds {held:,} of them (overwritten tags keep only "
            f"their last value; every write was readable while the job ran)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="also try the MLflow text budget on the testbed")
    args = parser.parse_args(argv)
    cfg = {**DEFAULTS, **from_environment()}
    print(table(cfg))
    if args.measure:
        print()
        print(measure())
    return 0


if __name__ == "__main__":
    sys.exit(main())
