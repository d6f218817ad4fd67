"""The image builder, against a real Apptainer.

Integration tests need the testbed: run them with
    set -a; . /opt/testbed/gateway.env; set +a; python -m pytest tests/test_builder.py
They fail (never skip) when it is missing, so a green run means images were built.
"""

import io
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import uuid
import zipfile
from pathlib import Path

import pytest

from gateway.adapters.apptainer import BuildError, ImageBuilder, PipSources, environment_key, file_digest, render_install_script

from .helpers.apptainer import TEST_ROOT, run_in

BASE_DIGEST = "sha256:" + "ab" * 32


# -- keys and digests ----------------------------------------------------------

def test_environment_key_ignores_comments_blank_lines_and_trailing_whitespace():
    plain = "numpy==2.3.4\nsix==1.16.0\n"
    noisy = "# the model\nnumpy==2.3.4   \n\n  # pinned\nsix==1.16.0\t\n\n"
    assert environment_key(BASE_DIGEST, plain) == environment_key(BASE_DIGEST, noisy)


def test_environment_key_is_a_sha256_hex():
    key = environment_key(BASE_DIGEST, "six==1.16.0\n")
    assert len(key) == 64 and int(key, 16) >= 0


def test_environment_key_differs_for_other_requirements():
    assert environment_key(BASE_DIGEST, "six==1.16.0") != environment_key(BASE_DIGEST, "six==1.17.0")


def test_environment_key_keeps_requirement_order():
    assert environment_key(BASE_DIGEST, "a\nb") != environment_key(BASE_DIGEST, "b\na")


def test_environment_key_differs_for_another_base_image():
    other = "sha256:" + "cd" * 32
    assert environment_key(BASE_DIGEST, "six==1.16.0") != environment_key(other, "six==1.16.0")


def test_file_digest_is_sha256_of_the_contents(tmp_path):
    f = tmp_path / "blob"
    f.write_bytes(b"x" * (3 * 1024 * 1024 + 17))  # more than one read chunk
    import hashlib
    assert file_digest(f) == "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()
    assert file_digest(str(f)) == file_digest(f)


def test_path_for_names_the_image_by_key(tmp_path):
    builder = ImageBuilder(tmp_path, tmp_path / "base.sif")
    assert builder.path_for("abc") == tmp_path.resolve() / "env-abc.sif"


def test_key_for_uses_the_base_image_digest(tmp_path):
    base = tmp_path / "base.sif"
    base.write_bytes(b"base one")
    builder = ImageBuilder(tmp_path, base)
    first = builder.key_for("six==1.16.0")
    assert first == environment_key(file_digest(base), "six==1.16.0")
    base.write_bytes(b"base two, longer")  # a rebuilt base: new size and mtime
    assert builder.key_for("six==1.16.0") != first


def test_key_follows_a_base_symlink_that_moves(tmp_path):
    (tmp_path / "base-1.sif").write_bytes(b"first base")
    (tmp_path / "base-2.sif").write_bytes(b"second base")
    (tmp_path / "base.sif").symlink_to("base-1.sif")
    builder = ImageBuilder(tmp_path, tmp_path / "base.sif")
    first = builder.key_for("six==1.16.0")
    (tmp_path / "base.sif").unlink()
    (tmp_path / "base.sif").symlink_to("base-2.sif")
    assert builder.key_for("six==1.16.0") == environment_key(
        file_digest(tmp_path / "base-2.sif"), "six==1.16.0") != first


def test_install_script_installs_requirements_into_the_base_venv():
    text = render_install_script(base_digest=BASE_DIGEST, key="k" * 64, python="3.11", timeout=1800)
    lines = [line.strip() for line in text.splitlines()]
    assert lines[0] == "#!/bin/sh"
    assert "pip install $pip_cache ${only_wheels:+--only-binary :all:}" in text
    assert "-r /m2d/build/requirements.txt" in text and "pip_cache=--no-cache-dir" in text
    assert "export PIP_CERT=/etc/ssl/certs/ca-certificates.crt" in lines
    assert "k" * 64 in text and "> /opt/venv/m2d-environment" in text
    assert "/m2d/uv" not in text


