"""A hostile submission: tries every way out of a sealed job that a dataset thief
would try, and prints one line per attempt:

    BLOCKED <name> <detail>     the attempt was stopped
    OPEN <name> <detail>        it worked (or a refusal would make a client hang)

tests/test_sealing.py submits it through the real gateway and reads the job's
stdout on the host. What only the host side can know (its addresses, the
gateway's port, another researcher's experiment and run, hashes of the owner's
MLflow password) comes in /code/probe.json, written into the zip by the test;
a real attacker would guess or scan for those, so this probe is given more than
an attacker has.
"""
import base64
import ctypes
import errno
import glob
import hashlib
import http.client
import json
import os
import re
import socket
import stat
import subprocess
import threading
import time
import urllib.parse

CONFIG = json.load(open("/code/probe.json"))
TAG = CONFIG["tag"]
SECRET_HASHES = set(CONFIG["secret_sha256"])
libc = ctypes.CDLL(None, use_errno=True)


def ready(name, ok, detail=""):
    """A precondition of the attempts that follow, so that they are not blocked by accident."""
    print(f"{'READY' if ok else 'NOT-READY'} {name} {detail}".rstrip(), flush=True)


def report(name, blocked, detail=""):
    detail = " ".join(str(detail).split())[:300]
    print(f"{'BLOCKED' if blocked else 'OPEN'} {name} {detail}".rstrip(), flush=True)


def errname(e):
    return errno.errorcode.get(e.errno, str(e.errno)) if getattr(e, "errno", None) else type(e).__name__


def attempt(fn):
    """None when fn succeeded, else why it failed (an errno name)."""
    try:
        fn()
    except OSError as e:
        return errname(e)
    return None


def libc_errno(rc):
    return None if rc == 0 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))


def status_field(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
    return None


# ------------------------------------------------------------------ privileges
cap = status_field("CapEff")
report("capabilities-effective-zero", cap is not None and int(cap, 16) == 0, f"CapEff={cap}")
for field in ("CapPrm", "CapAmb"):
    value = status_field(field)
    report(f"capabilities-{field[3:].lower()}-zero", value is not None and int(value, 16) == 0, f"{field}={value}")
nnp = status_field("NoNewPrivs")
report("no-new-privs", nnp == "1", f"NoNewPrivs={nnp}")
report("not-root", os.getuid() != 0 and os.geteuid() != 0, f"uid={os.getuid()} euid={os.geteuid()}")

# ------------------------------------------------------------- the dataset
MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
DATASET = "/mnt/dataset"
dataset_entries = sorted(os.listdir(DATASET))
ready("dataset-is-mounted", bool(dataset_entries), f"{len(dataset_entries)} entries")
err = libc_errno(libc.mount(b"none", DATASET.encode(), None, MS_REMOUNT | MS_BIND, None))
report("dataset-remount-bind-rw", err is not None, f"mount(MS_REMOUNT|MS_BIND) -> {err or 'succeeded'}")
err = libc_errno(libc.mount(b"none", DATASET.encode(), None, MS_REMOUNT, None))
report("dataset-remount-rw", err is not None, f"mount(MS_REMOUNT) -> {err or 'succeeded'}")
err = libc_errno(libc.mount(DATASET.encode(), b"/mnt/export", None, MS_BIND, None))
report("dataset-bind-elsewhere", err is not None, f"mount(MS_BIND) -> {err or 'succeeded'}")
first = os.path.join(DATASET, dataset_entries[0]) if dataset_entries else DATASET


def write_new():
    with open(f"{DATASET}/{TAG}-written.txt", "w") as f:
        f.write("stolen")


def append_existing():
    target = next((p for p in glob.glob(f"{DATASET}/**", recursive=True) if os.path.isfile(p)), first)
    with open(target, "a") as f:
        f.write("tampered")


for name, fn in (("dataset-write-new-file", write_new),
                 ("dataset-append-existing-file", append_existing),
                 ("dataset-mkdir", lambda: os.mkdir(f"{DATASET}/{TAG}-dir")),
                 ("dataset-chmod", lambda: os.chmod(first, 0o777)),
                 ("dataset-rename", lambda: os.rename(first, first + f".{TAG}")),
                 ("dataset-unlink", lambda: os.unlink(first) if os.path.isfile(first) else os.rmdir(first)),
                 ("dataset-utime", lambda: os.utime(first, (0, 0)))):
    err = attempt(fn)
    report(name, err is not None, f"-> {err or 'succeeded'}")

# a user namespace of its own (if one can be made) gives capabilities over its
# own mounts only: the dataset's read-only flag is locked from the parent's
CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000
reader, writer = os.pipe()
child = os.fork()
if child == 0:
    os.close(reader)
    out = []
    try:
        uid, gid = os.getuid(), os.getgid()
        err = libc_errno(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS))
        out.append(f"unshare -> {err or 'ok'}")
        if err is None:
            for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"0 {uid} 1"),
                               ("/proc/self/gid_map", f"0 {gid} 1")):
                out.append(f"{os.path.basename(path)} -> {attempt(lambda p=path, t=text: open(p, 'w').write(t)) or 'ok'}")
            out.append(f"CapEff={status_field('CapEff')}")
            err = libc_errno(libc.mount(b"none", DATASET.encode(), None, MS_REMOUNT | MS_BIND, None))
            out.append(f"remount -> {err or 'succeeded'}")
        werr = attempt(lambda: open(f"{DATASET}/{TAG}-userns.txt", "w").write("stolen"))
        out.append(f"write -> {werr or 'succeeded'}")
        os.write(writer, json.dumps({"blocked": werr is not None, "detail": "; ".join(out)}).encode())
    finally:
        os._exit(0)
