"""Running code in a built image on the testbed, and where image tests keep their files."""
import subprocess
from pathlib import Path

TEST_ROOT = Path("/opt/testbed/tmp-tests")


def run_in(testbed, image, code):
    done = subprocess.run([testbed["apptainer"], "exec", str(image), "python", "-c", code],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()
