"""A failed job's headline and what to change (gateway/core/failures.py), on real
stderr: mlflow-skinny 2.11.3 and 3.17.2 clients and Pythons 3.9 and 3.11, as
captured (tests/data/tracebacks), and inside a dry run's log as the poller
stores it (stdout, then stderr, the relay's lines after the traceback)."""
from pathlib import Path

import pytest

from gateway.core.failures import HEADLINE_MAX, headline, hint

TRACEBACKS = Path(__file__).parent / "data" / "tracebacks"
URL = "http://mlflow.example.org:5001"


def stderr(name):
    return (TRACEBACKS / name).read_text()


def dry_run_log(err, out="epoch 1 done\n"):
    """The shape jobs.poller.dry_run_log gives: both streams, then the relay's last words."""
    return (f"---- stdout (m2d-7-dry-41.out)\n{out.rstrip()}\n---- stderr (m2d-7-dry-41.err)\n{err.rstrip()}\n"
            "relay[812] 04:22:41 refused GET /api/2.0/mlflow/experiments/get-by-name: 403 PERMISSION_DENIED: x\n"
            "relay[812] 04:22:42 stopped; 1 calls refused\n")


def test_the_exception_after_gitpythons_fifteen_line_warning_is_the_headline():
    err = stderr("gitpython-warning-then-valueerror-mlflow-2.11.3.txt")
    assert "Bad git executable" in err and "export GIT_PYTHON_REFRESH=quiet" in err
    expected = "ValueError: Only one class present in y_true. ROC AUC score is not defined in that case."
    assert headline(err) == expected
    assert headline(dry_run_log(err)) == expected
    assert hint(expected, URL) is None  # the code's own failure: nothing about the platform to change


def test_a_chained_exception_gives_the_last_one():
    assert headline(stderr("chained-python-3.9.txt")) == "RuntimeError: no config at /mnt/export/config.json"


@pytest.mark.parametrize("client", ["2.11.3", "3.17.2"])
def test_a_relay_refusal_of_the_experiment_says_to_leave_the_experiment_to_the_platform(client):
    line = headline(dry_run_log(stderr(f"relay-refusal-mlflow-{client}.txt")))
    assert line.startswith("mlflow.exceptions.RestException: PERMISSION_DENIED: only your own experiment")
    assert "MLFLOW_EXPERIMENT_NAME" in hint(line, URL) and "set_experiment" in hint(line, URL)


@pytest.mark.parametrize("client", ["2.11.3", "3.17.2"])
def test_an_unreachable_tracking_url_says_which_url_the_job_has(client):
    line = headline(dry_run_log(stderr(f"unreachable-url-mlflow-{client}.txt")))
    assert line.startswith("mlflow.exceptions.MlflowException: API request to http://mlflow.hospital.example:5000/")
    said = hint(line, URL)
    assert "http://mlflow.hospital.example:5000," in said and URL in said and "MLFLOW_TRACKING_URI" in said


@pytest.mark.parametrize("client", ["2.11.3", "3.17.2"])
def test_mlflow_refusing_the_codes_own_login_says_to_leave_it_to_the_platform(client):
    line = headline(stderr(f"bad-credentials-mlflow-{client}.txt"))
    assert "401" in line
    assert "MLFLOW_TRACKING_PASSWORD" in hint(line, URL)


def test_no_traceback_no_headline_and_a_long_line_is_cut():
    assert headline(None) is None and headline("") is None
    assert headline(dry_run_log("Killed", out="")) is None
    assert headline("---- stderr\nthe git executable: Error: Failed to initialize\n") is None
    long = "Traceback (most recent call last):\n  File \"/code/main.py\", line 1\nValueError: " + "x" * 5000
    assert len(headline(long)) == HEADLINE_MAX and headline(long).endswith("...")
    assert hint(None, URL) is None


def test_only_a_refusal_about_the_experiment_says_to_leave_the_experiment_alone():
    """Every relay refusal lists what it allows, experiments included: an
    artifact refused is not an experiment named wrongly (the relay's own words)."""
    from .helpers.relay import relay

    def raised(why):
        refusal = relay.denied(why)
        return f"mlflow.exceptions.RestException: {refusal.error_code}: {refusal.message}"

    assert hint(raised("POST /api/2.0/mlflow-artifacts/artifacts/x is not allowed"), URL) is None
    assert "MLFLOW_EXPERIMENT_NAME" in hint(raised("only your own experiment ('alice-dryrun') can be read"), URL)
