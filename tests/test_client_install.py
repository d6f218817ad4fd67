"""The researcher's whole install: `pip install` of the wheel the gateway
serves (GET /download/m2d-<version>-py3-none-any.whl), into a fresh venv with
nothing of this repository on its path, then every m2d command against the
running stack."""
import base64
import hashlib
import io
import json
import subprocess
import sys
import zipfile

import pytest
import requests

from gateway import client_wheel
from m2d.contract import __version__

from .helpers.stack import REPO, SAMPLES

WHEEL = f"m2d-{__version__}-py3-none-any.whl"


@pytest.fixture(scope="module")
def installed(stack, tmp_path_factory):
    """A venv outside the repository with m2d installed from the stack's URL alone."""
    venv = tmp_path_factory.mktemp("client") / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    done = subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q",
                           f"m2d[sample-data] @ {stack.url}/download/{WHEEL}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return venv


@pytest.fixture(scope="module")
def researcher(stack):
    return stack.researcher("installed-client", dry_run=False)


def m2d(venv, *args, cwd, env=None, timeout=180):
    """The installed command, as a researcher's shell runs it: not this clone's
    python, no PYTHONPATH, started outside the repository."""
    environment = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(cwd), "XDG_CONFIG_HOME": str(cwd / "config"),
                   "M2D_CACHE_DIR": str(cwd / "cache"), **(env or {})}
    return subprocess.run(["m2d", *map(str, args)], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_holds_m2d_alone_and_is_the_same_bytes_each_time(stack):
    served = requests.get(f"{stack.url}/download/{WHEEL}", timeout=60)
    assert served.status_code == 200
    assert served.headers["X-Content-SHA256"] == hashlib.sha256(served.content).hexdigest()
    assert served.content == client_wheel.build().data  # every worker serves one file
    names = zipfile.ZipFile(io.BytesIO(served.content)).namelist()
    assert {name.split("/")[0] for name in names} == {"m2d", f"m2d-{__version__}.dist-info"}
    assert {"m2d/contract/validation.py", "m2d/relay.py", "m2d/base.def", "m2d/samples/iris/main.py"} <= set(names)


def test_another_version_is_404_naming_the_one_served(stack):
    missing = requests.get(f"{stack.url}/download/m2d-0.0.1-py3-none-any.whl", timeout=30)
    assert missing.status_code == 404 and WHEEL in missing.text


def test_the_client_page_gives_the_install_command(stack):
    page = requests.get(f"{stack.url}/client", timeout=30)
    assert page.status_code == 200 and f"pip install {stack.url}/download/{WHEEL}" in page.text


def test_the_installed_client_imports_nothing_of_the_repository(installed, tmp_path):
    where = subprocess.run([installed / "bin" / "python", "-c",
                            "import importlib.util as u, m2d.contract, m2d.client; print(m2d.__file__); "
                            "print(u.find_spec('gateway'), u.find_spec('jobs'))"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert where.returncode == 0, where.stderr
    location, found = where.stdout.splitlines()
    assert location.startswith(str(installed)) and found == "None None"


def test_every_command_of_the_installed_client_against_the_stack(stack, installed, researcher, tmp_path):
    run = lambda *args, **kwargs: m2d(installed, *args, cwd=tmp_path, **kwargs)  # noqa: E731
    version = run("--version")
    assert version.stdout.strip() == f"m2d {__version__}"

    # offline: a dataset sample, a zip, its check, a local run (its own virtualenv)
    assert run("sample-data", "--out", tmp_path / "clam", "--cases", "2").returncode == 0
    project = tmp_path / "project"
    project.mkdir()
    (project / "requirements.txt").write_text("")
    (project / "main.py").write_text("import os\nopen('/mnt/export/seen.txt', 'w').write(str(len(os.listdir('/mnt/dataset'))))\n")
    zipped = run("zip", project, "-o", tmp_path / "project.zip")
    assert zipped.returncode == 0, zipped.stderr
    assert run("check", tmp_path / "project.zip").returncode == 0
    local = run("run", project, "--mode", "venv", "--dataset", tmp_path / "clam", "--export", tmp_path / "export",
                timeout=600)
    assert local.returncode == 0, local.stdout + local.stderr
    assert (tmp_path / "export" / "seen.txt").read_text() != "0"

    # against the gateway: login, then the iris sample to completion and its export out through the airlock
    login = run("login", "--url", stack.url, "--token", researcher.token)
    assert login.returncode == 0, login.stderr
    assert "serves m2d" not in login.stderr  # one version: no warning
    submitted = run("submit", REPO / "m2d" / "samples" / "iris", "--json")
    assert submitted.returncode == 0, submitted.stderr
    iris = json.loads(submitted.stdout)["id"]
    waited = run("wait", iris, timeout=900)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert run("status").returncode == 0 and str(iris) in run("status").stdout
    assert json.loads(run("status", iris, "--json").stdout)["status"] == "completed"
    logs = run("logs", iris)
    assert logs.returncode == 0, logs.stderr
    listing = run("export", iris, "--json")
    assert json.loads(listing.stdout)["file_count"] == 1, listing.stderr  # names: once released
    asked = run("release", iris, "--justification", "result.txt: the accuracy, for a paper", "--json")
    assert asked.returncode == 0, asked.stderr
    for name in ("installed-reviewer", "installed-reviewer-2"):  # two approvals (the default)
        reviewer = stack.researcher(name)
        stack.flask("users", "grant-reviewer", reviewer.address)
        stack.flask("releases", "approve", str(json.loads(asked.stdout)["id"]), "--reviewer", reviewer.address)
    got = run("download", iris, "result.txt", "--out", tmp_path / "result.txt")
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "result.txt").read_text() == "accuracy=1.0\n"
    assert run("provenance", iris).returncode == 0

    # a long job cancelled: wait says so and exits 1
    long = json.loads(run("submit", SAMPLES / "sleeps", "--json").stdout)["id"]
    cancelled = run("cancel", long)
    assert cancelled.returncode == 0, cancelled.stderr
    assert run("wait", long, timeout=300).returncode == 1


def test_a_client_of_another_version_is_told_which_to_install(stack, installed, researcher, tmp_path):
    """The installed m2d compared with a gateway that says another version
    (a copy of the installed client's contract, its version changed)."""
    contract = subprocess.run([installed / "bin" / "python", "-c", "import m2d.contract as c; print(c.__file__)"],
                              capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    original = open(contract).read()
    try:
        with open(contract, "w") as f:
            f.write(original.replace(f'__version__ = "{__version__}"', '__version__ = "0.0.1"'))
        # a cache of its own: the changed source has the same size, and may have the same mtime second
        done = m2d(installed, "status", cwd=tmp_path, env={"M2D_URL": stack.url, "M2D_TOKEN": researcher.token,
                                                           "PYTHONPYCACHEPREFIX": str(tmp_path / "pyc")})
    finally:
        with open(contract, "w") as f:
            f.write(original)
    assert done.returncode == 0, done.stderr
    assert f"this is m2d 0.0.1; the gateway at {stack.url} serves m2d {__version__}" in done.stderr
    assert f"pip install {stack.url}/download/{WHEEL}" in done.stderr


def test_the_wheels_record_lists_every_file_with_its_sha256():
    archive = zipfile.ZipFile(io.BytesIO(client_wheel.build().data))
    record = archive.read(f"m2d-{__version__}.dist-info/RECORD").decode().splitlines()
    listed = {line.split(",")[0]: line.split(",")[1] for line in record}
    assert set(listed) == set(archive.namelist())
    for name, digest in listed.items():
        if digest:  # RECORD's own line has none
            data = archive.read(name)
            assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    metadata = archive.read(f"m2d-{__version__}.dist-info/METADATA").decode()
    assert "Requires-Dist: requests" in metadata and 'Requires-Dist: numpy; extra == "sample-data"' in metadata
