"""The MLflow runs on a submission's page (gateway/core/runs.py): the chart is the
gateway's own numbers, bounded, with job-written text escaped; links only to
runs MLflow named. The real stack's page: tests/test_mlflow_runs_page.py."""
import re

from gateway.core import runs

PUBLIC = "http://mlflow.example.org:5001"
RUN_ID = "0123456789abcdef0123456789abcdef"


def test_a_chart_is_a_polyline_of_the_finite_points_with_the_label_escaped():
    points = [[0, 1.0], [1, 0.5], [2, "NaN"], [3, float("inf")], [4, 0.25], [None, 3]]
    svg = str(runs.chart(points, "<img src=x onerror=alert(1)>"))
    assert svg.startswith('<svg class="metric-chart"') and svg.endswith("</svg>")
    assert "<img" not in svg and "&lt;img src=x onerror=alert(1)&gt;" in svg
    line = re.search(r'points="([^"]*)"', svg).group(1).split()
    assert len(line) == 3  # NaN, infinity and a point without a step are left out
    width, height = runs.CHART_SIZE
    for point in line:
        x, y = map(float, point.split(","))
        assert 0 <= x <= width and 0 <= y <= height
    assert float(line[0].split(",")[1]) < float(line[-1].split(",")[1])  # the loss falls, and so does its line (SVG y grows downwards)


def test_a_chart_draws_at_most_points_and_none_from_fewer_than_two():
    many = [[step, step * step] for step in range(runs.POINTS * 5)]
    svg = str(runs.chart(many, "loss"))
    assert len(re.search(r'points="([^"]*)"', svg).group(1).split()) == runs.POINTS
    assert runs.chart([[0, 1.0]], "x") is None and runs.chart([], "x") is None
    flat = str(runs.chart([[0, 2.0], [1, 2.0]], "flat"))  # one value: no division by zero
    assert "nan" not in flat.lower()


def _read(**run):
    return {"runs": [{"run_id": RUN_ID, "experiment_id": "12", "name": "r", "status": "FINISHED",
                      "metrics": [{"key": "loss", "value": 0.25, "step": 2}], "more_metrics": 0,
                      "history": {"loss": [[0, 1.0], [1, 0.5], [2, 0.25]]}} | run],
            "more_runs": False, "error": None}


def test_a_run_links_to_mlflows_ui_only_when_mlflow_named_it_plainly():
    shown = runs.view(_read(), {"12": "Real run", "13": "Dry run"}, PUBLIC + "/")
    run = shown["runs"][0]
    assert run["kind"] == "Real run" and run["url"] == f"{PUBLIC}/#/experiments/12/runs/{RUN_ID}"
    assert run["metrics"][0]["shown"] == "0.25" and run["metrics"][0]["chart"] is not None
    for odd in ({"run_id": "javascript:alert(1)"}, {"experiment_id": "12/../../x"}):
        assert runs.view(_read(**odd), {"12": "Real run"}, PUBLIC)["runs"][0]["url"] is None


def test_values_mlflow_cannot_draw_are_shown_as_a_dash():
    shown = runs.view(_read(metrics=[{"key": "loss", "value": None, "step": 0}]), {}, PUBLIC)
    assert shown["runs"][0]["metrics"][0]["shown"] == "—" and shown["runs"][0]["kind"] == "Run"
