"""Builds that fit researchers' code, on the real stack: a .python-version
picks the base image, pins that need an old Python install, an unsupported
version is refused at upload, and unused images are collected."""
import os
import shutil
import time
import uuid
import zipfile
from pathlib import Path

import pytest

from gateway import images
from gateway.extensions import db
from gateway.models import Build, Submission

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
