"""The MLflow relay's budget and number checks as units (singularity/relay.py); the
budget on the real stack, with the real mlflow client, is in tests/test_relay.py."""
from pathlib import Path

import pytest

from gateway.config import DEFAULTS
from gateway.core.jobscript import JobSpec, render_job_script

from .helpers.relay import relay as relay_module


def test_the_gateways_defaults_are_the_relays_so_m2d_run_enforces_the_same_budget():
    serve = relay_module.parse_args(["serve", "--socket", "s", "--upstream", "http://x", "--password-file", "p",
                                     "--experiment-id", "1", "--experiment-name", "e"])
    assert (serve.text_budget, serve.metric_budget) == (DEFAULTS["MLFLOW_TEXT_BUDGET"],
                                                        DEFAULTS["MLFLOW_METRIC_BUDGET"]) == (1_000_000, 100_000)
    assert serve.upstream_rate == DEFAULTS["MLFLOW_CALLS_PER_SECOND"] / DEFAULTS["MLFLOW_JOBS_AT_ONCE"]


def test_the_batch_script_gives_the_relay_the_sites_budget_and_its_share_of_mlflow():
    root = Path("/srv/m2d")
    script = render_job_script(JobSpec(
        submission_id=42, image=root / "env.sif", code_dir=root / "code", dataset_dir=root / "clam",
        export_dir=root / "export", log_dir=root / "logs", relay=root / "job" / "relay.py",
        credentials=root / "job" / "mlflow.credentials", mlflow_upstream="http://10.0.0.5:5001",
        mlflow_url="http://mlflow.example:5000", experiment_id="7", experiment_name="alice",
        mlflow_text_budget=5000, mlflow_metric_budget=70, mlflow_upstream_rate=0.5))
    assert "--text-budget 5000 --metric-budget 70" in script and "--upstream-rate 0.5" in script


def test_numbers_are_checked_as_mlflow_checks_them():
    check_integer, check_double = relay_module.check_integer, relay_module.check_double
    assert check_integer("t", 0, minimum=0) == 0 and check_integer("t", "1700000000000", minimum=0) == 1700000000000
    assert check_integer("s", -(2**63)) == -(2**63) and check_integer("s", 2**63 - 1) == 2**63 - 1
    for bad, minimum in ((-1, 0), ("-1", 0), (2**63, -(2**63)), (1.5, 0), (True, 0), ("1_000", 0), (" 5", 0)):
        with pytest.raises(relay_module.Refused):
            check_integer("t", bad, minimum=minimum)
    assert check_double("v", 0.1) == 0.1 and check_double("v", 10**300) == 1e300 and check_double("v", "2.5") == 2.5
    assert [check_double("v", v) for v in ("NaN", "Infinity", "-Infinity", 1e309)] == ["NaN", "Infinity",
                                                                                        "-Infinity", "Infinity"]
    for bad in ("nan", 10**400, None, "x", [1]):
        with pytest.raises(relay_module.Refused):
            check_double("v", bad)


