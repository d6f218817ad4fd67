"""A full disk under the image folder (a tmpfs of a few MB), against the real
Apptainer: the build fails saying so, leaves no image at its path (a reader
never finds half an image), and once there is room the same key builds whole.
A full export folder: tests/test_faults.py."""
import shutil
import subprocess
import uuid

import pytest

from gateway.adapters.apptainer import ImageBuilder, NoSpace, file_digest

from .helpers.apptainer import TEST_ROOT, run_in


@pytest.fixture
def small_image_dir(testbed):
    # under /opt, as test_apptainer's image_dir (the apptainer wrapper's sharing)
    root = TEST_ROOT / uuid.uuid4().hex
    images = root / "images"
    images.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "m2d-test-full", str(images)], check=True)
    try:
        yield images
    finally:
        subprocess.run(["umount", str(images)], check=True)
        shutil.rmtree(root, ignore_errors=True)


def test_a_full_image_folder_fails_clearly_and_leaves_no_image_to_reuse(testbed, small_image_dir):
    builder = ImageBuilder(small_image_dir, testbed["base"], apptainer=testbed["apptainer"], timeout=600)
    with pytest.raises(NoSpace) as raised:
        builder.ensure("six==1.16.0\n")
    assert "no space left" in str(raised.value) and str(small_image_dir) in str(raised.value)
    assert list(small_image_dir.glob("env-*.sif")) == []
    assert list((small_image_dir / ".build").iterdir()) == []  # the partial image went with its folder

    subprocess.run(["mount", "-o", "remount,size=1g", str(small_image_dir)], check=True)  # an admin made room
    image = builder.ensure("six==1.16.0\n")
    assert image.built and image.digest == file_digest(image.path)
    assert run_in(testbed, image.path, "import six; print(six.__version__)") == "1.16.0"
