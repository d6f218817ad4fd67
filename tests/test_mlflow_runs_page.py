"""The submission's page shows the MLflow runs its jobs made (gateway/core/runs.py),
on the real stack: a real job logs through the relay, the page (the stack's
app, through Flask's test client) shows the dry run's and the real run's last
values, a chart of each metric logged per step and a link into MLflow's UI,
escaped and bounded; MLflow down (a closed port, a server that never
answers) leaves the page up; the answer is cached; another researcher sees none of it."""
import re
import socket
import time

import pytest

from gateway import queue
from gateway.core import runs
from gateway.core.models import Submission, User
from gateway.extensions import db

from .helpers.stack import SAMPLES, zip_folder

HOSTILE = "<img src=x onerror=alert(1)>"
STEPS = 300  # past runs.POINTS: the chart draws a sample
EXTRAS = 40  # past runs.MAX_METRICS
MAIN = f"""
import os
import mlflow

mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
with mlflow.start_run(run_name={HOSTILE!r}):
    for step in range({STEPS}):
        mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
    mlflow.log_metrics({{f"z_extra_{{i:02d}}": i for i in range({EXTRAS})}})
    mlflow.log_metric("accuracy", 0.75)
print("logged")
"""


@pytest.fixture(scope="module")
def logged(stack, tmp_path_factory):
    researcher = stack.researcher("runs-page")
    zip_path = zip_folder(SAMPLES / "iris", tmp_path_factory.mktemp("runs") / "s.zip", extra={"main.py": MAIN})
    submission_id = researcher.submit(zip_path)
    done = researcher.wait_until(submission_id, {"completed", "failed", "dry_run_failed", "build_failed"},
                                 timeout=2400)  # the shared testbed's one node may be busy
    assert done["status"] == "completed", done
    return researcher, submission_id


def _page(app, address, submission_id):
    """The page as ``address`` sees it. In an app context of its own: the
    session's one would keep the last request's user (Flask-Login keeps it in g)."""
    user = User.query.filter_by(email=address).one()
    with app.app_context(), app.test_client() as client:
        with client.session_transaction() as session:
            session["_user_id"] = user.get_id()
            session["_fresh"] = True
        response = client.get(f"/submissions/{submission_id}")
    return response.status_code, response.get_data(as_text=True)


def _forget(app, submission_id):
    queue.connection().delete(f"{app.config['QUEUE_NAMESPACE']}-cache-mlflow-runs-{submission_id}")


def test_the_page_shows_both_runs_last_values_charts_and_links(app, logged):
    researcher, submission_id = logged
    _forget(app, submission_id)
    started = time.monotonic()
    status, page = _page(app, researcher.address, submission_id)
    assert status == 200
    print(f"first view, MLflow asked: {time.monotonic() - started:.2f} s")
    section = page[page.index('<section id="mlflow-runs"'):]
    section = section[:section.index("</section>")]
    assert "Dry run: " in section and "Real run: " in section
    # the run name the job chose is text, never markup
    assert HOSTILE not in page and "&lt;img src=x onerror=alert(1)&gt;" in section
    user = User.query.filter_by(email=researcher.address).one()
    public = app.config["MLFLOW_PUBLIC_URL"].rstrip("/")
    links = re.findall(r'href="([^"]+)">Open this run in MLflow', section)
    assert len(links) == 2
    assert {link.split("/runs/")[0] for link in links} == {
        f"{public}/#/experiments/{user.mlflow_experiment_id}", f"{public}/#/experiments/{user.mlflow_dry_run_experiment_id}"}
    # last values; the loss logged per step has its chart, of at most POINTS points
    assert section.count('<code>accuracy</code></td><td class="metric-value">0.75</td>') == 2
    assert section.count(f'<code>loss</code></td><td class="metric-value">{1.0 / STEPS:.4g}</td><td>{STEPS - 1}</td>') == 2
    charts = re.findall(r'<svg class="metric-chart".*?points="([^"]*)"', section)
    assert len(charts) == 2 and all(2 < len(line.split()) <= runs.POINTS for line in charts)
    # bounded: the first MAX_METRICS metrics by name, and a note for the rest
    shown = 2 + EXTRAS - runs.MAX_METRICS
    assert section.count(f"{shown} more metrics: see the run in MLflow.") == 2


def test_the_runs_are_cached_and_mlflow_unreachable_leaves_the_page_up(app, logged):
    researcher, submission_id = logged
    _forget(app, submission_id)
    assert "Real run: " in _page(app, researcher.address, submission_id)[1]
    url = app.config["MLFLOW_URL"]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts, never answers: the timeout
    try:
        app.config["MLFLOW_URL"] = f"http://127.0.0.1:{closed.getsockname()[1]}"
        status, page = _page(app, researcher.address, submission_id)
        assert status == 200 and "Real run: " in page  # from the cache: MLflow not asked
        for port in (closed.getsockname()[1], silent.getsockname()[1]):
            _forget(app, submission_id)
            app.config["MLFLOW_URL"] = f"http://127.0.0.1:{port}"
            started = time.monotonic()
            status, page = _page(app, researcher.address, submission_id)
            took = time.monotonic() - started
            assert status == 200 and runs.UNREACHABLE in page and "Real run: " not in page
            assert 'class="status"' in page  # the rest of the page is there
            assert took < app.config["MLFLOW_PAGE_TIMEOUT"] + 5, took
    finally:
        app.config["MLFLOW_URL"] = url
        closed.close()
        silent.close()
        _forget(app, submission_id)


def test_another_researcher_sees_neither_the_page_nor_its_runs(app, stack, logged):
    researcher, submission_id = logged
    other = stack.researcher("runs-other")
    status, page = _page(app, other.address, submission_id)
    assert status == 404 and "onerror" not in page and "Real run" not in page
    assert db.session.get(Submission, submission_id).user.email == researcher.address
