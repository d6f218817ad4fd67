"""The gateway's web side under concurrent uploads, on the testbed.

    set -a; . /opt/testbed/gateway.env; set +a
    .venv/bin/python -m bench.load [--uploads 200] [--clients 20] [--big 20] [--big-mb 200]

Starts a private gateway stack (as the tests do, two gunicorn workers with 8
threads each) with its build workers stopped, so what is measured is the web
side alone: nothing reaches Slurm, and the submissions stay `received`.

1. ``--uploads`` uploads of the iris sample from ``--clients`` concurrent
   clients (one researcher each): every upload must be answered 201 once and
   appear once in the database; prints p50/p95/max upload time and the web
   workers' peak RSS.
2. ``--big`` concurrent uploads of a ``--big-mb`` MB zip (stored, so it does not
   shrink): prints each web worker's peak RSS (target <= 150 MB) and the bytes
   the web workers wrote: each zip once (target), plus its unpacked code.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import percentile
from tests.helpers.stack import SAMPLES, Stack, zip_folder
from tests.helpers.zips import make_padded_zip

RSS_TARGET_MB = 150


def web_workers(stack: Stack) -> list[int]:
    """The gunicorn master and its workers (one process group)."""
    group = os.getpgid(stack.procs["web"].pid)
    out = subprocess.run(["ps", "-e", "-o", "pid=,pgid="], capture_output=True, text=True).stdout
    return [int(pid) for pid, pgid in (line.split() for line in out.splitlines()) if int(pgid) == group]


def rss_mb(pid: int) -> float:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def bytes_written(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(next(line for line in open(f"/proc/{pid}/io") if line.startswith("wchar:")).split()[1])
        except FileNotFoundError:
            pass
    return total


class PeakRss(threading.Thread):
    """Samples each web process's RSS every 50 ms; ``peaks`` pid -> MB."""

    def __init__(self, pids: list[int]):
        super().__init__(daemon=True)
        self.pids, self.peaks, self.done = pids, dict.fromkeys(pids, 0.0), threading.Event()

    def run(self):
        while not self.done.wait(0.05):
            for pid in self.pids:
                self.peaks[pid] = max(self.peaks[pid], rss_mb(pid))

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *_):
        self.done.set()
        self.join()


def timed_uploads(researchers, zip_path: Path, count: int) -> tuple[list[float], list[str]]:
    def one(i):
        started = time.monotonic()
        response = researchers[i % len(researchers)].upload(zip_path)
        assert response.status_code == 201, f"upload {i}: {response.status_code} {response.text[:300]}"
        return time.monotonic() - started, response.json()["id"]

    with ThreadPoolExecutor(max_workers=len(researchers)) as pool:
        results = list(pool.map(one, range(count)))
    return [seconds for seconds, _ in results], [sid for _, sid in results]


def stored_ids(researchers) -> list[str]:
    ids = []
    for researcher in researchers:
        url = f"{researcher.stack.url}/api/v1/submissions?limit=100"
        while url:
            page = researcher.session.get(url, timeout=60)
            assert page.status_code == 200, page.text
            ids += [s["id"] for s in page.json()["submissions"]]
            url = page.json()["next"] and researcher.stack.url + page.json()["next"]
    return ids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uploads", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--big", type=int, default=20)
    parser.add_argument("--big-mb", type=int, default=200)
    args = parser.parse_args()
    stack = Stack(M2D_MAX_ZIP_BYTES=str((args.big_mb + 8) * 1024**2),
                  M2D_DAILY_SUBMISSIONS=str(args.uploads + args.big + 10)).start()
    try:
        for name in ("worker-build-1", "worker-build-2"):  # the web side alone
            os.killpg(stack.procs[name].pid, 15)
            stack.procs[name].wait(30)
        with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
            iris = zip_folder(SAMPLES / "iris", Path(tmp) / "iris.zip")
            researchers = [stack.researcher(f"load{i}") for i in range(args.clients)]
            pids = web_workers(stack)
            with PeakRss(pids) as rss:
                started = time.monotonic()
                times, ids = timed_uploads(researchers, iris, args.uploads)
                wall = time.monotonic() - started
            stored = stored_ids(researchers)
            assert sorted(stored) == sorted(ids) and len(set(ids)) == args.uploads, "an upload lost or doubled"
            print(f"{args.uploads} iris uploads from {args.clients} clients in {wall:.1f} s "
                  f"({args.uploads / wall:.1f}/s): each accepted once, {len(stored)} in the database")
            print(f"  upload time p50 {percentile(times, 50) * 1000:.0f} ms, p95 {percentile(times, 95) * 1000:.0f} ms, "
                  f"max {max(times) * 1000:.0f} ms")
            print(f"  web processes' peak RSS: {', '.join(f'{mb:.0f}' for mb in rss.peaks.values())} MB")

            if args.big:
                big = make_padded_zip(Path(tmp) / "big.zip", args.big_mb * 1024**2)
                size = big.stat().st_size
                before = bytes_written(pids)
                with PeakRss(pids) as rss:
                    started = time.monotonic()
                    times, ids = timed_uploads(researchers[:args.big] or researchers, big, args.big)
                    wall = time.monotonic() - started
                written = bytes_written(pids) - before
                unpacked = args.big * sum(i.file_size for i in zipfile.ZipFile(big).infolist())
                peak = max(rss.peaks.values())
                print(f"{args.big} concurrent {size / 1024**2:.0f} MB uploads in {wall:.1f} s: "
                      f"p50 {percentile(times, 50):.1f} s, max {max(times):.1f} s")
                print(f"  written by the web processes: the zips {(written - unpacked) / (args.big * size):.2f} x "
                      f"the bytes uploaded (target 1), plus the unpacked code the job binds at /code "
                      f"({unpacked / 1024**2:.0f} MB)")
                print(f"  peak RSS per web process: {', '.join(f'{mb:.0f}' for mb in rss.peaks.values())} MB "
                      f"(target <= {RSS_TARGET_MB} MB) {'ok' if peak <= RSS_TARGET_MB else 'MISSED'}")
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
