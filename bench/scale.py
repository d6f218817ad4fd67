"""How a poll cycle grows with the number of active jobs.

    python -m bench.scale [N ...]          the gateway's parse of synthetic sacct
                                           output (default 1000 5000 20000)
    set -a; . /opt/testbed/gateway.env; set +a
    python -m bench.scale --real [N ...]   real held jobs in the testbed's Slurm
                                           (default 5000 20000; as root)

Without --real it times what CliScheduler.statuses does with sacct's answer
for N jobs (check the ids, parse the lines, keep the asked-for ones) on
synthetic output: the gateway's own CPU, not Slurm's.

With --real it submits N jobs held (``sbatch --hold``, so none takes the node)
as the job account (M2D_JOB_USER), the shape of the gateway's jobs (one GPU,
1 CPU, --time), from several sbatch loops at once (one sbatch process per
job, as the gateway does; a job array would be one sacct record, not N).
For each N, once sacct lists every job, it times

- the adapter's one batched sacct call (CliScheduler.statuses, what the poller
  calls): wall time, the gateway's CPU, sacct's CPU, slurmdbd's and MariaDB's;
- one whole poll cycle (jobs.poller.poll_once) on a fresh SQLite database
  holding N queued submissions of those jobs: the query, sacct, squeue for
  the reasons they wait, the reason updates (the first cycle writes N, later
  cycles none), the sweep;
- whether slurmctld still answers (scontrol ping, squeue).

Every job it made is cancelled at the end, also on Ctrl-C or an error
(``scancel --name`` of the printed name, if this process is killed -9).
Linear growth shows as a constant time per job.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timezone
from pathlib import Path

from gateway.adapters.slurm import check_ids, parse_sacct

STATES = ("PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED by 0")


def sacct_output(n: int) -> str:
    lines = []
    for i in range(n):
        state = STATES[i % len(STATES)]
        end = "Unknown" if state in ("PENDING", "RUNNING") else "2026-11-27T10:00:09"
        node = "None assigned" if state == "PENDING" else "gpu01"
        lines.append(f"{100000 + i}|{state}|{i % 3}:0|2026-11-27T10:00:01|{end}|{node}")
    return "\n".join(lines) + "\n"


def one_cycle(ids: list[str], output: str) -> int:
    wanted = set(check_ids(ids))
    found = parse_sacct(output, tz=timezone.utc)
    return sum(1 for job_id in found if job_id in wanted)


def synthetic(sizes: list[int]) -> None:
    print("the gateway's parse of synthetic sacct output:")
    print(f"{'jobs':>8} {'cpu s':>8} {'us/job':>8}")
    for n in sizes:
        ids = [str(100000 + i) for i in range(n)]
        output = sacct_output(n)
        started = time.process_time()
        assert one_cycle(ids, output) == n
        seconds = time.process_time() - started
        print(f"{n:>8} {seconds:>8.3f} {seconds / n * 1e6:>8.1f}")


# ------------------------------------------------------------ real held jobs

class HeldJobs:
    """Jobs held in the testbed's Slurm, all named ``name``; cancelled on exit."""

    def __init__(self, job_user: str, loops: int):
        self.job_user, self.loops = job_user, loops
        self.name = f"m2dbench-scale-{uuid.uuid4().hex[:8]}"
        self.ids: list[str] = []

    def __enter__(self) -> HeldJobs:
        signal.signal(signal.SIGTERM, _interrupt)  # a kill ends through __exit__ too, so the jobs go
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()

    def submit(self, count: int) -> float:
        """Submit ``count`` more held jobs; the seconds it took."""
        share = [count // self.loops + (i < count % self.loops) for i in range(self.loops)]
        # One shell loop per worker, run as the job account: the per-job cost
        # is sbatch's own (a process, a munge credential, slurmctld's RPC), as
        # the gateway pays it, without a sudo per job on top.
        sbatch = (f"sbatch --parsable --hold --job-name={self.name} --output=/dev/null --chdir=/tmp "
                  "--gres=gpu:1 --cpus-per-task=1 --mem=1G --time=00:10:00 --wrap=true")
        started = time.monotonic()
        with ThreadPoolExecutor(self.loops) as pool:
            list(pool.map(self._loop, [f"for i in $(seq {n}); do {sbatch} || exit 1; done" for n in share if n]))
        return time.monotonic() - started

    def _loop(self, script: str) -> None:
        proc = subprocess.run(["setpriv", f"--reuid={self.job_user}", f"--regid={self.job_user}",
                               "--init-groups", "--", "bash", "-c", script],
                              capture_output=True, text=True, env=slurm_env(), cwd="/tmp")
        # what it did submit is kept (and cancelled), also when a later sbatch failed
        self.ids.extend(line.split(";")[0] for line in proc.stdout.split())
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed after {len(proc.stdout.split())} jobs: {proc.stderr.strip()[-500:]}")

    def cancel(self) -> None:
        if not self.ids:
            return
        started = time.monotonic()
        # as root: one scancel per chunk of ids (an argument list of 20,000 ids is fine)
        for chunk in range(0, len(self.ids), 5000):
            subprocess.run(["scancel", *self.ids[chunk:chunk + 5000]], env=slurm_env(),
                           capture_output=True, timeout=600)
        subprocess.run(["scancel", f"--name={self.name}", f"--user={self.job_user}"], env=slurm_env(),
                       capture_output=True, timeout=600)
        left = subprocess.run(["squeue", "-h", f"--name={self.name}", "-t", "PD", "-o", "%i"], env=slurm_env(),
                              capture_output=True, text=True, timeout=120).stdout.split()
        print(f"cancelled {len(self.ids)} held jobs in {time.monotonic() - started:.0f} s"
              + (f"; {len(left)} still pending: scancel --name={self.name}" if left else ""))
        self.ids = []


def _interrupt(*_):
    raise KeyboardInterrupt


def slurm_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in ("PATH", "SLURM_CONF", "LANG")} | {"TZ": "UTC"}


