"""The image builder, against a real Apptainer.

Integration tests need the testbed: run them with
    set -a; . /opt/testbed/gateway.env; set +a; python -m pytest tests/test_builder.py
They fail (never skip) when it is missing, so a green run means images were built.
"""

import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from gateway.adapters.apptainer import BuildError, ImageBuilder, PipSources, environment_key, file_digest, render_definition

TEST_ROOT = Path("/opt/testbed/tmp-tests")
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


def test_definition_installs_requirements_on_the_base(tmp_path):
    text = render_definition(base_image=Path("/opt/images/base.sif"), base_digest=BASE_DIGEST,
                             key="k" * 64, python="3.11", requirements=tmp_path / "requirements.txt",
                             timeout=1800)
    lines = [line.strip() for line in text.splitlines()]
    assert lines[0] == "Bootstrap: localimage"
    assert "From: /opt/images/base.sif" in lines
    assert f"{tmp_path / 'requirements.txt'} /opt/requirements.txt" in lines
    assert "M2D_ENVIRONMENT_KEY " + "k" * 64 in lines
    assert "pip install --no-cache-dir" in text and "-r /opt/requirements.txt" in text
    assert "export PIP_CERT=/etc/ssl/certs/ca-certificates.crt" in lines


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
    text = render_definition(base_image=Path("/b.sif"), base_digest=BASE_DIGEST, key="k" * 64, python="3.9",
                             requirements=tmp_path / "r.txt", timeout=60, pip=pip)
    assert ("--cache-dir /m2d/pip-cache --progress-bar off --index-url https://mirror.example/simple "
            "--extra-index-url file:///opt/pypi/simple --find-links /opt/wheels "
            "--find-links https://example.org/wheels --constraint /m2d/constraints.txt -r /opt/requirements.txt") in text
    assert "/etc/xdg/pip/constraints.txt /m2d/constraints.txt" in text
    for target in ("/opt/wheels", "/opt/pypi", "/m2d/pip-cache"):
        assert f'mkdir -p "${{APPTAINER_ROOTFS}}"{target}' in text
    assert "M2D_PYTHON 3.9" in text


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


@pytest.fixture
def builder(testbed, image_dir):
    return ImageBuilder(image_dir, testbed["base"], apptainer=testbed["apptainer"], timeout=600)


def test_broken_base_image_raises_build_error_with_apptainers_message(testbed, image_dir):
    broken = image_dir / "broken-base.sif"
    broken.write_bytes(b"not an image")
    builder = ImageBuilder(image_dir / "images", broken, apptainer=testbed["apptainer"])
    with pytest.raises(BuildError) as raised:
        builder.ensure("six==1.16.0")
    assert "FATAL" in raised.value.log and "image format not recognized" in str(raised.value)
    assert list(builder.image_dir.glob("*.sif")) == []


def run_in(testbed, image, code):
    done = subprocess.run([testbed["apptainer"], "exec", str(image), "python", "-c", code],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_build_installs_requirements(builder, testbed):
    env = builder.ensure("six==1.16.0\n")
    print(f"\nbuild of six==1.16.0: {env.seconds:.1f} s")
    assert env.built
    assert env.path == builder.path_for(env.key) and env.path.is_file()
    assert env.digest == file_digest(env.path)
    assert run_in(testbed, env.path, "import six; print(six.__version__)") == "1.16.0"
    # Nothing but the image (and its lock) is left in the image folder.
    assert [p.name for p in builder.image_dir.glob("*.sif")] == [env.path.name]
    assert list((builder.image_dir / ".build").iterdir()) == []


def test_second_ensure_reuses_image_without_pip(builder):
    first = builder.ensure("six==1.16.0")
    mtime = first.path.stat().st_mtime_ns
    again = builder.ensure("# same requirements, reformatted\nsix==1.16.0   \n")
    print(f"\nbuild {first.seconds:.1f} s, reuse {again.seconds * 1000:.1f} ms")
    assert first.built and not again.built
    assert (again.key, again.path, again.digest) == (first.key, first.path, first.digest)
    assert again.path.stat().st_mtime_ns == mtime
    assert again.log == ""  # no build ran: no apptainer, no pip


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


def test_pip_that_runs_past_the_timeout_is_stopped(testbed, image_dir):
    # An index that refuses connections: pip retries with back-off (about 8 s
    # in all) before giving up, far past the 2 s limit, however fast the machine.
    builder = ImageBuilder(image_dir, testbed["base"], apptainer=testbed["apptainer"], timeout=2)
    with pytest.raises(BuildError, match="did not finish within 2 seconds"):
        builder.ensure("--index-url http://127.0.0.1:9/simple\nsix==1.16.0\n")
    assert list(image_dir.glob("*.sif")) == []
