"""Parsing squeue's and sacct's answers for the admins' cluster view and the
queue position on a submission's page (no Slurm needed)."""
import pytest

from gateway.adapters.slurm import queue_position
from gateway.adapters.slurm.cli_scheduler import parse_sacct_records, parse_squeue

SQUEUE = """\
41|m2d-7|RUNNING|None|1:02|vm|4294901700
42|m2d-8|PENDING|Resources||(null)|4294901699
43|other|job|PENDING|Priority|0:00||4294901800
44|m2d-9|PENDING|Priority|0:00||4294901699
"""


def test_squeue_rows_become_values_even_when_a_name_holds_the_separator():
    entries = parse_squeue(SQUEUE)
    assert [e.job_id for e in entries] == ["41", "42", "43", "44"]
    running = entries[0]
    assert (running.name, running.state, running.reason, running.elapsed, running.nodelist) == \
        ("m2d-7", "RUNNING", "None", "1:02", "vm")
    assert entries[2].name == "other|job" and entries[2].priority == 4294901800


def test_queue_position_orders_pending_jobs_by_priority_then_age():
    entries = parse_squeue(SQUEUE)
    assert queue_position(entries, "43") == 1  # highest priority
    assert queue_position(entries, "42") == 2
    assert queue_position(entries, "44") == 3  # same priority, younger
    assert queue_position(entries, "41") is None  # running


def test_an_unreadable_squeue_line_is_an_error():
    with pytest.raises(ValueError):
        parse_squeue("not a job line")


def test_sacct_records_newest_first():
    text = ("9|m2d-1|COMPLETED|0:0|00:00:05|2026-12-01T10:00:00|2026-12-01T10:00:05|vm\n"
            "12|m2d-2|CANCELLED by 0|0:15|00:00:02|2026-12-01T10:01:00|2026-12-01T10:01:02|vm\n")
    records = parse_sacct_records(text)
    assert [r.job_id for r in records] == ["12", "9"]
    assert records[0].state == "CANCELLED by 0" and records[0].exit_code == "0:15"
    assert records[1].start == "2026-12-01T10:00:00" and records[1].nodelist == "vm"


def test_a_submission_page_asks_squeue_once_per_queue_view_period(local_app, monkeypatch):
    """The live submission page polls every few seconds per viewer: squeue runs
    once per QUEUE_VIEW_SECONDS for them all (per process), not once per view."""
    from gateway.core import scheduling

    asked, now = [], [1000.0]

    class Scheduler:
        def queue(self):
            asked.append(now[0])
            return parse_squeue(SQUEUE)

    monkeypatch.setattr(scheduling, "scheduler", lambda: Scheduler())
    monkeypatch.setattr(scheduling.time, "monotonic", lambda: now[0])
    with local_app.app_context():
        assert [e.job_id for e in scheduling.queue_view()] == ["41", "42", "43", "44"]
        now[0] += scheduling.QUEUE_VIEW_SECONDS - 1
        scheduling.queue_view()
        assert asked == [1000.0]
        now[0] += 2
        scheduling.queue_view()
        assert len(asked) == 2
