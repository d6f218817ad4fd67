"""Builds that fit researchers' code, on the real stack: a .python-version
picks the base image, pins that need an old Python install, an unsupported
version is refused at upload, and unused images are collected. And builds
are sealed like jobs: an sdist's setup.py reaches no service and no host but
the index, sees no process of the host and writes no cache another build
reads; a direct URL to another host is refused with a message that says so."""
import http.server
import io
import json
import os
import pwd
import shutil
import tarfile
import tempfile
import threading
import time
import uuid
import zipfile
from pathlib import Path

import pytest

from gateway import create_app
from gateway.adapters.apptainer import PROXY_PORT
from gateway.config import from_environment
from gateway.core import images
from gateway.core.models import Build, Submission
from gateway.extensions import db
from tests.helpers.stack import GATEWAY_USER, Stack

OLD_STACK = {
    "main.py": ("import sys, numpy\n"
                "line = f'python {sys.version_info[0]}.{sys.version_info[1]} numpy {numpy.__version__}'\n"
                "print(line)\n"
                "open('/mnt/export/versions.txt', 'w').write(line)\n"),
    "requirements.txt": "numpy==1.22.4\n",  # no wheel, and no build, for Python 3.11
    ".python-version": "3.9\n",
}


def make_zip(path, files):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


@pytest.fixture(scope="module")
def researcher(stack):
    return stack.researcher("builds", dry_run=False)


@pytest.fixture(scope="module")
def old_stack(app, researcher, tmp_path_factory):
    # A marker that pip and uv accept and ignore makes the requirements new
    # to the image cache, so each run builds the 3.9 image (and drops it after).
    requirements = f'numpy==1.22.4 ; os_name != "m2d-{uuid.uuid4().hex}"\n'
    zip_path = make_zip(tmp_path_factory.mktemp("py39") / "submission.zip",
                        {**OLD_STACK, "requirements.txt": requirements})
    submission_id = researcher.submit(zip_path)
    yield researcher.wait_until(submission_id, {"completed", "failed", "build_failed"})
    db.session.rollback()  # read what the workers wrote, not an old snapshot
    key = db.session.get(Submission, submission_id).env_key
    if key:
        for path in Path(os.environ["M2D_IMAGE_DIR"]).glob(f"env-{key}.sif*"):
            path.unlink()


def test_python_39_with_numpy_1_22_builds_and_runs(stack, old_stack):
    assert old_stack["status"] == "completed", old_stack
    export = stack.root / "data" / "submissions" / str(old_stack["id"]) / "export"
    assert (export / "versions.txt").read_text() == "python 3.9 numpy 1.22.4"


def test_the_testbeds_builds_install_with_uv_and_compile_the_modules(app, old_stack):
    db.session.rollback()
    build = Build.query.filter_by(submission_id=old_stack["id"]).one()
    assert "Installed 1 package" in build.log and "pip tries them" not in build.log, build.log
    assert "bytecode: " in build.log, build.log


def test_unsupported_python_is_refused_at_upload_with_the_supported_list(researcher, tmp_path):
    zip_path = make_zip(tmp_path / "submission.zip", {**OLD_STACK, ".python-version": "3.7\n"})
    response = researcher.upload(zip_path)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "unsupported_python"
    assert "Supported versions: 3.9, 3.11, 3.13" in response.json()["message"]


def test_images_unused_for_the_period_are_collected(app, old_stack, tmp_path):
    """On copies of the real image in a folder of its own (the testbed's
    folder is shared by every stack): the image of a recent submission
    stays, an unused one goes, base images are never touched."""
    key = db.session.get(Submission, old_stack["id"]).env_key
    real = os.path.join(os.environ["M2D_IMAGE_DIR"], f"env-{key}.sif")
    used, unused, base = (tmp_path / f"env-{key}.sif", tmp_path / f"env-{'0' * 64}.sif", tmp_path / "base.sif")
    for copy in (used, unused, base):
        shutil.copyfile(real, copy)
        os.utime(copy, (time.time() - 3 * 86400,) * 2)
    saved = app.config["IMAGE_DIR"]
    app.config["IMAGE_DIR"] = str(tmp_path)
    try:
        assert images.collect(dry_run=True, days=1)["images"] == [unused.name] and unused.exists()
        assert images.collect(days=1)["images"] == [unused.name]
    finally:
        app.config["IMAGE_DIR"] = saved
    assert used.exists() and base.exists() and not unused.exists()


# -- an sdist that tries every way out of its build ---------------------------

