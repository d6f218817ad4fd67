"""The MLflow relay's budget and number checks as units (singularity/relay.py); the
budget on the real stack, with the real mlflow client, is in tests/test_relay.py."""
import json
import threading
import time
from pathlib import Path

import pytest

from gateway.config import DEFAULTS
from gateway.core.jobscript import JobSpec, render_job_script

from .helpers.relay import RecordingUpstream
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




def test_the_batch_script_gives_the_relay_the_identifier_index_and_the_sites_per_case_limits():
    root = Path("/srv/m2d")
    spec = dict(submission_id=42, image=root / "env.sif", code_dir=root / "code", dataset_dir=root / "clam",
                export_dir=root / "export", log_dir=root / "logs", relay=root / "job" / "relay.py",
                credentials=root / "job" / "mlflow.credentials", mlflow_upstream="http://10.0.0.5:5001",
                mlflow_url="http://mlflow.example:5000", experiment_id="7", experiment_name="alice")
    script = render_job_script(JobSpec(**spec, identifiers=Path("/srv/index/v1/identifiers.json"),
                                       mlflow_flag_steps=500, mlflow_flag_keys=60, mlflow_flag_numbered_keys=7))
    assert "--identifiers /srv/index/v1/identifiers.json" in script
    assert "--flag-steps 500 --flag-keys 60" in script and "--flag-numbered-keys 7" in script
    assert "--identifiers" not in render_job_script(JobSpec(**spec))
    serve = relay_module.parse_args(["serve", "--socket", "s", "--upstream", "http://x", "--password-file", "p",
                                     "--experiment-id", "1", "--experiment-name", "e"])
    assert (serve.flag_steps, serve.flag_keys, serve.flag_numbered_keys) == (
        DEFAULTS["MLFLOW_FLAG_STEPS"], DEFAULTS["MLFLOW_FLAG_KEYS"], DEFAULTS["MLFLOW_FLAG_NUMBERED_KEYS"])


def test_a_missing_identifier_index_is_said_and_the_relay_runs_on(capsys, tmp_path):
    assert relay_module.load_identifiers(str(tmp_path / "none.json")) is None
    assert "no identifier index yet" in capsys.readouterr().err


def test_the_runs_a_relay_flagged_reach_the_submissions_provenance_for_its_reviewers(local_app):
    from gateway.core import lifecycle, provenance
    from gateway.core.storage import SubmissionFiles
    from gateway.extensions import db
    from jobs.poller import count_relay_refusals
    from tests.helpers.users import make_user

    submission = lifecycle.create(make_user("alice@example.org"), "mine.zip")
    db.session.commit()
    logs = SubmissionFiles(submission.id).logs
    logs.mkdir(parents=True)
    (logs / "slurm-7.relay.json").write_text(json.dumps(
        {"refused": 0, "undelivered": 0, "flags": {"abc123": "more than 100 metric keys that differ only in a number"}}))
    (logs / "dryrun-8.relay.json").write_text(json.dumps({"refused": 0, "undelivered": 0, "flags": {"d": "x"}}))
    count_relay_refusals(submission.id, "8", dry_run=True)  # the twin's data: nothing to flag
    count_relay_refusals(submission.id, "7", dry_run=False)
    db.session.commit()
    assert provenance.latest(submission.id, "mlflow_flagged")["runs"] == {
        "abc123": "more than 100 metric keys that differ only in a number"}


def test_a_share_under_one_call_a_second_sends_fewer_larger_batches_at_its_own_pace():
    def interval(*options):
        return relay_module.batch_interval(relay_module.parse_args(
            ["serve", "--socket", "s", "--upstream", "http://x", "--password-file", "p",
             "--experiment-id", "1", "--experiment-name", "e", *options]))
    assert interval() == 1  # the default share, 2 calls a second: a batch a second
    assert interval("--upstream-rate", "0.25") == 4  # 200 jobs sharing 50 calls a second
    assert interval("--upstream-rate", "0.25", "--flush-interval", "10") == 10


def test_what_the_job_logs_while_its_batch_waits_for_its_share_goes_out_in_that_batch():
    args = relay_module.parse_args(["serve", "--socket", "s", "--upstream", "http://m", "--password-file", "p",
                                    "--experiment-id", "7", "--experiment-name", "alice"])
    upstream, share = RecordingUpstream(), relay_module.TokenBucket(2, 1)  # a turn every 0.5 s
    relay = relay_module.Relay(upstream, "7", "alice", relay_module.RelayLimits(args),
                               relay_module.TokenBucket(1000, 1000), upstream_rate=share)

    def log(key):
        body = {"run_id": "r1", "key": key, "value": 1.0, "timestamp": 1, "step": 0}
        assert relay.handle("POST", f"{relay_module.API}/runs/log-metric", json.dumps(body).encode())[0] == 200

    relay.handle("POST", f"{relay_module.API}/runs/create", json.dumps({"experiment_id": "7"}).encode())
    assert not share.take()  # the creation took the turn there was
    log("first")
    sender = threading.Thread(target=relay.send_all)
    sender.start()
    time.sleep(0.2)  # the sender waits for the job's next turn
    log("second")
    sender.join()
    batches = [[metric["key"] for metric in body["metrics"]] for _, path, _, body in upstream.calls
               if path.endswith("/runs/log-batch")]
    assert batches == [["first", "second"]]