def daemon_cpu(name: str) -> float:
    """CPU seconds a testbed daemon has used so far (0 when its pid is unknown)."""
    pidfile = Path(os.environ.get("M2D_TESTBED_DIR", "/opt/testbed")) / "slurm" / "pids" / f"{name}.pid"
    try:
        fields = Path(f"/proc/{pidfile.read_text().strip()}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Clock:
    """Wall time, this process's CPU, its children's (sacct, squeue), slurmdbd's and MariaDB's."""

    def __enter__(self) -> Clock:
        self.marks = self._now()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu, self.children, self.slurmdbd, self.mariadb = (
            b - a for a, b in zip(self.marks, self._now()))

    @staticmethod
    def _now():
        times = os.times()
        return (time.monotonic(), time.process_time(), times.children_user + times.children_system,
                daemon_cpu("slurmdbd"), daemon_cpu("mariadbd"))


def wait_until_recorded(scheduler, ids: list[str], timeout: float = 900) -> float:
    """Seconds until sacct lists every job (slurmdbd trails slurmctld)."""
    started = time.monotonic()
    while len(scheduler.statuses(ids)) < len(ids):
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"sacct lists {len(scheduler.statuses(ids))} of {len(ids)} jobs after {timeout} s")
        time.sleep(5)
    return time.monotonic() - started


def poll_app(folder: Path, ids: list[str]):
    """A gateway app on a fresh SQLite database with one queued submission per job."""
    import flask_migrate

    from gateway import create_app
    from gateway.core.models import Submission, User, utcnow
    from gateway.extensions import db
    from m2d.contract.states import Status

    shutil.rmtree(folder, ignore_errors=True)
    app = create_app({"SECRET_KEY": uuid.uuid4().hex, "DATA_DIR": str(folder / "data"),
                      "SQLALCHEMY_DATABASE_URI": f"sqlite:///{folder / 'gw.db'}",
                      # no Redis: the sweep finds nothing owed, metrics are dropped
                      "REDIS_URL": "redis://127.0.0.1:1/0"})
    with app.app_context():
        logging.disable(logging.INFO)  # not a line per migration
        flask_migrate.upgrade()
        logging.disable(logging.NOTSET)
        now = utcnow()
        users = [User(email=f"r{n}@example.org", name=f"R{n}", approved_at=now) for n in range(10)]
        db.session.add_all(users)
        db.session.flush()
        db.session.execute(db.insert(Submission), [
            {"user_id": users[n % 10].id, "status": Status.QUEUED.value, "slurm_job_id": job_id,
             "filename": "s.zip", "created_at": now, "updated_at": now} for n, job_id in enumerate(ids)])
        db.session.commit()
    return app