def test_install_script_with_uv_uses_pips_sources_and_leaves_what_uv_refuses_to_pip(tmp_path):
    pip = PipSources(extra_index_urls=("file:///opt/pypi/simple",), find_links=("/opt/wheels",),
                     constraint="/etc/xdg/pip/constraints.txt", cache_dir=str(tmp_path / "cache"))
    text = render_install_script(base_digest=BASE_DIGEST, key="k" * 64, python="3.11", timeout=60, pip=pip, uv=True)
    sources = ("--extra-index-url file:///opt/pypi/simple --find-links /opt/wheels "
               "--constraint /m2d/build/constraints.txt -r /m2d/build/requirements.txt")
    assert ("/m2d/uv pip install --no-config --no-progress --python /opt/venv/bin/python "
            "$uv_cache ${only_wheels:+--no-build} --index-strategy unsafe-best-match") in text
    assert text.count(sources) == 2  # uv's and pip's
    assert "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" in text
    assert "pip tries them" in text
    assert "/opt/venv/bin/python -I /m2d/build/bytecode.py $pyc_cache" in text
    # the shared cache only where wheels alone are installed; a build from source keeps none
    assert ('    pip_cache="--cache-dir /m2d/pip-cache" uv_cache="--cache-dir /m2d/pip-cache/uv" '
            'pyc_cache="--cache /m2d/pip-cache/pyc"\nelse\n'
            '    only_wheels= pip_cache=--no-cache-dir uv_cache=--no-cache pyc_cache=\nfi') in text


def test_install_script_reaches_the_index_through_the_proxy_shim_on_the_loopback():
    text = render_install_script(base_digest=BASE_DIGEST, key="k" * 64, python="3.11", timeout=60, uv=True)
    assert ("/opt/venv/bin/python -I /m2d/build/relay.py shim --listen 127.0.0.1:3128 "
            "--socket /m2d/proxy/index.sock") in text
    assert "export http_proxy=$proxy https_proxy=$proxy HTTP_PROXY=$proxy HTTPS_PROXY=$proxy" in text


# -- failures before apptainer runs ----------------------------------------------

def test_missing_apptainer_raises_build_error(tmp_path):
    base = tmp_path / "base.sif"
    base.write_bytes(b"not really an image")
    builder = ImageBuilder(tmp_path / "images", base, apptainer="/nonexistent/apptainer")
    with pytest.raises(BuildError, match="apptainer not found"):
        builder.ensure("six==1.16.0")
    assert not builder.path_for(builder.key_for("six==1.16.0")).exists()


def test_missing_ca_bundle_raises_build_error(tmp_path):
    base = tmp_path / "base.sif"
    base.write_bytes(b"not really an image")
    builder = ImageBuilder(tmp_path / "images", base, bind_ca="/nonexistent/ca.crt")
    with pytest.raises(BuildError, match="CA bundle"):
        builder.ensure("six==1.16.0")


def test_a_uv_that_is_not_there_raises_build_error_naming_the_setting(tmp_path):
    base = tmp_path / "base.sif"
    base.write_bytes(b"not really an image")
    builder = ImageBuilder(tmp_path / "images", base, bind_ca=None, uv=str(tmp_path / "no-uv"))
    with pytest.raises(BuildError, match="no-uv.*BUILD_UV"):
        builder.ensure("six==1.16.0")


def test_missing_base_image_raises_a_build_error_naming_it(tmp_path):
    builder = ImageBuilder(tmp_path, tmp_path / "no-base.sif")
    with pytest.raises(BuildError, match="base image for Python 3.11 is missing: .*no-base.sif"):
        builder.ensure("six==1.16.0")


def test_a_python_without_a_base_image_is_refused_clearly(tmp_path):
    base = tmp_path / "base.sif"
    base.write_bytes(b"not really an image")
    builder = ImageBuilder(tmp_path / "images", base, base_images={"3.9": tmp_path / "base-3.9.sif"})
    with pytest.raises(BuildError, match=r"no base image for Python 3.13 \(it has 3.11, 3.9\)"):
        builder.ensure("six", "3.13")
    with pytest.raises(BuildError, match="Python 3.9 is missing"):
        builder.ensure("six", "3.9")


def test_the_python_version_is_part_of_the_key():
    assert environment_key(BASE_DIGEST, "six", "3.9") != environment_key(BASE_DIGEST, "six", "3.11")


def test_each_python_builds_on_its_own_base(tmp_path):
    base, old = tmp_path / "base.sif", tmp_path / "base-3.9.sif"
    base.write_bytes(b"bookworm")
    old.write_bytes(b"bullseye")
    builder = ImageBuilder(tmp_path / "images", base, base_images={"3.9": old})
    assert builder.key_for("six", "3.9") == environment_key(file_digest(old), "six", "3.9")
    assert builder.key_for("six") == environment_key(file_digest(base), "six", "3.11")


