"""The fault matrix's one verdict (issue 11), used by every fault test: after a
fault and the recovery,

- no submission is lost: every accepted upload has its row, in a final state;
- no Slurm job is doubled: at most one job per name (<prefix>-<id>,
  <prefix>-<id>-dry), and it is the one the database recorded;
- every email went out exactly once: each owed row is sent, the SMTP sink holds
  exactly one message with its Message-ID, and nothing else;
- the emails of one submission arrived in the order they were owed;
- every submission is in the final state the test expects.

It reads the stack's database in-process, the sink's .eml files and Slurm's
own records (sacct and squeue, through the CLI adapter).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from gateway import create_app
from gateway.adapters.slurm.cli_scheduler import CliScheduler
from gateway.config import from_environment
from gateway.core.models import AccountEmail, Email, Submission
from gateway.extensions import db
from jobs.mail import message_id
from m2d.contract.states import Status

from .stack import wait_for

# the four status e-mails of a job that ran, in order (their subjects after 'Submission N: ')
STATUS_MAILS = ["code received", "queued for execution", "execution started", "execution finished"]


@dataclass
class Verdict:
    statuses: dict[int, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def __bool__(self):
        return not self.problems


def app_of(stack):
    """The stack's app, in-process, to read its database."""
    return create_app(from_environment(stack.env))


def settle(stack, expected: dict[int, str], timeout: float = 600) -> None:
    """Wait until every submission is in a final state and no email is owed."""
    def settled():
        try:
            rows = dict(db.session.query(Submission.id, Submission.status)
                        .filter(Submission.id.in_(list(expected))))
            final = all(rows.get(i) and Status(rows[i]).terminal for i in expected)
            owed = (Email.query.filter(Email.sent_at.is_(None)).count()
                    + AccountEmail.query.filter(AccountEmail.sent_at.is_(None)).count())
            return final and owed == 0
        finally:
            db.session.remove()  # each look a transaction of its own
    # one app for the whole wait, not one a second (each 30 ms of CPU, werkzeug compiling its routes)
    app = app_of(stack)
    with app.app_context():
        try:
            wait_for(settled, timeout, f"submissions {sorted(expected)} to end and every email to be sent",
                     interval=1)
        finally:
            db.engine.dispose()


def check(stack, expected: dict[int, str], *, timeout: float = 600) -> Verdict:
    """Settle, then judge: ``expected`` maps each submission the test made to
    its right final status. Raises AssertionError listing every problem."""
    settle(stack, expected, timeout)
    verdict = judge(stack, expected)
    assert verdict, "the fault left damage:\n  " + "\n  ".join(verdict.problems)
    return verdict


def judge(stack, expected: dict[int, str]) -> Verdict:
    verdict = Verdict()
    problems = verdict.problems
    app = app_of(stack)
    with app.app_context():
        try:
            rows = {s.id: s for s in Submission.query.filter(Submission.id.in_(list(expected)))}
            for sid, want in expected.items():
                row = rows.get(sid)
                if row is None:
                    problems.append(f"submission {sid} is lost: no row")
                    continue
                verdict.statuses[sid] = row.status
                if row.status != want:
                    problems.append(f"submission {sid} ended {row.status}, expected {want} "
                                    f"({row.reason}: {(row.error or '')[:300]})")
            _judge_slurm(stack, app, rows.values(), problems)
            _judge_mail(stack, problems)
        finally:
            db.session.remove()
            db.engine.dispose()
    return verdict


def _judge_slurm(stack, app, rows, problems):
    prefix = f"{app.config['SLURM_JOB_PREFIX']}-"
    # the stack's Slurm, which need not be this process's (the fault tests' cluster)
    scheduler = CliScheduler(env={"SLURM_CONF": stack.env["SLURM_CONF"]})
    jobs = {r.job_id: r.name for r in scheduler.recent(prefix)}
    jobs.update({e.job_id: e.name for e in scheduler.queue(prefix)})
    per_name = Counter(jobs.values())
    for name, count in per_name.items():
        if count > 1:
            problems.append(f"{count} Slurm jobs named {name}: "
                            f"{sorted(j for j, n in jobs.items() if n == name)}")
    for row in rows:
        for job_id, name in ((row.slurm_job_id, f"{prefix}{row.id}"), (row.dry_run_job_id, f"{prefix}{row.id}-dry")):
            made = [j for j, n in jobs.items() if n == name]
            if job_id and made and job_id not in made:
                problems.append(f"submission {row.id} recorded job {job_id} but Slurm ran {made} as {name}")
            if made and not job_id:
                problems.append(f"Slurm ran {made} as {name}, which submission {row.id} never recorded")


def _judge_mail(stack, problems):
    messages = stack.mails()
    arrived = Counter(m["Message-ID"] for m in messages)
    for mid, count in arrived.items():
        if count > 1:
            problems.append(f"{count} copies of the email {mid}")
    owed = {}
    for row in Email.query.order_by(Email.id):
        owed[message_id(row)] = row
    for row in AccountEmail.query.order_by(AccountEmail.id):
        owed[message_id(row)] = row
    for mid, row in owed.items():
        if row.sent_at is None:
            problems.append(f"email {mid} is still owed (last error: {row.last_error})")
        elif arrived[mid] == 0:
            problems.append(f"email {mid} is marked sent but the SMTP server never got it")
    for mid in arrived.keys() - owed.keys():
        problems.append(f"the SMTP server got {mid}, which nobody owed")
    # one submission's emails to one recipient, in the order they were owed
    position = {m["Message-ID"]: i for i, m in reversed(list(enumerate(messages)))}
    by_thread = {}
    for mid, row in owed.items():
        if isinstance(row, Email) and mid in position:
            by_thread.setdefault((row.submission_id, row.to_address), []).append((row.id, position[mid], row.kind))
    for (sid, to), sent in by_thread.items():
        in_owed_order = [kind for _, _, kind in sorted(sent)]
        in_arrival = [kind for _, _, kind in sorted(sent, key=lambda s: s[1])]
        if in_owed_order != in_arrival:
            problems.append(f"submission {sid}'s emails to {to} arrived as {in_arrival}, owed as {in_owed_order}")