# setup.py of m2d-build-probe: each attempt prints one line, "m2d-probe: WHAT:
# blocked (why)" or "m2d-probe: WHAT: REACHED", then the build fails on purpose
# so that pip and uv show what it printed in the build's log.
PROBE_SETUP = r"""
import json, os, socket, sys, urllib.request
config = json.loads(%r)

def report(what, reached, why=""):
    print(f"m2d-probe: {what}: " + ("REACHED" if reached else f"blocked ({why})"), file=sys.stderr, flush=True)

def connect(host, port):
    try:
        socket.create_connection((host, port), timeout=3).close()
        return True, ""
    except OSError as e:
        return False, type(e).__name__

for name, port in config["services"].items():
    report(f"tcp {name} 127.0.0.1:{port}", *connect("127.0.0.1", port))
listening = [port for port in config["listening"] if connect("127.0.0.1", port)[0]]
report(f"any of the host's {len(config['listening'])} listening ports", bool(listening), "none answered")
for host, port in (("1.1.1.1", 443), ("pypi.org", 443), ("example.org", 80)):
    report(f"tcp {host}:{port} directly", *connect(host, port))
proxy = os.environ.get("https_proxy", "")
CRLF = chr(13) + chr(10)  # setuptools runs setup.py with each backslash-r-backslash-n of its text made a newline
proxy_port = int(proxy.rsplit(":", 1)[1].strip("/"))
for name in ("gateway", "mlflow", "redis"):
    target = f"127.0.0.1:{config['services'][name]}"
    try:
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=5) as tunnel:
            tunnel.sendall(f"CONNECT {target} HTTP/1.1{CRLF}Host: {target}{CRLF}{CRLF}".encode())
            status = tunnel.recv(4096).decode(errors="replace").split(CRLF, 1)[0]
        report(f"CONNECT {name} {target} through the build's proxy", " 200 " in status, status)
    except OSError as e:
        report(f"CONNECT {name} {target} through the build's proxy", False, type(e).__name__)
try:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
    opener.open(f"http://127.0.0.1:{config['services']['gateway']}/healthz", timeout=5)
    report("GET the gateway through the build's proxy", True)
except Exception as e:
    report("GET the gateway through the build's proxy", False, str(e)[:60])
pids = [name for name in os.listdir("/proc") if name.isdigit()]
commands = []
for pid in pids:
    try:
        commands.append(open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace"))
    except OSError:
        pass
seen = [word for word in ("gunicorn", "jobs.worker", "jobs.poller", "redis-server", "slurmctld", "mlflow")
        if any(word in command for command in commands)]
report(f"the host's processes ({len(pids)} pids here, seen: {','.join(seen) or 'none'})",
       len(pids) > 20 or bool(seen), "a PID namespace of its own")
for folder in ("/m2d/pip-cache", "/m2d/pip-cache/uv", *config["host_caches"]):
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "M2D-PLANTED"), "w") as f:
            f.write("a wheel another build would take")
        report(f"write {folder}", os.path.ismount(folder) or folder == "/m2d/pip-cache/uv" and
               os.path.ismount("/m2d/pip-cache"), "not the shared cache: it went to this build's own layer")
    except OSError as e:
        report(f"write {folder}", False, type(e).__name__)
sys.exit("m2d-probe: done")
"""


