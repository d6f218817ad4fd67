"""Disclosure control: every export file's report, and the rules reviewers decide by.

    job ends with export files -> a report is owed (``owe``)
    -> the sealed report job on the data side (gateway.core.disclosure_job) runs the
       checker (m2d.disclosure) and writes report.json; the gateway never opens the
       export for it, it reads that report back through gateway.core.jobfiles
    -> ``store``: each manifest file's verdict, pass | review | fail, with its checks
       (name, status, reason), matched on path and sha256; the report in the chain
    -> reviewers: a file without a verdict is never approved (a rejection needs none);
       a `fail` file is released only when DISCLOSURE_OVERRIDES reviewers overrode it,
       each with a written reason (decision "override", a `disclosure_override` link)
    -> the owner sees how many files have each status, never a reason (it may quote
       what matched) nor, until release, a name

Everything in report.json was made from what the researcher's code wrote, so it is
read bounded and checked field by field before anything of it is kept.
"""
from __future__ import annotations

import hashlib
import json
import re

from flask import current_app

from ..extensions import db
from . import provenance
from .models import DisclosureFile, DisclosureReport, Export, ExportFile, ReleaseItem, Submission, utcnow

STATUSES = ("pass", "review", "fail")
OVERRIDE = "override"  # a reviewer's decision on a `fail` file: approve it anyway, with a reason
APPROVING = ("approve", OVERRIDE)
MAX_FILES = 100_000
MAX_CHECKS = 100  # per file
MAX_NAME, MAX_REASON, MAX_TYPE = 64, 2000, 40
_HEX64 = re.compile(r"[0-9a-f]{64}")
NOT_IN_REPORT = {"name": "report", "status": "fail",
                 "reason": "the report names no file with this path and sha256: it was not checked"}


def enabled() -> bool:
    return bool(current_app.config["DISCLOSURE_REPORTS"])


# ------------------------------------------------------------------ owing and storing

def owe(submission: Submission) -> bool:
    """After the manifest of an ended job: a report is owed when its export
    lists files (added, not committed). True when newly owed."""
    if not enabled() or db.session.get(DisclosureReport, submission.id) is not None:
        return False
    export = db.session.get(Export, submission.id)
    if export is None or export.error or not export.files:
        return False
    db.session.add(DisclosureReport(submission_id=submission.id, status="owed"))
    return True


class BadReport(ValueError):
    """report.json is not a report the gateway keeps: ``str`` says what is wrong."""


def parse(data: bytes) -> dict:
    """The report as the gateway keeps it: {index_version, files: [{path, sha256,
    type, status, checks}]}; BadReport for anything not in the interface's shape
    (docs/disclosure: version 1)."""
    try:
        report = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise BadReport(f"not JSON ({e})") from None
    if not isinstance(report, dict) or report.get("version") != 1:
        raise BadReport("not a version 1 report")
    files = report.get("files")
    if not isinstance(files, list) or len(files) > MAX_FILES:
        raise BadReport(f"its files are not a list (or more than {MAX_FILES})")
    kept = []
    for entry in files:
        if not isinstance(entry, dict):
            raise BadReport("a file entry is not an object")
        path, sha256, status = entry.get("path"), entry.get("sha256"), entry.get("status")
        checks = entry.get("checks", [])
        if not isinstance(path, str) or not isinstance(sha256, str) or status not in STATUSES \
                or not isinstance(checks, list) or len(checks) > MAX_CHECKS:
            raise BadReport("a file entry lacks a path, a sha256, a status of pass/review/fail or its checks")
        kept.append({"path": path, "sha256": sha256, "status": status,
                     "type": _text(entry.get("type"), MAX_TYPE) or None,
                     "checks": [_check(c) for c in checks]})
    index_version = report.get("index_version")
    return {"index_version": _text(index_version, 128) if isinstance(index_version, str) else None, "files": kept}


def _check(check: object) -> dict:
    if not isinstance(check, dict) or check.get("status") not in STATUSES or not isinstance(check.get("name"), str):
        raise BadReport("a check lacks a name or a status of pass/review/fail")
    reason = check.get("reason")
    return {"name": _text(check["name"], MAX_NAME), "status": check["status"],
            "reason": _text(reason, MAX_REASON) if isinstance(reason, str) else ""}


def _text(value: object, limit: int) -> str:
    if not isinstance(value, str):
        return ""
    value = value.replace("\x00", "\ufffd")  # PostgreSQL keeps no NUL in text
    return value if len(value) <= limit else value[:limit - 1] + "\u2026"


def store(row: DisclosureReport, parsed: dict, raw: bytes, acro: bytes | None) -> None:
    """Keep a parsed report: each manifest file's verdict (a file the report does
    not name with its manifest sha256 is `fail`: it was not checked), the report,
    and its link of the chain. In the caller's transaction."""
    by_key = {(f["path"], f["sha256"]): f for f in parsed["files"]}
    _forget_verdicts(row)
    kept = []
    for export_file in ExportFile.query.filter_by(submission_id=row.submission_id).order_by(ExportFile.path):
        found = by_key.get((export_file.path, export_file.sha256)) if export_file.sha256 else None
        status, checks = (found["status"], found["checks"]) if found else ("fail", [NOT_IN_REPORT])
        kept.append(DisclosureFile(file_id=export_file.id, submission_id=row.submission_id, status=status,
                                   type=found["type"] if found else None, checks=json.dumps(checks)))
    db.session.add_all(kept)
    row.status, row.error, row.index_version = "done", None, parsed["index_version"]
    row.report, row.acro = raw.decode("utf-8", "replace").replace("\x00", "\ufffd"), \
        acro.decode("utf-8", "replace").replace("\x00", "\ufffd") if acro else None
    by_id = {f.id: f for f in ExportFile.query.filter_by(submission_id=row.submission_id)}
    provenance.record(row.submission_id, "disclosure_report", slurm_job_id=row.slurm_job_id,
                      checker_sha256=row.checker_sha256, image_digest=row.image_digest,
                      index_version=row.index_version, report_sha256=hashlib.sha256(raw).hexdigest(),
                      summary=_counts(v.status for v in kept),
                      files=[{"path": by_id[v.file_id].path, "sha256": by_id[v.file_id].sha256, "status": v.status}
                             for v in kept])


