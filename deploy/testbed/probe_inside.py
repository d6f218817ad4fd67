"""Hostile probes run INSIDE a sealed job's container (deploy/testbed/probe-sealing.sh).

Every probe tries something a dataset thief would try and prints one line
    CHECK <name> PASS|FAIL <detail>
PASS means the attempt was stopped.  Standard library only: it runs on the
base image's python3.  argv: the run's tag (names the canary files).
"""
import ctypes
import errno
import json
import os
import socket
import stat
import subprocess
import sys
import time

T_START = time.time()
TAG = sys.argv[1] if len(sys.argv) > 1 else "probe"
libc = ctypes.CDLL(None, use_errno=True)


def check(name, ok, detail=""):
    print(f"CHECK {name} {'PASS' if ok else 'FAIL'} {detail}".rstrip(), flush=True)


def status_field(name):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    return None


def attempt(fn):
    """Run fn; return None if it succeeded, else the errno name."""
    try:
        fn()
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return None


print(f"TIME python_start {T_START:.3f}", flush=True)
print(f"INFO uid={os.getuid()} gid={os.getgid()} groups={os.getgroups()}", flush=True)

# ---- privileges
cap = status_field("CapEff")
check("capeff_zero", cap is not None and int(cap, 16) == 0, f"CapEff={cap}")
for field in ("CapPrm", "CapBnd", "CapAmb"):
    print(f"INFO {field}={status_field(field)}")
nnp = status_field("NoNewPrivs")
check("no_new_privs", nnp == "1", f"NoNewPrivs={nnp}")
check("not_root", os.getuid() != 0 and os.geteuid() != 0, f"euid={os.geteuid()}")

# ---- the dataset stays read-only
MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
rc = libc.mount(None, b"/mnt/dataset", None, MS_REMOUNT | MS_BIND, None)
err = errno.errorcode.get(ctypes.get_errno(), "?") if rc != 0 else None
check("dataset_remount_rw_refused", rc != 0, f"mount(MS_REMOUNT|MS_BIND) -> {err or 'succeeded'}")
rc = libc.mount(None, b"/mnt/dataset", None, MS_REMOUNT, None)
err = errno.errorcode.get(ctypes.get_errno(), "?") if rc != 0 else None
check("dataset_remount_refused", rc != 0, f"mount(MS_REMOUNT) -> {err or 'succeeded'}")
try:
    out = subprocess.run(["mount", "-o", "remount,rw", "/mnt/dataset"], capture_output=True,
                         text=True, timeout=10)
    check("dataset_mount_cmd_refused", out.returncode != 0, (out.stderr or out.stdout).strip()[:120])
except FileNotFoundError:
    print("INFO no mount binary in the image")


def write_dataset():
    with open(f"/mnt/dataset/{TAG}-written", "w") as f:
        f.write("stolen")


err = attempt(write_dataset)
check("dataset_write_refused", err is not None, f"open(w) -> {err or 'succeeded'}")
err = attempt(lambda: os.mkdir(f"/mnt/dataset/{TAG}-dir"))
check("dataset_mkdir_refused", err is not None, f"mkdir -> {err or 'succeeded'}")
first = sorted(os.listdir("/mnt/dataset"))[0]
err = attempt(lambda: os.chmod(f"/mnt/dataset/{first}", 0o777))
check("dataset_chmod_refused", err is not None, f"chmod -> {err or 'succeeded'}")

# ---- device nodes and mounts
for path in ("/tmp/blk", "/mnt/export/blk"):
    err = attempt(lambda path=path: os.mknod(path, stat.S_IFBLK | 0o600, os.makedev(7, 0)))
    check(f"mknod_block_refused:{path}", err is not None, f"-> {err or 'succeeded'}")
    if err is None:
        os.unlink(path)
rc = libc.mount(b"tmpfs", b"/mnt", b"tmpfs", 0, None)
err = errno.errorcode.get(ctypes.get_errno(), "?") if rc != 0 else None
check("mount_tmpfs_refused", rc != 0, f"-> {err or 'succeeded'}")
devs = sorted(os.listdir("/dev"))
check("dev_minimal", not any(d.startswith(("sd", "vd", "nvme", "loop", "fuse", "mem", "kmem"))
                             for d in devs), " ".join(devs))
