"""How many pytest-xdist workers `make test` starts (each one a session with a
private gateway stack of its own), printed for the Makefile:

    python -m tests.helpers.workers        # e.g. 4

The suite mostly waits: on Slurm to run a job, on Apptainer to build, on a
poll cycle. More workers than cores pay as long as Slurm can run their jobs at
once, so the count follows the cluster's job slots, read from sinfo (one node
or several), not the machine's cores alone:

- a slot is what one test job takes: SLURM_CPUS (1) CPU of a node; a real job
  also takes SLURM_GPUS (1) GPU (dry runs and most tests' own jobs take none);
- WORKERS_PER_SLOT workers per CPU slot, at least two in all, at most
  WORKERS_PER_CORE per core (the builds, the browsers and the gateway's own
  processes need the CPUs) and one per MEMORY_PER_WORKER of free memory.
"""
import os
import subprocess

WORKERS_PER_SLOT = 2
# 3 per core thrashed 2 cores (6 stacks, load 15, a fifth of the suite in 17 min); at 1 per
# core the 2 cores idled a third of the time (the stacks wait on Slurm and poll cycles). 2 per
# core, parallel part: 1136 s on a warm testbed (2 per machine: 1366 s); after a fresh testbed
# 1321 s, as 2 did (1301 s): cold image builds keep the cores busy either way
WORKERS_PER_CORE = 2
MEMORY_PER_WORKER = 2 * 1024**3  # a stack's processes, a chromium, an image build's squashfs
JOB_CPUS = 1  # the stacks' SLURM_CPUS (gateway/config.py's default)


def slurm_nodes():
    """[(node, CPUs, GPUs)] of the default partition's nodes, each once."""
    return parse_sinfo(subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%c|%G|%P"], capture_output=True, text=True,
                                      timeout=60, check=True).stdout)


def parse_sinfo(listing):
    """``sinfo -h -N -o %N|%c|%G|%P``: a node shows once per partition it is in;
    the default partition ends in ``*`` (the testbed's fault node is not in it)."""
    rows = (line.split("|") for line in listing.split())
    return [(name, int(cpus), _gpus(gres)) for name, cpus, gres, partition in rows if partition.endswith("*")]


def _gpus(gres):
    """GPUs in sinfo's GRES column (``gpu:fake:1``, ``gpu:2(S:0)``, ``(null)``)."""
    count = 0
    for part in gres.split(","):
        fields = part.split("(")[0].split(":")
        if fields[0] == "gpu" and fields[-1].isdigit():
            count += int(fields[-1])
    return count


def free_memory():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def workers(nodes, cores, memory):
    slots = sum(cpus // JOB_CPUS for _, cpus, _ in nodes)
    return max(2, min(WORKERS_PER_SLOT * slots, WORKERS_PER_CORE * cores, memory // MEMORY_PER_WORKER))


def main():
    try:
        nodes = slurm_nodes()
    except (OSError, subprocess.SubprocessError):
        nodes = []  # no Slurm to ask: the floor; the tests then say what is missing
    print(workers(nodes, os.cpu_count() or 1, free_memory()))


if __name__ == "__main__":
    main()
