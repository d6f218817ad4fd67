"""The researcher's `m2d` command, run as a researcher runs it (python -m m2d):
checking and zipping with the platform's own rules, and running the samples
locally on a synthetic CLaM sample, in virtualenv mode and in Apptainer mode
(the testbed's Apptainer and base image: the platform's own container)."""
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from gateway import client_wheel
from m2d.client import ApiError, Client, Retry
from m2d.config import Settings
from m2d.contract import sample_data, twin
from m2d.contract.validation import Refusal, check_zip

from .helpers import zips

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "m2d" / "samples"


def m2d(*args, cwd, env=None, timeout=120):
    """Run `python -m m2d ARGS` in `cwd` with the repository importable, as from a clone."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "m2d", *map(str, args)], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def venv_cache(tmp_path_factory):
    """One virtualenv cache for the session: each set of requirements is installed
    once, by the first test that needs it."""
    return {"M2D_CACHE_DIR": str(tmp_path_factory.mktemp("m2d-cache"))}


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    dest = tmp_path_factory.mktemp("dataset") / "clam"
    sample_data.generate(dest)  # the default: the real sample's 10 cases and 46 images
    return dest


BAD_ZIPS = {
    "not_a_zip": zips.make_text_file,
    "empty_file": zips.make_empty_file,
    "tar": zips.make_tar_renamed_zip,
    "truncated": zips.make_truncated_zip,
    "too_large": lambda p: zips.make_padded_zip(p, 200 * 1024**2 + 1),
    "no_main": lambda p: zips.make_zip_without(p, "main.py"),
    "no_requirements": lambda p: zips.make_zip_without(p, "requirements.txt"),
    "empty_zip": zips.make_empty_zip,
    "nested": zips.make_nested_zip,
    "many_files": zips.make_many_files_zip,
    "absolute_path": zips.make_absolute_path_zip,
    "parent_path": zips.make_parent_path_zip,
    "symlink": zips.make_symlink_zip,
    "encrypted": zips.make_encrypted_zip,
    "unsupported_compression": zips.make_unsupported_compression_zip,
    "duplicate": zips.make_duplicate_zip,
    "huge_declared": zips.make_huge_declared_zip,
    "bomb": zips.make_zip_bomb,
    "index_url": lambda p: zips.make_requirements_zip(p, "--index-url https://evil.example/simple\n"),
    "editable": lambda p: zips.make_requirements_zip(p, "-e ./mylib\n"),
}


@pytest.mark.parametrize("make", BAD_ZIPS.values(), ids=BAD_ZIPS.keys())
def test_check_refuses_a_bad_zip_with_the_gateways_own_code_and_message(make, tmp_zip, tmp_path):
    make(tmp_zip)
    with pytest.raises(Refusal) as gateway:
        check_zip(tmp_zip)

    as_json = m2d("check", tmp_zip, "--json", cwd=tmp_path)
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout) == {"error": gateway.value.code, "message": gateway.value.message}

    as_text = m2d("check", tmp_zip, cwd=tmp_path)
    assert as_text.returncode == 1
    assert gateway.value.message in as_text.stderr


def test_check_accepts_a_good_zip_and_lists_its_requirements(tmp_zip, tmp_path):
    zips.make_zip_with_folders(tmp_zip)
    done = m2d("check", tmp_zip, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OK") and "numpy==2.3.4, mlflow-skinny" in done.stdout
    summary = json.loads(m2d("check", tmp_zip, "--json", cwd=tmp_path).stdout)
    assert summary["ok"] and summary["files"] == 7 and summary["requirements"] == ["numpy==2.3.4", "mlflow-skinny"]


def test_check_names_the_predict_entry_point_m2d_toml_declares(tmp_path):
    import zipfile
    path = tmp_path / "s.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("main.py", "def predict(export_dir, images):\n    return [0.5] * len(images)\n")
        z.writestr("requirements.txt", "")
        z.writestr("m2d.toml", '[disclosure]\npredict = "main:predict"\n')
    assert json.loads(m2d("check", path, "--json", cwd=tmp_path).stdout)["predict"] == "main:predict"
    assert "m2d.toml's predict main:predict" in m2d("check", path, cwd=tmp_path).stdout


def test_zip_puts_the_files_at_the_root_leaves_out_junk_and_passes_the_check(tmp_path):
    project = tmp_path / "my-model"
    files = {
        "main.py": "print('hi')\n", "requirements.txt": "numpy\n", "src/model.py": "", "config/a.json": "{}",
        ".python-version": "3.9\n",  # hidden, but the platform's: it picks the Python
        # never part of a submission:
        "__pycache__/main.cpython-311.pyc": "", "src/model.pyc": "", ".git/config": "", ".env": "TOKEN=x",
        ".venv/pyvenv.cfg": "", "env/pyvenv.cfg": "", "env/lib/site.py": "", ".DS_Store": "",
    }
    for name, content in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(content)

    done = m2d("zip", project, "-o", tmp_path / "out.zip", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout and "left out: .git/" in done.stdout
    with zipfile.ZipFile(tmp_path / "out.zip") as archive:
        assert sorted(archive.namelist()) == [".python-version", "config/a.json", "main.py", "requirements.txt",
                                              "src/model.py"]
    check_zip(tmp_path / "out.zip")

    # the default name comes from the folder
    assert m2d("zip", project, cwd=tmp_path).returncode == 0
    assert (tmp_path / "my-model.zip").is_file()


def test_zip_of_a_folder_without_main_py_says_what_the_gateway_would_say(tmp_path):
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "requirements.txt").write_text("")
    done = m2d("zip", tmp_path / "project", "-o", tmp_path / "out.zip", cwd=tmp_path)
    assert done.returncode == 1
    assert "no main.py at its root" in done.stderr


def test_run_quiets_gitpython_and_mlflows_telemetry_in_both_modes_as_the_platforms_jobs_do():
    from m2d import container, local

    env, _ = local._job_environment(Path("/venv/bin/python"), "mlruns", {})
    assert env["GIT_PYTHON_REFRESH"] == "quiet"
    assert "GIT_PYTHON_REFRESH=quiet" in container._environment("alice", {})
    assert env["MLFLOW_DISABLE_TELEMETRY"] == env["DO_NOT_TRACK"] == "true"
    assert {"MLFLOW_DISABLE_TELEMETRY=true", "DO_NOT_TRACK=true"} <= set(container._environment("alice", {}))


def test_run_exits_with_main_pys_code_and_binds_the_dataset_read_only(tmp_path, dataset, venv_cache):
    project = tmp_path / "probe"
    project.mkdir()
    (project / "requirements.txt").write_text("")
    (project / "main.py").write_text(
        "import os, sys\n"
        "try:\n"
        "    open('/mnt/dataset/tampered.txt', 'w')\n"
        "    verdict = 'writable'\n"
        "except OSError as e:\n"
        "    verdict = os.strerror(e.errno)\n"
        "listing = sorted(os.listdir('/mnt/dataset'))\n"
        "open('/mnt/export/probe.txt', 'w').write(f'{verdict}\\n{listing}\\n{os.getcwd()}\\n')\n"
        "sys.exit(3)\n")
    done = m2d("run", project, "--mode", "venv", "--dataset", dataset, "--export", tmp_path / "export",
               cwd=tmp_path, env=venv_cache)
    assert done.returncode == 3, done.stderr
    verdict, listing, cwd = (tmp_path / "export" / "probe.txt").read_text().splitlines()
    assert verdict == "Read-only file system"
    assert "clam-details-image.csv" in listing
    assert not (dataset / "tampered.txt").exists()
    assert cwd != str(project)  # it ran from the unpacked zip, as on the platform


def test_run_without_a_dataset_uses_the_dry_runs_twin_with_m2d_dry_run_set(tmp_path, venv_cache):
    project = tmp_path / "probe"
    project.mkdir()
    (project / "requirements.txt").write_text("")
    (project / "main.py").write_text(
        "import hashlib, os\n"
        "csv = open('/mnt/dataset/clam-details-image.csv', 'rb').read()\n"
        "open('/mnt/export/probe.txt', 'w').write(f\"{os.environ.get('M2D_DRY_RUN')}\\n{hashlib.sha256(csv).hexdigest()}\\n\")\n")
    done = m2d("run", project, "--mode", "venv", "--export", tmp_path / "export", "--json", cwd=tmp_path,
               env=venv_cache)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    cached = Path(venv_cache["M2D_CACHE_DIR"]) / "twin" / twin.DEFAULT_VERSION
    assert shown["dataset"] == str(cached) and shown["dataset_version"] == twin.DEFAULT_VERSION
    dry_run, digest = (tmp_path / "export" / "probe.txt").read_text().splitlines()
    assert dry_run == "1"
    # the twin the gateway's dry run binds (gateway.core.workflow._twin: the same call, the same parameters)
    gateways = twin.ensure(tmp_path / "gateway-twins", twin.DEFAULT_VERSION)
    assert digest == hashlib.sha256((gateways / sample_data.IMAGE_CSV).read_bytes()).hexdigest()
    assert sorted(p.relative_to(cached) for p in cached.rglob("*")) == sorted(
        p.relative_to(gateways) for p in gateways.rglob("*"))

    other = m2d("run", project, "--mode", "venv", "--export", tmp_path / "export2", "--dataset-version", "2026-03",
                cwd=tmp_path, env=venv_cache)
    assert other.returncode == 0, other.stderr
    assert (Path(venv_cache["M2D_CACHE_DIR"]) / "twin" / "2026-03").is_dir()
    refused = m2d("run", project, "--mode", "venv", "--dataset-version", "../x", cwd=tmp_path, env=venv_cache)
    assert refused.returncode == 1 and "letters, digits and" in refused.stderr


def test_run_of_the_iris_sample_logs_its_metrics_and_writes_the_export_file(tmp_path, dataset, venv_cache):
    done = m2d("run", SAMPLES / "iris", "--mode", "venv", "--dataset", dataset, "--export", tmp_path / "export",
               "--mlruns", tmp_path / "mlruns", cwd=tmp_path, env=venv_cache, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "export" / "result.txt").read_text() == "accuracy=1.0\n"
    assert logged_metrics(tmp_path / "mlruns") == {"accuracy": 1.0, "dataset-exists": 1.0}


def test_the_iris_sample_is_the_one_the_platform_tests_run():
    # one copy: the platform's tests submit the researchers' sample itself
    assert (REPO / "tests" / "samples" / "iris").resolve() == (SAMPLES / "iris").resolve()
    assert (SAMPLES / "iris" / "main.py").is_file()


def test_run_of_the_clam_sample_trains_an_epoch_and_saves_the_model(tmp_path, dataset, venv_cache):
    done = m2d("run", SAMPLES / "clam", "--mode", "venv", "--dataset", dataset, "--export", tmp_path / "export",
               "--mlruns", tmp_path / "mlruns", "--env", "EPOCHS=1", cwd=tmp_path, env=venv_cache, timeout=1500)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "export" / "model.tar").stat().st_size > 10_000_000  # 11M parameters
    metrics = logged_metrics(tmp_path / "mlruns")
    assert {"train_loss", "train_accuracy", "test_auc", "test_f1", "test_accuracy", "test_kappa"} <= set(metrics)
    assert 0 <= metrics["test_auc"] <= 1
    assert json.loads((tmp_path / "export" / "metrics.json").read_text())["test_auc"] == metrics["test_auc"]


# --- Apptainer mode, with the testbed's Apptainer, base image and MLflow ------------

# Tries what a sealed job must not do, logs one metric through the relay, leaves
# its findings in the export folder and exits 3.
SEALING_PROBE = """import errno, json, os, socket, sys
import mlflow