def test_site_pip_sources_reach_pip_and_local_ones_are_bound(tmp_path):
    pip = PipSources(index_url="https://mirror.example/simple", extra_index_urls=("file:///opt/pypi/simple",),
                     find_links=("/opt/wheels", "https://example.org/wheels"),
                     constraint="/etc/xdg/pip/constraints.txt", cache_dir=str(tmp_path / "cache"))
    assert pip.binds() == ["/opt/pypi", "/opt/wheels"]
    text = render_install_script(base_digest=BASE_DIGEST, key="k" * 64, python="3.9", timeout=60, pip=pip)
    assert 'pip_cache="--cache-dir /m2d/pip-cache"' in text
    assert ("--progress-bar off --index-url https://mirror.example/simple "
            "--extra-index-url file:///opt/pypi/simple --find-links /opt/wheels "
            "--find-links https://example.org/wheels --constraint /m2d/build/constraints.txt "
            "-r /m2d/build/requirements.txt") in text
    assert "3.9" in text


def test_settings_give_the_builder_its_sources():
    from gateway.config import convert
    assert convert("PIP_FIND_LINKS", "/opt/wheels, /srv/more") == ("/opt/wheels", "/srv/more")
    assert convert("BASE_IMAGES", "3.9=/i/base-3.9.sif,3.13=/i/base-3.13.sif") == {
        "3.9": "/i/base-3.9.sif", "3.13": "/i/base-3.13.sif"}


def test_collect_deletes_only_unused_unkept_environment_images(tmp_path):
    import os
    base = tmp_path / "base.sif"
    base.write_bytes(b"base")
    builder = ImageBuilder(tmp_path / "images", base)
    builder.image_dir.mkdir()
    old, kept, fresh = (builder.path_for(k * 64) for k in "abc")
    for path in (old, kept, fresh):
        path.write_bytes(b"sif")
    for path in (old, kept):
        os.utime(path, (1000, 1000))
    (builder.image_dir / "base-x.sif").write_bytes(b"a base")
    os.utime(builder.image_dir / "base-x.sif", (1000, 1000))
    assert builder.collect(cutoff=5000, keep={"b" * 64}, dry_run=True) == [old] and old.exists()
    assert builder.collect(cutoff=5000, keep={"b" * 64}) == [old]
    assert not old.exists() and kept.exists() and fresh.exists() and (builder.image_dir / "base-x.sif").exists()


# -- against the testbed's Apptainer -------------------------------------------

@pytest.fixture
def image_dir(testbed):
    # Under /opt, not pytest's /tmp: the testbed's apptainer wrapper shares a
    # host folder only if it is /tmp-like or named in the command line, and the
    # base image is named only inside the definition file.
    path = TEST_ROOT / uuid.uuid4().hex
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def uv(testbed):
    """The testbed's uv (deploy/testbed/uv.sh), which its builds install with."""
    path = os.environ.get("M2D_BUILD_UV", "")
    if not os.access(path, os.X_OK):
        pytest.fail(f"M2D_BUILD_UV={path!r} is no uv binary: is the testbed up (deploy/testbed/uv.sh)?")
    return path


@pytest.fixture
def builder(testbed, image_dir, uv):
    return ImageBuilder(image_dir, testbed["base"], apptainer=testbed["apptainer"], timeout=600, uv=uv)


@pytest.fixture
def pip_builder(testbed, image_dir):
    """A builder without uv: pip alone, as a site without BUILD_UV builds."""
    return ImageBuilder(image_dir, testbed["base"], apptainer=testbed["apptainer"], timeout=600)


def test_broken_base_image_raises_build_error_with_apptainers_message(testbed, image_dir):
    broken = image_dir / "broken-base.sif"
    broken.write_bytes(b"not an image")
    builder = ImageBuilder(image_dir / "images", broken, apptainer=testbed["apptainer"])
    with pytest.raises(BuildError) as raised:
        builder.ensure("six==1.16.0")
    assert "FATAL" in raised.value.log and "image format not recognized" in str(raised.value)
    assert list(builder.image_dir.glob("*.sif")) == []