os.close(writer)
answer = b""
while chunk := os.read(reader, 4096):
    answer += chunk
os.waitpid(child, 0)
result = json.loads(answer or b'{"blocked": false, "detail": "child said nothing"}')
report("dataset-write-from-own-user-namespace", result["blocked"], result["detail"])

# ------------------------------------------------------ devices and mounts
host_dev = os.makedev(*CONFIG["host_root_device"])
for folder in ("/tmp", "/mnt/export", "/dev/shm"):
    node = f"{folder}/{TAG}-disk"
    err = attempt(lambda n=node: os.mknod(n, stat.S_IFBLK | 0o600, host_dev))
    detail = f"mknod {node} {CONFIG['host_root_device']} -> {err or 'succeeded'}"
    if err is None:
        merr = libc_errno(libc.mount(node.encode(), b"/mnt", b"ext4", MS_RDONLY, None))
        detail += f"; mount -> {merr or 'succeeded'}"
        attempt(lambda n=node: os.unlink(n))
    report(f"mknod-host-disk:{folder}", err is not None, detail)
err = libc_errno(libc.mount(b"tmpfs", b"/mnt", b"tmpfs", 0, None))
report("mount-tmpfs", err is not None, f"-> {err or 'succeeded'}")
err = libc_errno(libc.mount(b"proc", b"/mnt/export", b"proc", 0, None))
report("mount-proc", err is not None, f"-> {err or 'succeeded'}")
disks = [d for d in os.listdir("/dev") if d.startswith(("sd", "vd", "xvd", "nvme", "loop", "mem", "kmem", "port",
                                                         "mapper", "dm-", "hd", "mmcblk"))]
opened = []
for d in disks:
    try:
        os.close(os.open(f"/dev/{d}", os.O_RDONLY))
        opened.append(d)
    except OSError:
        pass
report("open-host-block-devices", not opened, f"in /dev: {disks}; opened: {opened}")
err = attempt(lambda: open("/proc/sysrq-trigger", "w").close())
report("proc-sysrq-trigger", err is not None, f"-> {err or 'opened'}")

# ------------------------------------------- the gateway's files and secrets
paths = ["/opt/testbed/secrets", "/opt/testbed/gateway.env", "/opt/testbed/mlflow", "/opt/testbed/redis",
         "/opt/testbed/slurm/etc/slurmdbd.conf", "/root/.ssh", "/home/m2d", "/etc/shadow", "/etc/munge/munge.key",
         "/etc/sudoers", *CONFIG["host_secret_paths"]]
paths += glob.glob("/tmp/m2d-test-*/data/gateway.db") + glob.glob("/tmp/m2d-test-*/data/**/mlflow.credentials",
                                                                  recursive=True)
HOST_FILES = CONFIG["host_file_sha256"]  # the host's own copies of files an image has too (/etc/shadow)


def read_all(path):
    with open(path, "rb") as f:
        return f.read()


