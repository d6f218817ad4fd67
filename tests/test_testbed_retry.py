"""deploy/testbed/lib.sh's retry: a download that fails once is tried again
after a pause; one that keeps failing is named when the testbed gives up."""
import subprocess

from .helpers.stack import REPO


def retry(tmp_path, fails: int):
    """retry around a command that fails its first ``fails`` runs; its output and exit code."""
    script = (f'source {REPO}/deploy/testbed/lib.sh\n'
              f'flaky() {{ echo run >> {tmp_path}/runs; [ "$(wc -l < {tmp_path}/runs)" -gt {fails} ]; }}\n'
              'retry "pip install something" flaky && echo ok')
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "M2D_DOWNLOAD_PAUSE": "0"})


def test_a_download_that_fails_twice_passes_on_the_third_try(tmp_path):
    done = retry(tmp_path, fails=2)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
    assert (tmp_path / "runs").read_text().count("run") == 3
    assert "pip install something failed (try 2 of 3)" in done.stderr


def test_a_download_that_keeps_failing_is_named_when_given_up(tmp_path):
    done = retry(tmp_path, fails=99)
    assert done.returncode == 1 and done.stdout == ""
    assert (tmp_path / "runs").read_text().count("run") == 3
    assert "ERROR: pip install something failed for good (3 tries" in done.stderr