def attempt(action):
    try:
        action()
        return "allowed"
    except OSError as e:
        return errno.errorcode.get(e.errno, type(e).__name__)


def write_dataset():
    with open("/mnt/dataset/tampered.txt", "w") as f:
        f.write("x")


def connect(host, port):
    socket.create_connection((host, port), timeout=5).close()


found = {
    "dataset": attempt(write_dataset),
    "code": attempt(lambda: open("/code/tampered.txt", "w")),
    "internet": attempt(lambda: connect("1.1.1.1", 443)),
    "redis": attempt(lambda: connect("127.0.0.1", REDIS_PORT)),
    "interfaces": sorted(os.listdir("/sys/class/net")),
    "cwd": os.getcwd(),
    "environment": sorted(os.environ),
    "tracking_uri": os.environ["MLFLOW_TRACKING_URI"],
}
mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
with mlflow.start_run():
    mlflow.log_metric("probe", 7, step=1)
with open("/mnt/export/probe.json", "w") as f:
    json.dump(found, f)
sys.exit(3)
"""


@pytest.fixture(scope="session")
def apptainer_mode(testbed, venv_cache):
    """The environment of a researcher whose machine has Apptainer and MLflow: the
    testbed's apptainer and its MLflow server's venv on PATH, the platform's base
    image (gateway.env's M2D_BASE_IMAGE, the name m2d reads too), and a cache
    where the testbed's Apptainer wrapper can bind it (under /tmp, not /root)."""
    mlflow = Path(testbed["env"]["M2D_TESTBED_DIR"]) / "mlflow" / "venv" / "bin"
    assert (mlflow / "mlflow").is_file(), f"no {mlflow}/mlflow: is the testbed up (make test)?"
    return {**venv_cache, "PATH": f"{Path(testbed['apptainer']).parent}:{mlflow}:{os.environ['PATH']}",
            "M2D_BASE_IMAGE": str(testbed["base"])}


def redis_port():
    """The testbed's Redis, which the host reaches and a sealed job must not."""
    return urlsplit(os.environ["M2D_REDIS_URL"]).port


def test_apptainer_mode_seals_the_run_as_the_platform_does_and_relays_mlflow(tmp_path, dataset, apptainer_mode):
    project = tmp_path / "probe"
    project.mkdir()
    shutil.copy(SAMPLES / "iris" / "requirements.txt", project)  # the iris sample's image: built once
    (project / "main.py").write_text(SEALING_PROBE.replace("REDIS_PORT", str(redis_port())))
    socket.create_connection(("127.0.0.1", redis_port()), timeout=5).close()  # the host reaches it

    done = m2d("run", project, "--dataset", dataset, "--export", tmp_path / "export", "--mlruns", tmp_path / "mlruns",
               "--json", cwd=tmp_path, env=apptainer_mode, timeout=1500)
    assert done.returncode == 3, done.stdout + done.stderr
    shown = json.loads(done.stdout)
    assert shown["mode"] == "apptainer" and shown["exit_code"] == 3
    assert Path(shown["image"]).parent == Path(apptainer_mode["M2D_CACHE_DIR"]) / "images"

    found = json.loads((tmp_path / "export" / "probe.json").read_text())
    assert found["dataset"] == "EROFS" and not (dataset / "tampered.txt").exists()
    assert found["code"] == "EROFS"
    assert found["internet"] != "allowed" and found["redis"] == "ECONNREFUSED"
    assert found["interfaces"] == ["lo"]
    assert found["cwd"] == "/code"
    # --cleanenv: none of the caller's settings (the testbed's passwords among them) got in
    assert not [name for name in found["environment"] if name.startswith(("M2D_REDIS", "M2D_MLFLOW", "MLFLOW_TRACKING_P"))]
    assert found["tracking_uri"].startswith("http://127.0.0.1:")  # the shim, on the container's loopback
    # the metric crossed the relay into the local MLflow server's store
    assert logged_metrics(tmp_path / "mlruns") == {"probe": 7.0}


def test_apptainer_mode_runs_the_iris_sample_with_its_metrics_and_export_file(tmp_path, dataset, apptainer_mode):
    done = m2d("run", SAMPLES / "iris", "--mode", "apptainer", "--dataset", dataset, "--export", tmp_path / "export",
               "--mlruns", tmp_path / "mlruns", cwd=tmp_path, env=apptainer_mode, timeout=1500)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sealed as on the platform" in done.stdout and "main.py exited with 0" in done.stdout
    assert (tmp_path / "export" / "result.txt").read_text() == "accuracy=1.0\n"
    assert logged_metrics(tmp_path / "mlruns") == {"accuracy": 1.0, "dataset-exists": 1.0}


def test_apptainer_mode_without_apptainer_says_how_to_get_it_or_run_in_a_virtualenv(tmp_path):
    done = m2d("run", SAMPLES / "iris", "--mode", "apptainer", cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 1
    assert "needs `apptainer` on PATH" in done.stderr and "--mode venv" in done.stderr


def test_login_to_an_unreachable_gateway_says_so_and_stores_nothing(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    done = m2d("login", "--url", "http://127.0.0.1:9", "--token", "secret", cwd=tmp_path, env=env)
    assert done.returncode == 1
    assert "Cannot reach the gateway at http://127.0.0.1:9" in done.stderr
    assert not (tmp_path / "config").exists()


class FlakyGateway:
    """A loopback HTTP server that hangs up on the first ``drops`` requests
    without an answer (as a server closing a kept-alive connection, or one
    restarting, does), then answers each GET with a finished submission;
    counts the requests of each method."""

    def __init__(self, drops: int):
        self.drops, self.seen = drops, []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        body = json.dumps({"id": 7, "status": "completed"}).encode()
        while True:
            conn, _ = self.server.accept()
            with conn:
                method = conn.recv(65536).split(b" ", 1)[0].decode()
                self.seen.append(method)
                if len(self.seen) <= self.drops:
                    continue  # closed with no answer
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def test_a_read_that_meets_a_dropped_connection_is_asked_again_and_a_post_is_not():
    gateway = FlakyGateway(drops=2)
    client = Client(Settings(url=gateway.url, token="t"))
    assert client.submission(7)["status"] == "completed"
    assert gateway.seen == ["GET", "GET", "GET"]
    gateway = FlakyGateway(drops=1)
    with pytest.raises(ApiError) as refused:
        Client(Settings(url=gateway.url, token="t")).cancel(7)  # a cancel sent twice could act twice
    assert refused.value.code == "no_connection" and gateway.seen == ["POST"]


def test_wait_rides_out_a_gateway_it_cannot_reach_for_a_while(monkeypatch):
    monkeypatch.setattr("m2d.client.READ_RETRIES", Retry(total=0, raise_on_status=False))  # a poll, a request
    gateway = FlakyGateway(drops=6)  # six polls find no answer
    client = Client(Settings(url=gateway.url, token="t"))
    assert client.wait(7, poll_s=0.01)["status"] == "completed"
    assert len(gateway.seen) == 7


def test_wait_gives_up_on_a_gateway_unreachable_past_the_outage_limit(monkeypatch):
    monkeypatch.setattr("m2d.client.WAIT_OUTAGE_S", 0.3)
    monkeypatch.setattr("m2d.client.READ_RETRIES", Retry(total=0, raise_on_status=False))
    client = Client(Settings(url="http://127.0.0.1:9", token="t"))
    with pytest.raises(ApiError) as gone:
        client.wait(7, poll_s=0.05)
    assert gone.value.code == "no_connection"


def test_status_without_login_says_how_to_log_in(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "M2D_URL": "", "M2D_TOKEN": ""}
    done = m2d("status", cwd=tmp_path, env=env)
    assert done.returncode == 1
    assert "m2d login --url URL --token TOKEN" in done.stderr


def logged_metrics(mlruns: Path) -> dict[str, float]:
    """The last value of each metric of the one run in a local MLflow file store
    (one file per metric: 'timestamp value step' lines)."""
    runs = [p for p in mlruns.glob("*/*/metrics")]
    assert len(runs) == 1, runs
    return {p.name: float(p.read_text().splitlines()[-1].split()[1]) for p in runs[0].iterdir()}


@pytest.mark.integration  # installs packages from the index (pip's local cache and wheels here)
def test_m2d_installs_alone_into_a_fresh_venv_and_checks_with_the_gateways_rules(tmp_path, tmp_zip):
    """`pip install .` from a copy of just pyproject.toml and m2d/ gives a laptop
    m2d with the gateway's zip rules (the contract, shared, not copied), without
    Flask, SQLAlchemy or rq, and the same files as the wheel the gateway serves
    (tests/test_client_install.py installs that one)."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "pyproject.toml").write_bytes((REPO / "pyproject.toml").read_bytes())
    # links followed: base.def and relay.py are singularity/'s
    shutil.copytree(REPO / "m2d", source / "m2d", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    built = subprocess.run([venv / "bin" / "python", "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist",
                            str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("m2d-*.whl"))
    assert wheel.name == client_wheel.file_name()
    package_files = lambda names: {n for n in names if n.startswith("m2d/")}  # noqa: E731
    served = zipfile.ZipFile(io.BytesIO(client_wheel.build().data))
    assert package_files(zipfile.ZipFile(wheel).namelist()) == package_files(served.namelist())
    installed = subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", wheel],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    packages = subprocess.run([venv / "bin" / "python", "-m", "pip", "list", "--format=json"],
                              capture_output=True, text=True, check=True).stdout
    assert {p["name"].lower() for p in json.loads(packages)} & {"flask", "sqlalchemy", "rq", "redis"} == set()
    # Apptainer mode's parts, shared with the platform: its relay and its base image's definition
    shipped = subprocess.run([venv / "bin" / "python", "-c", "import m2d.container as c; "
                              "print(c.RELAY); print(c.BASE_DEFINITION.read_text())"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert shipped.returncode == 0, shipped.stderr
    relay_file, definition = shipped.stdout.split("\n", 1)
    assert Path(relay_file).read_bytes() == (REPO / "singularity" / "relay.py").read_bytes()
    assert definition.rstrip("\n") == (REPO / "singularity" / "base.def").read_text().rstrip("\n")

    zips.make_zip_without(tmp_zip, "main.py")
    with pytest.raises(Refusal) as gateway:
        check_zip(tmp_zip)
    checked = subprocess.run([venv / "bin" / "m2d", "check", tmp_zip, "--json"], cwd=tmp_path,
                             env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 1, checked.stderr
    assert json.loads(checked.stdout) == {"error": gateway.value.code, "message": gateway.value.message}