for path in paths:
    files = [os.path.join(r, f) for r, _d, fs in os.walk(path) for f in fs] if os.path.isdir(path) else [path]
    got = []
    for file in files:
        if os.path.lexists(file):
            try:
                digest = hashlib.sha256(read_all(file)).hexdigest()
            except OSError:
                continue
            # a file the image has too (/etc/shadow) counts only when it is the host's
            if file not in HOST_FILES or HOST_FILES[file] == digest:
                got.append(file)
            else:
                print(f"INFO {file} is readable: the image's own, not the host's", flush=True)
    report(f"read-host-secret:{path}", not got, f"exists={os.path.lexists(path)} read={got[:3]}")
try:
    root_entries = os.listdir("/root")
except OSError as e:
    root_entries = [f"<{errname(e)}>"]
report("root-home-is-not-the-hosts", not any(TAG in e for e in root_entries), f"/root: {root_entries[:10]}")

# own PID namespace: no host process (slurmd, the gateway, redis, mlflow) is visible
procs = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            procs[pid] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        pass
HOST_WORDS = ("slurm", "redis", "mlflow", "gunicorn", "mariadb", "rq ", "jobs.", "relay.py serve", "sshd")
host_procs = [c[:60] for c in procs.values() if "relay.py shim" not in c and any(w in c for w in HOST_WORDS)]
report("host-processes-invisible", not host_procs, f"{len(procs)} processes; host ones: {host_procs}")

# ------------------------------------------------------------- the network
with open("/proc/net/dev") as f:
    interfaces = [line.split(":")[0].strip() for line in f.readlines()[2:]]
report("only-loopback-interface", interfaces == ["lo"], f"interfaces={interfaces}")
shim = urllib.parse.urlsplit(os.environ["MLFLOW_TRACKING_URI"])
shim_port = shim.port or 80


def listening_ports(table):
    ports = set()
    try:
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    except OSError:
        pass
    return ports


services = {6379: "redis", 6380: "testbed-redis", 8025: "smtp", 25: "smtp", 587: "smtp", 3306: "mariadb",
            3307: "mariadb", 5432: "postgres", 6817: "slurmctld", 6818: "slurmd", 6819: "slurmdbd", 22: "ssh",
            2024: "ssh", 5001: "mlflow", **{p: "gateway?" for p in range(5000, 5011)},
            CONFIG["gateway_port"]: "gateway", 80: "http", 443: "https"}
services.update({p: "listening-in-container" for p in listening_ports("/proc/net/tcp") | listening_ports("/proc/net/tcp6")})
targets = [("127.0.0.1", p, what) for p, what in services.items() if p != shim_port]
targets += [("::1", p, what) for p, what in services.items()]
targets += [(host, p, what) for host in CONFIG["host_addresses"] for p, what in services.items()]
targets += [("1.1.1.1", 53, "internet-dns"), ("8.8.8.8", 443, "internet-https"), ("169.254.169.254", 80, "metadata"),
            ("10.0.2.2", 80, "qemu-host"), ("172.17.0.1", 80, "docker-host")]


def connect(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        try:
            s.connect((host, port))
            return None
        except OSError as e:
            return errname(e)


for host, port, what in targets:
    err = connect(host, port)
    report(f"connect:{host}:{port}", err is not None, f"{what} -> {err or 'CONNECTED'}")
# the shim itself is the one thing on the loopback, and it speaks only to the relay
report("shim-is-the-only-listener", listening_ports("/proc/net/tcp") <= {shim_port},
       f"listening: {sorted(listening_ports('/proc/net/tcp'))}")
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    err = attempt(lambda: s.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03www\x06google\x03com\x00"
                                   b"\x00\x01\x00\x01", ("1.1.1.1", 53)))
    report("udp-out:1.1.1.1:53", err is not None, f"sendto -> {err or 'sent'}")
for name in ("pypi.org", "www.google.com"):
    try:
        found = socket.getaddrinfo(name, 443)
        report(f"dns:{name}", False, f"resolved to {sorted({a[4][0] for a in found})}")
    except OSError as e:
        report(f"dns:{name}", True, f"-> {e}")
unix_sockets = ["/run/munge/munge.socket.2", "/var/run/munge/munge.socket.2", "/run/mysqld/mysqld.sock",
                "/var/run/mysqld/mysqld.sock", "/run/redis/redis-server.sock", "/var/run/docker.sock",
                "/run/dbus/system_bus_socket", "/run/systemd/private", "/dev/log"]