def measure(scheduler, ids: list[str], folder: Path, repeat: int) -> dict:
    from jobs.poller import poll_once

    found, calls = 0, []
    for _ in range(repeat):
        with Clock() as clock:
            found = len(scheduler.statuses(ids))
        calls.append(clock)
    app = poll_app(folder, ids)
    cycles = []
    with app.app_context():
        for _ in range(repeat):
            with Clock() as clock:
                poll_once(scheduler)
            cycles.append(clock)
    with Clock() as ping:
        scheduler.ping(timeout=30)
    with Clock() as squeue:
        scheduler.pending_reasons(ids)
    return {"found": found, "calls": calls, "cycles": cycles, "ping": ping.wall, "squeue": squeue.wall}


def median(clocks, attribute):
    return statistics.median(getattr(c, attribute) for c in clocks)


def real(sizes: list[int], loops: int, repeat: int) -> None:
    from gateway.adapters.slurm.cli_scheduler import CliScheduler

    job_user = os.environ.get("M2D_JOB_USER", "m2d-job")
    scheduler = CliScheduler(timeout=600, job_user=job_user)
    folder = Path(tempfile.mkdtemp(prefix="m2d-bench-scale-"))
    rows = []
    try:
        with HeldJobs(job_user, loops) as held:
            print(f"held jobs are named {held.name} (as {job_user}); load average {os.getloadavg()[0]:.1f}")
            for n in sorted(sizes):
                batch = n - len(held.ids)
                seconds = held.submit(batch)
                print(f"{n:>6} held: {batch} more submitted in {seconds:.0f} s, {batch / seconds:.0f} jobs/s "
                      f"({loops} sbatch loops at once)")
                lag = wait_until_recorded(scheduler, held.ids)
                print(f"{n:>6} held: sacct lists them all {lag:.0f} s later")
                result = measure(scheduler, held.ids, folder / str(n), repeat)
                assert result["found"] == n, result["found"]
                rows.append({"n": n, **result, "load": os.getloadavg()[0]})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\nmedian of {repeat}; cpu: the gateway's process; sacct: its child processes; "
          "dbd/db: slurmdbd's and MariaDB's CPU")
    print(f"{'jobs':>6} | {'sacct call: wall':>16} {'cpu':>6} {'sacct':>6} {'dbd':>6} {'db':>6} {'us/job':>7} | "
          f"{'poll cycle: wall':>16} {'cpu':>6} {'1st':>6} {'us/job':>7} | {'ping':>5} {'squeue':>6} {'load':>5}")
    for r in rows:
        n, calls, cycles = r["n"], r["calls"], r["cycles"]
        wall = median(calls, "wall")
        cycle = median(cycles[1:] or cycles, "wall")
        print(f"{n:>6} | {wall:>16.3f} {median(calls, 'cpu'):>6.3f} {median(calls, 'children'):>6.3f} "
              f"{median(calls, 'slurmdbd'):>6.2f} {median(calls, 'mariadb'):>6.2f} {wall / n * 1e6:>7.0f} | "
              f"{cycle:>16.3f} {median(cycles[1:] or cycles, 'cpu'):>6.3f} {cycles[0].wall:>6.2f} "
              f"{cycle / n * 1e6:>7.0f} | {r['ping']:>5.2f} {r['squeue']:>6.2f} {r['load']:>5.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sizes", nargs="*", type=int)
    parser.add_argument("--real", action="store_true", help="real held jobs in the testbed's Slurm")
    parser.add_argument("--loops", type=int, default=4, help="sbatch loops at once (default 4)")
    parser.add_argument("--repeat", type=int, default=3, help="timings per size (default 3)")
    args = parser.parse_args()
    if args.real:
        real(args.sizes or [5000, 20000], args.loops, args.repeat)
    else:
        synthetic(args.sizes or [1000, 5000, 20000])


if __name__ == "__main__":
    main()