def listening_ports() -> list[int]:
    """TCP ports something listens on, on this host."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A":
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return sorted(ports - {PROXY_PORT})  # inside the build, that one is its own shim


def write_probe_sdist(folder: Path, config: dict) -> None:
    setup = (PROBE_SETUP % json.dumps(config)).encode()
    pyproject = b'[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
    with tarfile.open(folder / "m2d_build_probe-1.0.tar.gz", "w:gz") as sdist:
        for name, data in (("setup.py", setup), ("pyproject.toml", pyproject), ("probe.py", b"VALUE = 1\n")):
            info = tarfile.TarInfo(f"m2d_build_probe-1.0/{name}")
            info.size = len(data)
            sdist.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def probe_stack(testbed):
    """A stack whose builds find the probe sdist in a wheelhouse of the site's
    (the index is the only source a build has) and share a cache of its own."""
    folder = Path(tempfile.mkdtemp(prefix="m2d-probe-", dir="/tmp"))
    folder.chmod(0o755)
    links, cache = folder / "links", folder / "cache"
    links.mkdir(mode=0o755)
    cache.mkdir()
    shutil.chown(cache, GATEWAY_USER, GATEWAY_USER)
    stack = Stack(M2D_PIP_FIND_LINKS=f"{os.environ.get('M2D_PIP_FIND_LINKS', '')} {links}",
                  M2D_PIP_CACHE_DIR=str(cache))
    services = {"gateway": stack.port,
                "mlflow": int(os.environ["M2D_MLFLOW_URL"].rsplit(":", 1)[1].split("/")[0]),
                "redis": int(os.environ["M2D_REDIS_URL"].rsplit(":", 1)[1].split("/")[0]),
                "smtp": int(os.environ["M2D_SMTP_PORT"]), "postgresql": 5432}
    write_probe_sdist(links, {"services": services, "listening": listening_ports(),
                              "host_caches": [str(cache), str(cache / f"uid-{pwd.getpwnam(GATEWAY_USER).pw_uid}")]})
    stack.links, stack.cache = links, cache
    stack.start()
    yield stack
    stack.stop()
    shutil.rmtree(folder, ignore_errors=True)


def build_log(stack, submission_id) -> str:
    with create_app(from_environment(stack.env)).app_context():
        return Build.query.filter_by(submission_id=submission_id).one().log


def test_an_sdists_setup_py_reaches_no_service_no_host_no_process_and_no_shared_cache(probe_stack, tmp_path):
    researcher = probe_stack.researcher("prober", dry_run=False)
    # A first build fills the shared cache, as every wheels-only build does.
    requirements = f'six==1.16.0 ; os_name != "m2d-{uuid.uuid4().hex}"\n'
    first = researcher.submit(make_zip(tmp_path / "one.zip", {"main.py": "import six\n",
                                                               "requirements.txt": requirements}))
    assert researcher.wait_until(first, {"queued", "running", "completed", "failed", "build_failed"})[
        "status"] != "build_failed"
    before = sorted(path.relative_to(probe_stack.cache) for path in probe_stack.cache.rglob("*"))
    assert before, "the wheels-only build left nothing in the shared cache"

    zip_path = make_zip(tmp_path / "probe.zip", {"main.py": "import probe\n",
                                                 "requirements.txt": f"m2d-build-probe==1.0\n{requirements}"})
    submission = researcher.wait_until(researcher.submit(zip_path), {"build_failed", "queued", "completed"})
    assert submission["status"] == "build_failed", submission
    log = build_log(probe_stack, submission["id"])
    attempts = [line.split("m2d-probe: ", 1)[1] for line in log.splitlines() if "m2d-probe: " in line]
    assert any(a.startswith("tcp gateway") for a in attempts), log  # the probe ran, and its lines are here
    reached = [a for a in attempts if "REACHED" in a]
    assert reached == [], "\n".join(reached)
    for what in ("tcp gateway", "tcp mlflow", "tcp redis", "tcp smtp", "tcp postgresql", "any of the host's",
                 "tcp 1.1.1.1:443 directly", "tcp pypi.org:443 directly", "CONNECT gateway", "CONNECT mlflow",
                 "CONNECT redis", "GET the gateway",
                 "the host's processes", "write /m2d/pip-cache", f"write {probe_stack.cache}"):
        assert any(a.startswith(what) and "blocked" in a for a in attempts), (what, log)
    # nothing the sdist wrote reached the cache another build reads
    assert not list(probe_stack.cache.rglob("M2D-PLANTED"))
    after = sorted(path.relative_to(probe_stack.cache) for path in probe_stack.cache.rglob("*"))
    assert set(after) - set(before) == set(), set(after) - set(before)


class Recording(http.server.SimpleHTTPRequestHandler):
    requests: list = []

    def log_message(self, *args):
        Recording.requests.append(self.path)


def test_a_direct_url_to_a_host_other_than_the_index_fails_the_build_saying_so(probe_stack, tmp_path):
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: Recording(*a, directory=str(probe_stack.links)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host = f"127.0.0.1:{server.server_address[1]}"
    try:
        researcher = probe_stack.researcher("direct", dry_run=False)
        # https: the proxy's host rule refuses it (a plain-HTTP request is refused whatever its host)
        requirements = f"m2d-build-probe @ https://{host}/m2d_build_probe-1.0.tar.gz\n"
        zip_path = make_zip(tmp_path / "direct.zip", {"main.py": "import probe\n", "requirements.txt": requirements})
        submission = researcher.wait_until(researcher.submit(zip_path), {"build_failed", "queued", "completed"})
    finally:
        server.shutdown()
        server.server_close()
    assert submission["status"] == "build_failed", submission
    assert f"the build reached for {host}, which is not a package index of this gateway" in submission["error"]
    assert "name the package (name==version) instead of a URL" in submission["error"]
    assert Recording.requests == []