unix_sockets += glob.glob("/opt/testbed/**/*.sock", recursive=True) + glob.glob("/tmp/m2d-job-*/*.sock")
for path in unix_sockets:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        err = attempt(lambda p=path: s.connect(p))
    report(f"unix-socket:{path}", err is not None, f"-> {err or 'CONNECTED'}")
with open("/proc/net/unix") as f:
    abstract = [line.split()[-1] for line in f.readlines()[1:] if line.split()[-1].startswith("@")]
report("no-host-abstract-sockets", not abstract, f"{abstract[:5]}")

# ------------------------------------------------------------- credentials
TOKENS = (re.compile(rb"[A-Za-z0-9_\-]{16,}"), re.compile(rb"[A-Za-z0-9+/=]{16,}"))


def holds_secret(data):
    return any(hashlib.sha256(t).hexdigest() in SECRET_HASHES for p in TOKENS for t in p.findall(data))


suspicious = [k for k in os.environ if re.search("PASS|TOKEN|SECRET|CREDENTIAL|AUTH|KEY", k, re.I)]
report("env-has-no-credential-names", not suspicious, f"names: {suspicious}")
report("env-has-no-mlflow-password",
       not any(holds_secret(f"{k}={v}".encode()) for k, v in os.environ.items()), f"{len(os.environ)} variables")
for key, value in sorted(os.environ.items()):
    print(f"ENVHASH {key} {hashlib.sha256(value.encode()).hexdigest()}", flush=True)
leaks = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    for part in ("environ", "cmdline"):
        try:
            data = open(f"/proc/{pid}/{part}", "rb").read()
        except OSError:
            continue
        for item in data.split(b"\0"):
            if item:
                value = item.split(b"=", 1)[-1] if part == "environ" else item
                print(f"PROCHASH {pid}/{part} {hashlib.sha256(value).hexdigest()}", flush=True)
        if holds_secret(data) or re.search(rb"MLFLOW_TRACKING_(PASSWORD|TOKEN)|M2D_SECRET|REDIS_URL", data):
            leaks.append(f"/proc/{pid}/{part}")
report("proc-has-no-credentials", not leaks, f"found in: {leaks}")
found_in = []
scanned = 0
for top in ("/run", "/code", "/tmp", "/etc", "/root", "/home", "/var", "/mnt/export", "/dev/shm", "/opt/m2d"):
    for root, _dirs, files in os.walk(top):
        for f in files:
            path = os.path.join(root, f)
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode) or os.path.getsize(path) > 2_000_000:
                    continue
                data = open(path, "rb").read()
            except OSError:
                continue
            scanned += 1
            if holds_secret(data):
                found_in.append(path)
report("files-hold-no-mlflow-password", not found_in and scanned > 0, f"{scanned} files scanned; found in {found_in}")

# ---------------------------------------------- a process that outlives the job
sleeper = CONFIG["sleeper_seconds"]
subprocess.Popen(["setsid", "sleep", sleeper], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL, start_new_session=True)
subprocess.Popen(["setsid", "sh", "-c", f"trap '' TERM HUP INT; exec sleep {sleeper}"],
                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                 start_new_session=True)
time.sleep(0.5)
running = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        if open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[:2] == [b"sleep", sleeper.encode()]:
            running.append(pid)
    except OSError:
        pass
ready("sleepers-running", len(running) == 2, f"sleep {sleeper} (one ignores SIGTERM/SIGHUP) as pids {running}")

# ------------------------------------- MLflow: raw requests to the relay
own_experiment_name = os.environ["MLFLOW_EXPERIMENT_NAME"]
# whatever auth a client sends is dropped by the relay; try an admin's anyway
FORGED = "Basic " + base64.b64encode(b"admin:admin").decode()


def call(method, path, body=None, raw=None, auth=FORGED):
    started = time.monotonic()
    conn = http.client.HTTPConnection(shim.hostname, shim_port, timeout=30)
    try:
        payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Content-Type": "application/json", "Authorization": auth}
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        return response.status, response.read(), time.monotonic() - started
    except OSError as e:
        return None, errname(e).encode(), time.monotonic() - started
    finally:
        conn.close()


def refused(name, method, path, body=None, raw=None):
    """A relay refusal: a 4xx the mlflow client does not retry, and at once."""
    status, content, seconds = call(method, path, body, raw)
    ok = status is not None and 400 <= status < 500 and status not in (408, 429) and seconds < 5
    report(name, ok, f"{method} {path[:80]} -> {status} in {seconds:.2f} s: {content[:120].decode('utf-8', 'replace')}")
    return status


