"""How the gateway's side of a poll cycle grows with the number of active jobs.

    python -m bench.scale [N ...]      (default 1000 5000 20000)

For each N it times what CliScheduler.statuses does with sacct's answer for N
jobs (check the ids, parse the lines, keep the asked-for ones) on synthetic
sacct output, so the figure is the gateway's own CPU, not Slurm's. Linear
growth shows as a constant time per job.
"""
import sys
import time
from datetime import timezone

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


def main(sizes: list[int]) -> None:
    print(f"{'jobs':>8} {'cpu s':>8} {'us/job':>8}")
    for n in sizes:
        ids = [str(100000 + i) for i in range(n)]
        output = sacct_output(n)
        started = time.process_time()
        assert one_cycle(ids, output) == n
        seconds = time.process_time() - started
        print(f"{n:>8} {seconds:>8.3f} {seconds / n * 1e6:>8.1f}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1000, 5000, 20000])
