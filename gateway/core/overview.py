"""An admin's one-screen view (``flask --app gateway status``): submissions per
state, each job the gateway thinks active next to what Slurm says of it
(squeue while slurmctld holds it, then sacct), the workers alive and the
queues' depths. A job whose two views disagree is flagged with the reason;
so is a job of ours that Slurm runs and the gateway does not count active.

The poller follows Slurm every POLL_INTERVAL seconds, so a job that just
started or ended may be flagged for one cycle; one flagged for longer is
worth a look (is the poller running? ``m2d_poll_seconds`` in /metrics).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func

from m2d.contract.states import DRY_RUN_ACTIVE, Status

from .. import queue
from ..adapters.slurm import TERMINAL_STATES, SlurmError
from ..extensions import db
from . import scheduling
from .models import Submission

# What Slurm may say of a job in each active state without anything being wrong.
WAITING = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"})
ONGOING = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SUSPENDED"})
AGREES = {Status.QUEUED: WAITING, Status.DRY_RUN_QUEUED: WAITING,
          Status.RUNNING: ONGOING, Status.DRY_RUN_RUNNING: ONGOING}
ACTIVE = tuple(AGREES)


@dataclass
class JobRow:
    submission_id: int | None
    gateway: str  # the submission's state, or "-" for a job the gateway does not know
    job_id: str
    slurm: str = "-"  # Slurm's state word
    where: str = ""  # squeue's reason or node list, or "sacct"
    elapsed: str = ""
    flag: str = ""  # why the two views disagree; empty when they agree


@dataclass
class Overview:
    by_state: dict[str, int]
    jobs: list[JobRow]
    workers: list[dict[str, str]]
    queues: dict[str, dict[str, int]]
    errors: list[str] = field(default_factory=list)

    @property
    def mismatches(self) -> int:
        return sum(1 for row in self.jobs if row.flag)


def gather(cfg: Mapping[str, Any]) -> Overview:
    counts = dict(db.session.query(Submission.status, func.count()).group_by(Submission.status).all())
    overview = Overview(by_state={s.value: counts.get(s.value, 0) for s in Status}, jobs=[], workers=[], queues={})
    overview.jobs = _jobs(cfg, overview.errors)
    try:
        _rq(overview)
    except Exception as e:  # noqa: BLE001 - Redis down: the rest of the screen still helps
        overview.errors.append(f"Redis: {e}")
    return overview


def _job_of(submission: Submission) -> str | None:
    return submission.dry_run_job_id if submission.state in DRY_RUN_ACTIVE else submission.slurm_job_id


def _jobs(cfg: Mapping[str, Any], errors: list[str]) -> list[JobRow]:
    active = (Submission.query.filter(Submission.status.in_([s.value for s in ACTIVE]))
              .order_by(Submission.id).all())
    prefix = f"{cfg['SLURM_JOB_PREFIX']}-"
    scheduler = scheduling.scheduler(cfg)
    try:
        live = {entry.job_id: entry for entry in scheduler.queue(prefix)}
        ids = [job_id for s in active if (job_id := _job_of(s)) and job_id not in live]
        recorded = scheduler.statuses(ids)
    except SlurmError as e:
        errors.append(f"Slurm: {e}")
        live, recorded = {}, {}
    rows, ours = [], set()
    for submission in active:
        job_id = _job_of(submission)
        row = JobRow(submission.id, submission.status, job_id or "-")
        if not job_id:
            row.flag = "no Slurm job recorded yet (its sbatch is under way, or the sweep retries it)"
        elif job_id in live:
            entry = live[job_id]
            row.slurm, row.where, row.elapsed = entry.state, entry.reason or entry.nodelist, entry.elapsed
        elif job_id in recorded:
            row.slurm, row.where = recorded[job_id].state, "sacct"
        if job_id and not errors:
            row.flag = _disagreement(submission.state, row.slurm)
        ours.add(job_id)
        rows.append(row)
    # Slurm runs it under our prefix, but the gateway does not count it active
    strays = [entry for job_id, entry in live.items()
              if job_id not in ours and entry.state not in TERMINAL_STATES]
    known = {s.slurm_job_id: s for s in _owners(strays)} | {s.dry_run_job_id: s for s in _owners(strays)}
    for entry in strays:
        owner = known.get(entry.job_id)
        rows.append(JobRow(owner.id if owner else None, owner.status if owner else "-", entry.job_id,
                           entry.state, entry.reason or entry.nodelist, entry.elapsed,
                           f"Slurm has it {entry.state}; the gateway has it "
                           f"{owner.status if owner else 'as no submission of its own'}"))
    return rows


def _owners(entries) -> list[Submission]:
    ids = [entry.job_id for entry in entries]
    if not ids:
        return []
    return Submission.query.filter(Submission.slurm_job_id.in_(ids) | Submission.dry_run_job_id.in_(ids)).all()


def _disagreement(state: Status, slurm_state: str) -> str:
    if slurm_state == "-":
        return "Slurm knows no such job (neither squeue nor sacct)"
    if slurm_state in AGREES[state]:
        return ""
    if slurm_state in TERMINAL_STATES:
        return f"Slurm says it ended ({slurm_state}); the poller has not recorded it"
    if slurm_state in ONGOING and state in (Status.QUEUED, Status.DRY_RUN_QUEUED):
        return "Slurm runs it; the poller has not recorded its start"
    return f"Slurm says {slurm_state}"


def _rq(overview: Overview) -> None:
    seen = {}
    for name, q in queue.all_queues().items():
        overview.queues[name] = {"waiting": q.count, "running": q.started_job_registry.count,
                                 "scheduled": q.scheduled_job_registry.count, "failed": q.failed_job_registry.count}
        for worker in queue.workers(q):
            seen.setdefault(worker.name, worker)
    for worker in seen.values():
        heartbeat = worker.last_heartbeat
        overview.workers.append({
            "name": worker.name, "queues": ",".join(q.name for q in worker.queues),
            "state": str(worker.get_state()), "heartbeat": f"{heartbeat:%H:%M:%S}" if heartbeat else "-"})


def render(overview: Overview) -> str:
    lines = ["Submissions: " + "  ".join(f"{state} {count}" for state, count in overview.by_state.items()),
             ""]
    lines.append(f"Active jobs: the gateway's view | Slurm's ({len(overview.jobs)}, "
                 f"{overview.mismatches} not agreeing)")
    table = [("", "SUBMISSION", "GATEWAY", "JOBID", "SLURM", "REASON/NODE", "ELAPSED")]
    for row in overview.jobs:
        table.append(("!" if row.flag else " ", str(row.submission_id or "-"), row.gateway, row.job_id, row.slurm,
                      row.where or "-", row.elapsed or "-"))
    widths = [max(len(cells[i]) for cells in table) for i in range(len(table[0]))]
    flags = [""] + [row.flag for row in overview.jobs]
    for cells, flag in zip(table, flags):
        text = "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()
        lines.append(f"{text}   {flag}" if flag else text)
    lines += ["", f"Workers alive: {len(overview.workers)}"]
    lines += [f"  {w['name']}  queues {w['queues']}  {w['state']}  heartbeat {w['heartbeat']}"
              for w in overview.workers]
    lines += ["", "Queues:"]
    lines += [f"  {name:<6} " + "  ".join(f"{key} {value}" for key, value in depth.items())
              for name, depth in overview.queues.items()]
    if overview.errors:
        lines += ["", *[f"ERROR {error}" for error in overview.errors]]
    return "\n".join(lines) + "\n"