def failed(row: DisclosureReport, why: str) -> None:
    """The report job left no report it keeps: the files stay without a
    verdict (never approved) until an admin runs it again."""
    row.status, row.error = "failed", why
    provenance.record(row.submission_id, "disclosure_failed", slurm_job_id=row.slurm_job_id, why=why)


def again(submission_id: int) -> DisclosureReport:
    """Owe the report anew (an admin's rerun): the verdicts go until it is in."""
    row = db.session.get(DisclosureReport, submission_id) or DisclosureReport(submission_id=submission_id)
    _forget_verdicts(row)
    row.status, row.slurm_job_id, row.error, row.report, row.acro = "owed", None, None, None, None
    row.requested_at, row.submitted_at, row.finished_at = utcnow(), None, None
    db.session.add(row)
    return row


def _forget_verdicts(row: DisclosureReport) -> None:
    DisclosureFile.query.filter_by(submission_id=row.submission_id).delete(synchronize_session=False)
    if row in db.session:
        db.session.expire(row, ["files"])


# ------------------------------------------------------------------ reading it

def verdict(export_file: ExportFile) -> DisclosureFile | None:
    return db.session.get(DisclosureFile, export_file.id)


def _counts(statuses) -> dict:
    counts = dict.fromkeys(STATUSES, 0)
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return counts


def summary(submission: Submission) -> dict:
    """The report's state and how many manifest files have each status
    (``unchecked``: no verdict yet). What the owner sees."""
    row = db.session.get(DisclosureReport, submission.id)
    export = db.session.get(Export, submission.id)
    files = export.files if export else []
    verdicts = {v.file_id: v.status for v in (row.files if row else [])}
    counts = _counts(verdicts.get(f.id, "unchecked") for f in files)
    counts.setdefault("unchecked", 0)
    return {"submission_id": submission.id, "enabled": enabled(),
            "status": row.status if row else "none", "summary": counts}


def reviewer_view(submission: Submission) -> dict:
    """Everything of the report: each manifest file's status and checks."""
    answer = summary(submission)
    row = db.session.get(DisclosureReport, submission.id)
    export = db.session.get(Export, submission.id)
    verdicts = {v.file_id: v for v in (row.files if row else [])}
    answer.update(error=row.error if row else None, index_version=row.index_version if row else None,
                  slurm_job_id=row.slurm_job_id if row else None, files=[])
    for export_file in export.files if export else []:
        found = verdicts.get(export_file.id)
        answer["files"].append({"path": export_file.path, "size": export_file.size, "sha256": export_file.sha256,
                                "type": found.type if found else None,
                                "status": found.status if found else "unchecked",
                                "checks": found.check_list if found else []})
    return answer


# ------------------------------------------------------------------ deciding with it

def refusal(items: list[ReleaseItem], decision: str, comment: str) -> tuple[int, str, str] | None:
    """Why ``decision`` may not be taken on ``items`` (status, code, message), or None."""
    if decision == "reject":
        return None
    if not enabled():
        return None if decision != OVERRIDE else (400, "nothing_to_override", "This gateway makes no disclosure "
                                                  "reports (DISCLOSURE_REPORTS is off): approve or reject.")
    for item in items:
        found = verdict(item.file)
        if found is None:
            return (409, "disclosure_pending", f"'{item.file.path}' has no disclosure report yet: it can be "
                    "approved once its report is in (a rejection needs none).")
        if found.status == "fail" and decision != OVERRIDE:
            return (409, "disclosure_fail", f"The disclosure report fails '{item.file.path}': releasing it is an "
                    f"override, which {current_app.config['DISCLOSURE_OVERRIDES']} reviewers must each make "
                    "with a written reason (decision 'override').")
        if found.status != "fail" and decision == OVERRIDE:
            return (400, "not_failed", f"'{item.file.path}' is '{found.status}', not 'fail': approve it.")
    if decision == OVERRIDE and not comment:
        return (400, "override_reason_required", "Write why the file may leave although its report fails it: "
                "the reason goes into the provenance chain.")
    return None


def releasable(item: ReleaseItem, approvals_needed: int) -> bool:
    """Enough approvals, and with reports on: a verdict, and for a `fail` file
    DISCLOSURE_OVERRIDES overrides among them."""
    if sum(r.decision in APPROVING for r in item.reviews) < approvals_needed:
        return False
    if not enabled():
        return True
    found = verdict(item.file)
    if found is None:
        return False
    return found.status != "fail" or \
        sum(r.decision == OVERRIDE for r in item.reviews) >= current_app.config["DISCLOSURE_OVERRIDES"]


def status_of(export_file: ExportFile) -> str | None:
    found = verdict(export_file) if enabled() else None
    return found.status if found else None


def earlier_reviews(item: ReleaseItem) -> list:
    """The reviews of the same file in earlier requests (the owner asked again)."""
    earlier = (ReleaseItem.query.filter(ReleaseItem.file_id == item.file_id, ReleaseItem.id < item.id)
               .order_by(ReleaseItem.id).all())
    return [review for old in earlier for review in old.reviews]
