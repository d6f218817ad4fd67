"""MLflow at cluster scale: N jobs logging once a second through their relays.

    set -a; . /opt/testbed/gateway.env; set +a
    .venv/bin/python -m bench.mlflow_scale [--jobs 200] [--seconds 60] [--capacity-seconds 15]

Provisions N MLflow researchers (m2d-scale-NNN, each with their own experiment, as the
gateway does) and one more who only browses, starts one real relay
(singularity/relay.py serve) per job with the owner's login, as the batch script does,
and has each job log one metric a second to its own run over the relay's socket (what
the shim in the container forwards). Meanwhile:

- a reader of MLflow's tracking store (each run's latest value, every 0.2 s: what every
  MLflow read answers from) notes when each value is stored: log -> stored latency,
  p50/p95/max, as two bounds 0.2 s and a read apart: at most (the end of the first read
  that saw it) and at least (the start of the read before, which did not);
- the browsing researcher loads what MLflow's UI loads (the page, experiments/search,
  runs/search of their own experiment) once a second, each request timed.

At the end the relays are stopped (they send what they hold) and every run's history is
read back: every value must have arrived, once. Then, unless --capacity-seconds 0, 32
clients (each another researcher) call runs/get as fast as MLflow answers, and then
runs/log-batch, each counted after as long again: the calls a second MLflow serves
(issue 24 measured 2.2 runs/get a second before the credential cache).

The relays' share of MLflow is --upstream-rate calls a second each (the gateway gives
MLFLOW_CALLS_PER_SECOND / MLFLOW_JOBS_AT_ONCE; default: the relay's own, 2).
"""
import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import sqlalchemy

from gateway.adapters.mlflow import MlflowAdmin
from tests.helpers.relay import API, RelayProcesses, UnixHTTPConnection, call, stop_all

METRIC = "seq"
READ_EVERY = 0.2  # seconds between two reads of MLflow's store


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[max(0, round(fraction * len(ordered)) - 1)] if ordered else float("nan")


def summary(values) -> str:
    if not values:
        return "none"
    return (f"p50 {statistics.median(values):.2f} s, p95 {percentile(values, 0.95):.2f} s, "
            f"max {max(values):.2f} s ({len(values)})")


class Job:
    """One simulated job: a relay with its owner's login, a run, one value a second."""

    def __init__(self, account, relay: RelayProcesses):
        self.account, self.relay = account, relay
        self.run_id = None
        self.sent: list[float] = []  # time.time() at which value k was logged (its answer)
        self.seen_at: dict[int, float] = {}  # value k first readable (the end of the search that saw it)
        self.unseen_at: dict[int, float] = {}  # the start of the search before, which did not see it yet
        self.errors: list[str] = []

    def work(self, go: threading.Event, window: dict) -> None:
        """Create the run at once (as its relay starts: jobs start one after the other
        on a cluster, and a login's first check on each MLflow worker is a full
        password hash), then, once every job is up, log one value a second."""
        connection = UnixHTTPConnection(str(self.relay.socket))
        try:
            self.run_id = call(connection, "POST", "/runs/create",
                               {"experiment_id": self.account.experiment_id, "run_name": "scale"})["run"]["info"]["run_id"]
            go.wait()
            stop = window["stop"]
            next_at = window["start"] + random.random()  # jobs do not log in step
            while next_at < stop:
                time.sleep(max(0.0, next_at - time.time()))
                step = len(self.sent)
                call(connection, "POST", "/runs/log-metric",
                     {"run_id": self.run_id, "key": METRIC, "value": step, "step": step,
                      "timestamp": int(time.time() * 1000)})
                self.sent.append(time.time())
                next_at += 1.0
        except Exception as e:  # noqa: BLE001 - reported with the figures
            self.errors.append(f"{type(e).__name__}: {e}")
        finally:
            connection.close()


def provision_all(admin: MlflowAdmin, names: list[str]):
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(admin.provision, names))


def watch_store(store_url, jobs: list[Job], stop: threading.Event, reads: list[float]) -> None:
    """MLflow's tracking store (what every MLflow read answers from), each run's latest
    value, every READ_EVERY seconds: marks when each value is first stored. A value
    once stored is readable through MLflow; reading over MLflow's API instead (a
    runs/search of every experiment) cost MLflow seconds of its CPU a read, the
    figure's noise and a load no site has."""
    engine = sqlalchemy.create_engine(store_url, poolclass=sqlalchemy.pool.NullPool)
    query = sqlalchemy.text("SELECT run_uuid, value FROM latest_metrics WHERE key = :key AND run_uuid IN :ids") \
        .bindparams(sqlalchemy.bindparam("ids", expanding=True))
    by_run, previous_start = {}, 0.0
    with engine.connect() as store:
        while not stop.is_set():
            if len(by_run) < len(jobs):
                by_run = {job.run_id: job for job in jobs if job.run_id}
            started = time.time()
            rows = store.execute(query, {"key": METRIC, "ids": list(by_run)}).all() if by_run else []
            store.rollback()  # the next read sees what was committed since
            now = time.time()
            reads.append(now - started)
            for run_id, latest in rows:
                job = by_run[run_id]
                for step in range(int(latest) + 1):  # a relay sends a run's values in order
                    if step not in job.seen_at:
                        job.seen_at[step], job.unseen_at[step] = now, previous_start
            previous_start = started
            stop.wait(READ_EVERY)


