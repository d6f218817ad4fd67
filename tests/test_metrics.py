"""/metrics: Prometheus' text format (read back with prometheus-client's own
parser), counters kept in Redis so every process adds to the same count,
answered on the loopback or to the token only."""
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from gateway import create_app

from .helpers.stack import SAMPLES, zip_folder


def samples(text):
    """{(name, frozenset(labels)): value} of every sample in a scrape."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scraped, name, **labels):
    return scraped.get((name, frozenset(labels.items())), 0)


@pytest.fixture
def metrics_app(tmp_path):
    def make(**settings):
        app = create_app({"TESTING": True, "DATA_DIR": str(tmp_path),
                          "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'gateway.db'}",
                          "REDIS_URL": "redis://127.0.0.1:1/0", **settings})
        with app.app_context():
            from gateway.extensions import db
            db.create_all()
        return app
    return make


def test_metrics_without_redis_still_show_the_databases_submissions_by_state(metrics_app):
    response = metrics_app().test_client().get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=")
    scraped = samples(response.text)
    assert value(scraped, "m2d_submissions", state="completed") == 0
    assert ("m2d_submissions", frozenset({("state", "dry_run_failed")})) in scraped


def test_metrics_answer_the_loopback_but_not_a_client_that_came_through_a_proxy(metrics_app):
    client = metrics_app().test_client()
    assert client.get("/metrics").status_code == 200
    refused = client.get("/metrics", headers={"X-Forwarded-For": "127.0.0.1"})
    assert refused.status_code == 403 and "M2D_METRICS_TOKEN" in refused.json["message"]
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "192.0.2.1"}).status_code == 403


def test_metrics_with_a_token_answer_whoever_sends_it_and_no_one_else(metrics_app):
    client = metrics_app(METRICS_TOKEN="s3cret-scrape").test_client()
    assert client.get("/metrics").status_code == 403
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.get("/metrics", headers={"Authorization": "Bearer s3cret-scrape"},
                      environ_base={"REMOTE_ADDR": "192.0.2.1"}).status_code == 200


# ------------------------------------------------------------ the real stack

def scrape(stack):
    response = requests.get(f"{stack.url}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    return samples(response.text)


# iris, and then a call the relay refuses (artifacts never leave but through the export review)
ASKS_FOR_ARTIFACTS = """
import os, urllib.error, urllib.request
try:
    urllib.request.urlopen(os.environ["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/artifacts/list", timeout=30)
except urllib.error.HTTPError as e:
    print("the relay refused:", e.code)
"""


def test_a_submission_moves_the_counters_of_every_process_it_passes_through(stack, tmp_path):
    before = scrape(stack)
    researcher = stack.researcher("metrics")
    main = (SAMPLES / "iris" / "main.py").read_text() + ASKS_FOR_ARTIFACTS
    submission_id = researcher.submit(zip_folder(SAMPLES / "iris", tmp_path / "iris.zip", {"main.py": main}))
    done = researcher.wait_until(submission_id, {"completed", "failed", "build_failed"})
    assert done["status"] == "completed", done
    researcher.wait_for_mails(submission_id, 4)
    after = scrape(stack)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    # the build workers' children: sbatch twice (the dry run, then the real job), one image
    assert moved("m2d_jobs_submitted_total", kind="dry_run") >= 1
    assert moved("m2d_jobs_submitted_total", kind="real") >= 1
    assert moved("m2d_builds_total", outcome="built") + moved("m2d_builds_total", outcome="cached") >= 1
    # the mail worker: the four status emails, and how long after each change it went
    for kind in ("received", "queued", "started", "finished"):
        assert moved("m2d_emails_sent_total", kind=kind) >= 1, kind
    assert moved("m2d_email_lag_seconds_count") >= 4
    assert value(after, "m2d_email_lag_seconds_bucket", le="+Inf") == value(after, "m2d_email_lag_seconds_count")
    # the poll worker, enqueued by the poller; what the relays beside the dry run and the job refused
    assert moved("m2d_poll_seconds_count") >= 1 and moved("m2d_poll_jobs_sum") >= 1
    assert moved("m2d_relay_refusals_total", kind="dry_run") == 1
    assert moved("m2d_relay_refusals_total", kind="real") == 1
    # the database and rq, read at the scrape
    assert value(after, "m2d_submissions", state="completed") >= 1
    assert value(after, "m2d_workers", queue="build") == 2
    assert ("m2d_queue_depth", frozenset({("queue", "mail")})) in after
    # either gunicorn worker answers the scrape with the same counts
    again = scrape(stack)
    assert value(again, "m2d_jobs_submitted_total", kind="real") == value(after, "m2d_jobs_submitted_total",
                                                                          kind="real")