API = "/api/2.0/mlflow"
status, content, _ = call("GET", f"{API}/experiments/get-by-name?experiment_name={urllib.parse.quote(own_experiment_name)}")
own_experiment = json.loads(content)["experiment"]["experiment_id"] if status == 200 else None
ready("relay-serves-own-experiment", own_experiment is not None, f"get-by-name -> {status}")
status, content, _ = call("POST", f"{API}/runs/create", {"experiment_id": own_experiment, "start_time": int(time.time() * 1000)})
own_run = json.loads(content)["run"]["info"]["run_id"] if status == 200 else "none"
print(f"INFO own experiment {own_experiment}, run {own_run}", flush=True)
other_experiment, other_run = CONFIG["other_experiment_id"], CONFIG["other_run_id"]
now = int(time.time() * 1000)
dataset = {"dataset": {"name": "clam", "digest": "d", "source_type": "local", "source": "{}",
                       "profile": "x" * 100_000}, "tags": []}

refused("raw:log-inputs", "POST", f"{API}/runs/log-inputs", {"run_id": own_run, "datasets": [dataset]})
refused("raw:log-outputs", "POST", f"{API}/runs/outputs", {"run_id": own_run, "models": []})
refused("raw:registered-model-create", "POST", f"{API}/registered-models/create",
        {"name": CONFIG["registered_model_name"], "tags": [{"key": "data", "value": "x" * 100_000}]})
refused("raw:registered-model-search", "GET", f"{API}/registered-models/search")
refused("raw:model-version-create", "POST", f"{API}/model-versions/create",
        {"name": CONFIG["registered_model_name"], "source": "/mnt/dataset"})
refused("raw:logged-model-create", "POST", f"{API}/logged-models", {"experiment_id": own_experiment, "name": TAG})
refused("raw:artifact-upload", "PUT", f"/api/2.0/mlflow-artifacts/artifacts/{own_experiment}/{own_run}/artifacts/{TAG}.txt",
        raw=b"stolen data")
refused("raw:artifact-list", "GET", f"{API}/artifacts/list?run_id={own_run}")
refused("raw:artifact-download", "GET", f"/get-artifact?run_id={own_run}&path=x")
refused("raw:artifact-proxy-list", "GET", "/api/2.0/mlflow-artifacts/artifacts")
refused("raw:oversized-param", "POST", f"{API}/runs/log-parameter", {"run_id": own_run, "key": "big", "value": "x" * 7000})
refused("raw:oversized-param-in-batch", "POST", f"{API}/runs/log-batch",
        {"run_id": own_run, "params": [{"key": "big-batch", "value": "x" * 7000}]})
refused("raw:oversized-tag", "POST", f"{API}/runs/set-tag", {"run_id": own_run, "key": "big-tag", "value": "x" * 100_000})
refused("raw:oversized-body", "POST", f"{API}/runs/log-batch", raw=b'{"run_id": "' + own_run.encode() + b'", "pad": "'
        + b"x" * 2_000_000 + b'"}')
refused("raw:other-experiment-get", "GET", f"{API}/experiments/get?experiment_id={other_experiment}")
refused("raw:other-experiment-by-name", "GET",
        f"{API}/experiments/get-by-name?experiment_name={urllib.parse.quote(CONFIG['other_experiment_name'])}")
refused("raw:other-experiment-create-run", "POST", f"{API}/runs/create", {"experiment_id": other_experiment})
refused("raw:other-run-get", "GET", f"{API}/runs/get?run_id={other_run}")
refused("raw:other-run-log-metric", "POST", f"{API}/runs/log-metric",
        {"run_id": other_run, "key": "stolen", "value": 1, "timestamp": now})
refused("raw:other-run-update", "POST", f"{API}/runs/update", {"run_id": other_run, "status": "FAILED"})
refused("raw:other-run-smuggled-beside-own", "POST", f"{API}/runs/log-batch",
        {"run_id": own_run, "run_uuid": other_run, "metrics": [{"key": "stolen", "value": 1, "timestamp": now}]})
refused("raw:experiment-create", "POST", f"{API}/experiments/create", {"name": f"{TAG}-smuggled"})
refused("raw:experiment-set-tag", "POST", f"{API}/experiments/set-experiment-tag",
        {"experiment_id": own_experiment, "key": "data", "value": "x"})