def browse(url, account, stop: threading.Event, timings: dict[str, list[float]]) -> None:
    """What a researcher's MLflow UI loads, once a second."""
    session = requests.Session()
    session.auth = (account.username, account.password)
    ajax = url + "/ajax-api/2.0/mlflow"
    requests_made = {
        "page /": lambda: session.get(url + "/", timeout=60),
        "experiments/search": lambda: session.post(f"{ajax}/experiments/search", json={"max_results": 25},
                                                   timeout=60),
        "runs/search": lambda: session.post(f"{ajax}/runs/search", timeout=60,
                                            json={"experiment_ids": [account.experiment_id], "max_results": 100}),
    }
    while not stop.is_set():
        for name, request in requests_made.items():
            started = time.time()
            try:
                status = request().status_code
            except requests.RequestException as e:
                status = type(e).__name__
            timings.setdefault(name, []).append(time.time() - started)
            if status != 200:
                timings.setdefault("failed", []).append(status)
        stop.wait(1.0)


def check_all_arrived(url, admin_auth, jobs: list[Job]) -> tuple[int, int, list[str]]:
    """(values logged, values in MLflow, problems): every job's history read back."""
    logged = arrived = 0
    problems = []
    for job in jobs:
        logged += len(job.sent)
        if not job.run_id:
            continue
        history = requests.get(f"{url}{API}/metrics/get-history", auth=admin_auth, timeout=60,
                               params={"run_id": job.run_id, "metric_key": METRIC, "max_results": 100000}).json()
        steps = sorted(int(m["step"]) for m in history.get("metrics", []))
        arrived += len(steps)
        if steps != list(range(len(job.sent))):
            problems.append(f"{job.account.username}: logged {len(job.sent)}, MLflow has {len(steps)} "
                            f"(steps {steps[:3]}...{steps[-3:]})")
    return logged, arrived, problems