@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_build_installs_requirements(installer, request, testbed):
    builder = request.getfixturevalue("builder" if installer == "uv" else "pip_builder")
    env = builder.ensure("six==1.16.0\n")
    print(f"\nbuild of six==1.16.0 with {installer}: {env.seconds:.1f} s")
    assert env.built
    assert ("Installed 1 package" if installer == "uv" else "Successfully installed six-1.16.0") in env.log
    assert "warning" not in env.log.lower(), env.log  # no option the installer ignores or deprecates
    assert env.path == builder.path_for(env.key) and env.path.is_file()
    assert env.digest == file_digest(env.path)
    assert run_in(testbed, env.path, "import six; print(six.__version__)") == "1.16.0"
    # compiled in the build: a job's read-only image could not keep a .pyc
    assert run_sealed(testbed, env.path, "import os, six; print(os.path.isfile(six.__cached__))") == "True"
    # Nothing but the image (and its lock) is left in the image folder.
    assert [p.name for p in builder.image_dir.glob("*.sif")] == [env.path.name]
    assert list((builder.image_dir / ".build").iterdir()) == []


def run_sealed(testbed, image, code):
    """As the job account, sealed as a job is: how the image will be used."""
    done = subprocess.run(["sudo", "-u", "m2d-job", testbed["apptainer"], "exec", "--containall", "--cleanenv",
                           "--no-privs", "--net", "--network", "none", str(image), "python", "-c", code],
                          capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_image_is_the_base_plus_one_layer_of_what_pip_wrote(builder, testbed):
    env = builder.ensure("six==1.16.0\n")
    listing = subprocess.run([testbed["apptainer"], "sif", "list", str(env.path)],
                             capture_output=True, text=True, check=True).stdout
    assert "Squashfs/*System" in listing and "Squashfs/Overlay" in listing
    assert env.path.stat().st_mode & 0o777 == 0o644  # readable by the job account
    record = run_sealed(testbed, env.path, "print(open('/opt/venv/m2d-environment').read())")
    assert f"M2D_ENVIRONMENT_KEY={env.key}" in record and "M2D_PYTHON=3.11" in record
    # the build's mount points (its own folder, wheelhouses, the pip cache) are not in the image
    assert run_sealed(testbed, env.path, "import os; print(os.path.exists('/m2d'))") == "False"


def test_a_package_the_base_has_is_replaced_whole(builder, testbed):
    # The base venv has bookworm's pip 23.0.1, whose pip/_internal/utils/distutils_args.py
    # pip 24.0 no longer ships: an upgrade must not leave the old file showing.
    env = builder.ensure("pip==24.0\n")
    code = ("import os, pip; here = os.path.dirname(pip.__file__); "
            "print(pip.__version__, os.path.exists(os.path.join(here, '_internal/utils/distutils_args.py')), "
            "sorted(n for n in os.listdir(os.path.dirname(here)) if n.startswith('pip-')))")
    assert run_sealed(testbed, env.path, code) == "24.0 False ['pip-24.0.dist-info']"
    assert run_in(testbed, env.path, code) == "24.0 False ['pip-24.0.dist-info']"


def test_a_build_whose_packages_an_earlier_build_fetched_installs_them_from_uvs_cache(testbed, image_dir, uv):
    # From PyPI through this machine's TLS proxy, which strips the caching
    # headers pip's cache needs: uv keeps the wheel by URL and hash anyway.
    pip = PipSources(cache_dir=str(image_dir / "pip-cache"))
    first, second = (ImageBuilder(image_dir / name, testbed["base"], apptainer=testbed["apptainer"], pip=pip, uv=uv)
                     .ensure(requirements) for name, requirements in
                     (("one", "six==1.16.0\ntermcolor==2.4.0\n"), ("two", "termcolor==2.4.0\n")))
    assert first.built and second.built
    assert "Prepared 2 packages" in first.log, first.log
    assert "Prepared" not in second.log and "Installed 1 package" in second.log, second.log
    assert run_sealed(testbed, second.path, "import termcolor; print(termcolor.colored('ok'))") == "ok"
    # and their .pyc files from the first build's, which a job's import takes as they are
    assert " 0 compiled" in second.log and " 0 from the cache" not in second.log, second.log
    verbose = subprocess.run(["sudo", "-u", "m2d-job", testbed["apptainer"], "exec", "--containall", "--cleanenv",
                              "--no-privs", "--net", "--network", "none", str(second.path),
                              "python", "-v", "-c", "import termcolor"], capture_output=True, text=True, timeout=120,
                             cwd="/")
    assert "code object from '/opt/venv/lib/python3.11/site-packages/termcolor/__pycache__/__init__.cpython-311.pyc'" \
        in verbose.stderr, verbose.stderr[-3000:]


def test_uv_honours_the_sites_constraints(testbed, image_dir, uv):
    constraints = image_dir / "constraints.txt"
    constraints.write_text("six==1.15.0\n")
    builder = ImageBuilder(image_dir, testbed["base"], apptainer=testbed["apptainer"], uv=uv,
                           pip=PipSources(constraint=str(constraints)))
    env = builder.ensure("six\n")
    assert "pip tries them" not in env.log, env.log
    assert run_sealed(testbed, env.path, "import six; print(six.__version__)") == "1.15.0"


def write_wheel(folder, name, version, code):
    """A pure-Python wheel of one module, ``name`` (no build needed to install it)."""
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}.py": code,
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: m2d-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)
        wheel.writestr(f"{dist}/RECORD", "".join(f"{path},,\n" for path in files) + f"{dist}/RECORD,,\n")