err = attempt(lambda: open("/proc/sysrq-trigger", "w").close())
check("proc_sysrq_refused", err is not None, f"-> {err or 'succeeded'}")

# ---- the gateway's things are not even visible
for path in ("/opt/testbed/gateway", "/opt/testbed/secrets", "/opt/testbed/gateway.env",
             "/opt/testbed", "/home/m2d", f"/root/{TAG}-canary", "/etc/sudoers.d",
             "/work"):
    visible = os.path.lexists(path)
    readable = False
    if visible:
        try:
            if os.path.isdir(path):
                os.listdir(path)
            else:
                open(path).read(1)
            readable = True
        except OSError:
            pass
    check(f"invisible:{path}", not visible, f"visible={visible} readable={readable}")
# its own PID namespace: no host process (slurmd, the gateway, redis) is visible
procs = {}
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                procs[pid] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:60]
        except OSError:
            pass
check("pid_namespace", len(procs) < 10 and not any(
    w in c for c in procs.values() for w in ("slurm", "redis", "mlflow", "gunicorn", "mariadb")),
    f"{len(procs)} processes: {sorted(procs.values())}")
try:
    root_entries = os.listdir("/root")
except OSError as e:
    root_entries = [f"<{errno.errorcode.get(e.errno)}>"]
check("root_is_the_images_own", not any(TAG in e for e in root_entries), f"/root: {root_entries}")
print(f"INFO / holds: {sorted(os.listdir('/'))}")
with open("/proc/self/mountinfo") as f:
    mounts = [line.split()[4] for line in f]
print(f"INFO mounts: {' '.join(mounts)}")

# ---- the network: loopback only, nothing reachable
with open("/proc/net/dev") as f:
    ifaces = [line.split(":")[0].strip() for line in f.readlines()[2:]]
check("only_loopback", ifaces == ["lo"], f"interfaces={ifaces}")


def connect(host, port, family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((host, port))
        return None
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e)) if e.errno else type(e).__name__
    finally:
        s.close()


for host, port, what in (("127.0.0.1", 6379, "host Redis"), ("127.0.0.1", 6380, "testbed Redis"), ("127.0.0.1", 5001, "host MLflow"),
                         ("127.0.0.1", 8025, "host SMTP"), ("127.0.0.1", 3307, "host MariaDB"),
                         ("127.0.0.1", 6817, "slurmctld"), ("1.1.1.1", 53, "internet"),
                         ("10.0.2.2", 80, "gateway address"), ("169.254.169.254", 80, "metadata")):
    err = connect(host, port)
    check(f"no_connect:{host}:{port}", err is not None, f"{what} -> {err or 'CONNECTED'}")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
err = attempt(lambda: s.sendto(b"x", ("1.1.1.1", 53)))
check("no_udp_out", err is not None, f"sendto 1.1.1.1:53 -> {err or 'sent'}")
try:
    socket.getaddrinfo("pypi.org", 443)
    check("no_dns", False, "pypi.org resolved")
except OSError as e:
    check("no_dns", True, f"-> {e}")
# abstract Unix sockets live in the network namespace: the host's are not reachable
print(f"INFO /proc/net/unix entries: {len(open('/proc/net/unix').read().splitlines()) - 1}")

# ---- cpus and memory as Slurm granted them
nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
print(f"RESULT nproc {nproc} affinity={sorted(os.sched_getaffinity(0))}")

# ---- the rest of the layout
err = attempt(lambda: open("/code/written", "w").close())
check("code_read_only", err is not None, f"-> {err or 'succeeded'}")
err = attempt(lambda: open("/run/m2d/written", "w").close())
check("relay_dir_read_only", err is not None, f"-> {err or 'succeeded'}")
with open(f"/mnt/export/{TAG}-export-ok", "w") as f:
    f.write("ok")
check("export_writable", True)
env = sorted(os.environ)
check("clean_env", not any(k.startswith(("SLURM_", "SUDO_", "M2D_")) for k in env), " ".join(env))

# ---- a process that tries to outlive the job (from inside the container)
subprocess.Popen(["setsid", "sleep", f"2000.{os.environ.get('PROBE_JOB', '0')}"],
                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(f"TIME python_end {time.time():.3f}", flush=True)
print("DONE", json.dumps({"tag": TAG}))