def capacity(url, accounts, seconds: float, clients: int = 32) -> dict[str, tuple[float, list[float]]]:
    """Calls a second MLflow serves to `clients` researchers at once, each calling as
    fast as it is answered: runs/get, then runs/log-batch of one value."""
    runs = []
    for account in accounts[:clients]:
        answer = requests.post(f"{url}{API}/runs/create", auth=(account.username, account.password), timeout=60,
                               json={"experiment_id": account.experiment_id, "run_name": "capacity"})
        runs.append((account, answer.json()["run"]["info"]["run_id"]))
    figures = {}
    for name in ("runs/get", "runs/log-batch"):
        # the first `seconds` are not counted: each login's first call is a full password hash
        latencies: list[float] = []
        counted_from = time.time() + seconds
        deadline = counted_from + seconds

        def client(account, run_id, name=name, latencies=latencies, counted_from=counted_from, deadline=deadline):
            session = requests.Session()
            session.auth = (account.username, account.password)
            step = 0
            while time.time() < deadline:
                started = time.time()
                if name == "runs/get":
                    answer = session.get(f"{url}{API}/runs/get", params={"run_id": run_id}, timeout=60)
                else:
                    answer = session.post(f"{url}{API}/runs/log-batch", timeout=60, json={
                        "run_id": run_id, "metrics": [{"key": "c", "value": step, "step": step,
                                                       "timestamp": int(time.time() * 1000)}]})
                    step += 1
                if answer.status_code == 200 and started >= counted_from:
                    latencies.append(time.time() - started)

        with ThreadPoolExecutor(len(runs)) as pool:
            list(pool.map(lambda pair: client(*pair), runs))
        figures[name] = (len(latencies) / (time.time() - counted_from), latencies)
    return figures


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # the relays are stopped on the way out
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60, help="how long each job logs (default 60)")
    parser.add_argument("--upstream-rate", type=float, default=2.0, help="each relay's calls a second to MLflow")
    parser.add_argument("--capacity-seconds", type=float, default=15, help="0: no capacity phase")
    parser.add_argument("--store-url", default=os.environ.get("M2D_TEST_MLFLOW_STORE_URL"),
                        help="MLflow's tracking store, read to see when each value is stored "
                             "(default: $M2D_TEST_MLFLOW_STORE_URL, which the testbed's gateway.env sets)")
    parser.add_argument("--start-interval", type=float, default=0.5, help="seconds between two jobs' starts")
    args = parser.parse_args()
    url = os.environ["M2D_MLFLOW_URL"].rstrip("/")
    admin_auth = (os.environ["M2D_MLFLOW_ADMIN_USERNAME"], os.environ["M2D_MLFLOW_ADMIN_PASSWORD"])
    admin = MlflowAdmin(url, *admin_auth, timeout=60)

    started = time.time()
    accounts = provision_all(admin, [f"m2d-scale-{i:03d}" for i in range(args.jobs + 1)])
    browser, accounts = accounts[-1], accounts[:-1]
    print(f"{args.jobs + 1} researchers provisioned in {time.time() - started:.0f} s; load {os.getloadavg()[0]:.1f}")

    with tempfile.TemporaryDirectory() as folder:
        relays = []
        try:
            # each job starts (its relay, its run) right after the one before; all log once all are up
            go, window, jobs, workers = threading.Event(), {}, [], []
            started = time.time()
            for i, account in enumerate(accounts):
                relays.append(RelayProcesses(Path(folder) / f"job{i}", account, url, "--upstream-rate",
                                             str(args.upstream_rate), "--stats-file", f"{folder}/job{i}.stats",
                                             shim=False))
                jobs.append(Job(account, relays[-1]))
                workers.append(threading.Thread(target=jobs[-1].work, args=(go, window)))
                workers[-1].start()
                time.sleep(args.start_interval)
            window.update(start=time.time() + 5, stop=time.time() + 5 + args.seconds)
            go.set()
            print(f"{len(relays)} jobs started in {time.time() - started:.0f} s (load {os.getloadavg()[0]:.1f})")
            stop_reading, reads, ui = threading.Event(), [], {}
            reader = threading.Thread(target=watch_store, args=(args.store_url, jobs, stop_reading, reads))
            browser_thread = threading.Thread(target=browse, args=(url, browser, stop_reading, ui))
            reader.start()
            browser_thread.start()
            loads = []
            while any(worker.is_alive() for worker in workers):
                loads.append(os.getloadavg()[0])
                time.sleep(5)
            for worker in workers:
                worker.join()
            # what is still on its way: up to the relays' next flushes
            deadline = time.time() + 30
            while time.time() < deadline and any(len(job.seen_at) < len(job.sent) for job in jobs):
                time.sleep(0.5)
            stop_reading.set()
            reader.join()
            browser_thread.join()
        finally:
            stop_all(relays)
        stats = [json.loads(Path(f"{folder}/job{i}.stats").read_text()) for i in range(len(relays))
                 if Path(f"{folder}/job{i}.stats").exists()]

    logged, arrived, problems = check_all_arrived(url, admin_auth, jobs)
    latencies = [job.seen_at[k] - sent for job in jobs for k, sent in enumerate(job.sent) if k in job.seen_at]
    # a value the search before did not see was stored after that search began
    at_least = [max(0.0, job.unseen_at[k] - sent) for job in jobs for k, sent in enumerate(job.sent)
                if k in job.seen_at]
    errors = [f"{job.account.username}: {e}" for job in jobs for e in job.errors]
    print(f"\n{args.jobs} jobs, each logging one value a second for {args.seconds:g} s through its relay "
          f"(upstream rate {args.upstream_rate:g}/s each); load average during: "
          f"{min(loads, default=0):.1f}-{max(loads, default=0):.1f}")
    print(f"  values logged {logged} ({logged / args.seconds:.0f}/s), in MLflow at the end {arrived}, "
          f"never seen stored {logged - len(latencies)}; "
          f"relays: {sum(s['refused'] for s in stats)} calls refused, "
          f"{sum(s['undelivered'] for s in stats)} values undelivered")
    print(f"  log_metric -> stored in MLflow, at most: {summary(latencies)}")
    print(f"  log_metric -> stored in MLflow, at least: {summary(at_least)}")
    print(f"  each read of the store: {summary(reads)}")
    for name, values in ui.items():
        if name != "failed":
            print(f"  UI meanwhile, {name}: {summary(values)}")
    if ui.get("failed"):
        print(f"  UI requests that failed: {len(ui['failed'])} ({sorted(set(map(str, ui['failed'])))})")
    for line in (problems + errors)[:20]:
        print(f"  PROBLEM {line}")

    if args.capacity_seconds:
        for name, (rate, values) in capacity(url, accounts, args.capacity_seconds).items():
            print(f"capacity, {min(32, len(accounts))} researchers at once, {name}: {rate:.1f} calls/s, latency {summary(values)}")
    print(f"load average now {os.getloadavg()[0]:.1f}")
    if problems or errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