def test_a_pre_line_lets_uv_take_a_pre_release_as_pip_does(testbed, image_dir, uv):
    wheels = image_dir / "wheels"
    wheels.mkdir()
    for version in ("1.0", "1.1rc1"):
        write_wheel(wheels, "m2d_pre_probe", version, f"VERSION = {version!r}\n")
    builder = ImageBuilder(image_dir / "images", testbed["base"], apptainer=testbed["apptainer"], uv=uv,
                           pip=PipSources(find_links=(str(wheels),)))
    for requirements, version in (("m2d-pre-probe\n", "1.0"), ("--pre\nm2d-pre-probe\n", "1.1rc1")):
        env = builder.ensure(requirements)
        assert "pip tries them" not in env.log, env.log
        assert run_sealed(testbed, env.path, "import m2d_pre_probe as p; print(p.VERSION)") == version


def test_requirements_uv_refuses_are_installed_by_pip(testbed, image_dir):
    # a uv that refuses everything, as the real one refuses lines pip takes
    refusing = image_dir / "uv"
    refusing.write_text("#!/bin/sh\necho 'error: refused by the test'\nexit 2\n")
    refusing.chmod(0o755)
    builder = ImageBuilder(image_dir / "images", testbed["base"], apptainer=testbed["apptainer"], uv=str(refusing))
    env = builder.ensure("six==1.16.0\n")
    assert "error: refused by the test" in env.log and "pip tries them" in env.log
    assert "Successfully installed six-1.16.0" in env.log
    assert run_sealed(testbed, env.path, "import six; print(six.__version__)") == "1.16.0"


@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_a_wheel_built_from_an_sdist_is_never_kept_for_another_build(installer, testbed, image_dir, uv):
    # pip's and uv's caches would keep the wheels they build from sources,
    # keyed by where the source came from: a setup.py could plant any wheel
    # there for the next build. A build from source runs with no shared cache.
    sources = image_dir / "sources"
    sources.mkdir()
    with tarfile.open(sources / "m2d_cache_probe-1.0.tar.gz", "w:gz") as sdist:
        setup = b"from setuptools import setup\nsetup(name='m2d-cache-probe', version='1.0', py_modules=['probe'])\n"
        pyproject = b'[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        for name, data in (("setup.py", setup), ("pyproject.toml", pyproject), ("probe.py", b"VALUE = 42\n")):
            info = tarfile.TarInfo(f"m2d_cache_probe-1.0/{name}")
            info.size = len(data)
            sdist.addfile(info, io.BytesIO(data))
    pip = PipSources(find_links=(str(sources),), cache_dir=str(image_dir / "pip-cache"))
    first, second = (ImageBuilder(image_dir / name, testbed["base"], apptainer=testbed["apptainer"], pip=pip,
                                  uv=uv if installer == "uv" else "")
                     .ensure("m2d-cache-probe==1.0\n") for name in ("one", "two"))
    assert first.built and second.built
    built = "Built m2d-cache-probe" if installer == "uv" else "Building wheel for m2d-cache-probe"
    assert built in first.log, first.log
    assert built in second.log, second.log
    assert "need a build from source" in second.log, second.log
    assert run_sealed(testbed, second.path, "import probe; print(probe.VALUE)") == "42"
    assert not any("m2d_cache_probe" in path.name for path in (image_dir / "pip-cache").rglob("*"))


