"""What sealing costs when a job starts: `apptainer exec` of the base image,
plain (as root, host network) against sealed (as the job account, through
the wrapper's sudo, --containall --cleanenv --no-privs --net --network none).

    python -m bench.sealed [RUNS]        (default 5; needs the testbed's settings)

The relay's own cost per MLflow call is bench/relay.py's.
"""
import os
import statistics
import subprocess
import sys
import time

SEALING = ["--containall", "--cleanenv", "--no-privs", "--net", "--network", "none"]


def seconds(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, timeout=120)
    return time.perf_counter() - started


def main(runs: int) -> None:
    apptainer, image = os.environ["M2D_APPTAINER"], os.environ["M2D_BASE_IMAGE"]
    job_user = os.environ.get("M2D_JOB_USER", "m2d-job")
    cases = {
        "plain (root, host network)": [apptainer, "exec", image, "python3", "-c", "pass"],
        f"sealed (as {job_user})": ["sudo", "-n", "-u", job_user, "--", apptainer, "exec", *SEALING,
                                     image, "python3", "-c", "pass"],
    }
    print(f"apptainer exec of {os.path.basename(image)} running python3 -c pass, {runs} runs each")
    for name, argv in cases.items():
        seconds(argv)  # warm the page cache
        times = [seconds(argv) for _ in range(runs)]
        print(f"  {name:<28} median {statistics.median(times):.2f} s   min {min(times):.2f}   max {max(times):.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