refused("raw:experiments-search", "POST", f"{API}/experiments/search", {"max_results": 100})
refused("raw:runs-search", "POST", f"{API}/runs/search", {"experiment_ids": [own_experiment, other_experiment]})
refused("raw:runs-search-ajax", "POST", "/ajax-api/2.0/mlflow/runs/search", {"experiment_ids": [other_experiment]})
refused("raw:runs-search-dotdot", "POST", f"{API}/runs/get/../search", {"experiment_ids": [other_experiment]})
refused("raw:runs-search-double-slash", "POST", "/api/2.0/mlflow//runs/search", {"experiment_ids": [other_experiment]})
refused("raw:metric-history-other-run", "GET", f"{API}/metrics/get-history?run_id={other_run}&metric_key=accuracy")
refused("raw:run-delete", "POST", f"{API}/runs/delete", {"run_id": own_run})
refused("raw:users-get", "GET", f"{API}/users/get?username=admin")
refused("raw:users-create", "POST", f"{API}/users/create", {"username": TAG, "password": TAG})
refused("raw:permissions", "POST", f"{API}/experiments/permissions/create",
        {"experiment_id": own_experiment, "username": "admin", "permission": "MANAGE"})
refused("raw:traces", "POST", "/api/3.0/mlflow/traces", {"trace": {}})
refused("raw:graphql", "POST", "/graphql", {"query": "{ mlflowSearchRuns(input: {experimentIds: [\"0\"]}) { runs { info { runId } } } }"})
refused("raw:ui-pages", "GET", "/")

# ------------------------------------- MLflow: the real client, hostile calls
os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "20"  # the client's retries stay on: a retried refusal would show
CLIENT_LIMIT = 60


def with_client(name, fn, empty_is_refusal=False):
    """BLOCKED when the mlflow client raises within CLIENT_LIMIT seconds (or, with
    empty_is_refusal, answers nothing)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn()
        except Exception as e:  # noqa: BLE001 -- any refusal counts, reported with its words
            outcome["error"] = f"{type(e).__name__}: {e}"

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(CLIENT_LIMIT)
    seconds = time.monotonic() - started
    if thread.is_alive():
        report(name, False, f"still waiting after {seconds:.0f} s (the client retries a refusal)")
    elif "error" in outcome:
        report(name, seconds < 30, f"refused in {seconds:.2f} s: {outcome['error'][:200]}")
    elif empty_is_refusal and not outcome.get("value"):
        report(name, seconds < 30, f"answered nothing in {seconds:.2f} s: {outcome.get('value')!r}")
    else:
        report(name, False, f"succeeded in {seconds:.2f} s: {str(outcome.get('value'))[:120]}")


import mlflow  # noqa: E402 -- after the fork above, and after the timeout is set
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Dataset, DatasetInput, Param  # noqa: E402

mlflow.set_experiment(own_experiment_name)
client = MlflowClient()
with mlflow.start_run() as active:
    run_id = active.info.run_id
    with_client("client:log-input", lambda: client.log_inputs(run_id, [DatasetInput(
        Dataset(name="clam", digest="d", source_type="local", source="{}", profile="x" * 100_000))]))
    with_client("client:registered-model-create", lambda: client.create_registered_model(CONFIG["registered_model_name"]))
    with_client("client:artifact-upload", lambda: mlflow.log_text("stolen data", f"{TAG}.txt"))
    # the testbed's artifact root is a host path: the client lists it locally (and finds nothing)
    with_client("client:artifact-list", lambda: client.list_artifacts(run_id), empty_is_refusal=True)
    with_client("client:oversized-param", lambda: mlflow.log_param("big-client", "x" * 7000))
    with_client("client:oversized-param-in-batch",
                lambda: client.log_batch(run_id, params=[Param("big-client-batch", "x" * 7000)]))
    with_client("client:other-experiment-get", lambda: client.get_experiment(other_experiment))
    with_client("client:other-experiment-create-run", lambda: client.create_run(other_experiment))
    with_client("client:other-run-log-metric", lambda: client.log_metric(other_run, "stolen", 1.0))
    with_client("client:other-run-get", lambda: client.get_run(other_run))
    with_client("client:search-runs", lambda: client.search_runs([own_experiment, other_experiment]))
    with_client("client:search-experiments", lambda: client.search_experiments())
    # the relay still serves an honest call after all of that
    mlflow.log_metric("probe-survived", 1.0)
print(f"INFO run {run_id} ended", flush=True)
print("DONE probe", flush=True)