def test_second_ensure_reuses_image_without_pip(builder):
    first = builder.ensure("six==1.16.0")
    mtime = first.path.stat().st_mtime_ns
    again = builder.ensure("# same requirements, reformatted\nsix==1.16.0   \n")
    print(f"\nbuild {first.seconds:.1f} s, reuse {again.seconds * 1000:.1f} ms")
    assert first.built and not again.built
    assert (again.key, again.path, again.digest) == (first.key, first.path, first.digest)
    assert again.path.stat().st_mtime_ns == mtime
    assert again.log == ""  # no build ran: no apptainer, no pip


def test_a_lock_file_root_made_does_not_lock_the_gateway_account_out(testbed, image_dir):
    # A build run by an admin as root leaves a root-owned 0644 lock file behind;
    # the gateway's account (m2d) must still take that key's lock.
    builder = ImageBuilder(image_dir, testbed["base"])
    with builder._lock("k" * 64):
        pass
    shutil.chown(image_dir, "m2d", "m2d")
    shutil.chown(image_dir / "locks", "m2d", "m2d")
    assert (image_dir / "locks" / f"{'k' * 64}.lock").stat().st_uid == 0
    code = (f"from gateway.adapters.apptainer import ImageBuilder\n"
            f"with ImageBuilder({str(image_dir)!r}, {str(testbed['base'])!r})._lock({'k' * 64!r}): print('locked')")
    done = subprocess.run(["setpriv", "--reuid=m2d", "--regid=m2d", "--init-groups", "--", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout.strip() == "locked", done.stderr


def test_folders_root_makes_in_the_store_go_to_its_owner(testbed, image_dir):
    # A test or an admin's command as root made the store's first lock: the
    # locks folder was root's 0755 and every later build of the gateway's
    # account failed with EACCES on a new key's lock file.
    shutil.chown(image_dir, "m2d", "m2d")
    with ImageBuilder(image_dir, testbed["base"])._lock("r" * 64):
        pass
    assert {path.owner() for path in (image_dir / "locks", image_dir / "locks" / f"{'r' * 64}.lock")} == {"m2d"}
    code = (f"from gateway.adapters.apptainer import ImageBuilder\n"
            f"with ImageBuilder({str(image_dir)!r}, {str(testbed['base'])!r})._lock({'n' * 64!r}): print('locked')")
    done = subprocess.run(["setpriv", "--reuid=m2d", "--regid=m2d", "--init-groups", "--", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout.strip() == "locked", done.stderr


def test_concurrent_ensure_builds_once(builder):
    start = threading.Barrier(2)
    results, errors = [], []

    def submit():
        start.wait()
        try:
            results.append(builder.ensure("six==1.15.0"))
        except Exception as e:  # surfaced below, with the thread's error
            errors.append(e)

    threads = [threading.Thread(target=submit) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not errors, errors
    assert sorted(r.built for r in results) == [False, True]
    assert len({(r.path, r.digest) for r in results}) == 1
    print("\nconcurrent: " + ", ".join(f"built={r.built} {r.seconds:.1f} s" for r in results))


def test_missing_package_raises_build_error_with_pips_message(builder):
    requirements = "nosuchpackage-m2d-xyz==1.0\n"
    started = time.monotonic()
    with pytest.raises(BuildError) as raised:
        builder.ensure(requirements)
    error = raised.value
    print(f"\nfailed build: {time.monotonic() - started:.1f} s")
    assert "No matching distribution found for nosuchpackage-m2d-xyz" in error.log
    assert "No matching distribution found" in str(error)
    assert len(error.log.encode()) <= 8 * 1024 and len(error.log.splitlines()) <= 60
    assert not builder.path_for(builder.key_for(requirements)).exists()
    assert list(builder.image_dir.glob("*.sif")) == []
    assert list((builder.image_dir / ".build").iterdir()) == []


@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_an_install_that_runs_past_the_timeout_is_stopped(installer, testbed, image_dir, uv):
    # An index the build may reach that never answers (it listens, and never
    # accepts): pip and uv wait far past the 2 s limit, however fast the machine.
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    builder = ImageBuilder(image_dir, testbed["base"], apptainer=testbed["apptainer"], timeout=2,
                           uv=uv if installer == "uv" else "", index_hosts=(f"127.0.0.1:{port}",))
    with silent, pytest.raises(BuildError, match="did not finish within 2 seconds"):
        builder.ensure(f"--index-url https://127.0.0.1:{port}/simple\nsix==1.16.0\n")
    assert list(image_dir.glob("*.sif")) == []
