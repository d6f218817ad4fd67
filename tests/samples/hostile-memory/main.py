"""A hostile submission that tries to starve the node: it allocates and touches
3 GiB (the test stack gives a job 1G). Slurm's cgroup must kill it; if it is
still alive after the allocation it says so and exits 0, so the test fails with
that line instead of passing by luck."""
import sys
import time

CHUNK = 64 * 1024**2
held = []
for i in range(3 * 1024**3 // CHUNK):
    held.append(bytearray(b"\x01") * CHUNK)  # filled, so every page is really used
    if i % 4 == 3:
        print(f"holding {(i + 1) * CHUNK // 1024**2} MiB", file=sys.stderr, flush=True)
time.sleep(20)
print(f"m2d hostile sample: still alive holding {len(held) * CHUNK // 1024**2} MiB", flush=True)
