"""Disclosure reports on the web (the rules are gateway.core.disclosure).

    GET /api/v1/submissions/<id>/disclosure   reviewers and admins: each file's path, status
                                              and checks; the owner: how many files have each status
    GET /review/submissions/<id>/disclosure.json, .../acro.json
                                              reviewers: the report as the job wrote it, and in
                                              ACRO's results shape, as results.json (ACRO's
                                              loader and SACRO-Viewer open it: docs/disclosure.md)
The review page shows each file's verdict and offers the override of a `fail`;
the owner's page the counts and, after a rejection, the request to ask again.
"""
from flask import Blueprint, Response, abort, g, jsonify
from flask_login import current_user, login_required

from ..core import disclosure
from ..core.models import DisclosureReport, ReleaseItem, ReleaseRequest, Submission
from ..extensions import csrf, db
from .auth import token_required

bp = Blueprint("disclosure", __name__)
csrf.exempt(bp)  # GETs only


def _sees_everything(user) -> bool:
    return bool(user.approved and (user.is_reviewer or user.is_admin))


@bp.get("/api/v1/submissions/<int:submission_id>/disclosure")
@token_required
def report(submission_id):
    submission = db.session.get(Submission, submission_id)
    if submission is None:
        abort(404, f"You have no submission {submission_id}.")
    if submission.user_id != g.user.id and _sees_everything(g.user):
        return jsonify(disclosure.reviewer_view(submission))
    if submission.user_id != g.user.id:
        abort(404, f"You have no submission {submission_id}.")
    # the owner: counts alone; a reason may quote what matched, a name is the reviewers' until release
    return jsonify(disclosure.summary(submission))


@bp.get("/review/submissions/<int:submission_id>/disclosure.json")
@login_required
def report_file(submission_id):
    return _raw(submission_id, "report")


@bp.get("/review/submissions/<int:submission_id>/acro.json")
@login_required
def acro_file(submission_id):
    return _raw(submission_id, "acro")


def _raw(submission_id, column):
    if not current_user.is_reviewer:
        abort(403, "Only reviewers read disclosure reports.")
    row = db.session.get(DisclosureReport, submission_id)
    text = getattr(row, column) if row else None
    if text is None:
        abort(404, f"Submission {submission_id} has no disclosure report of that kind.")
    # ACRO's loader (acro.record.load_records) opens FOLDER/results.json and nothing else
    name = "results.json" if column == "acro" else f"submission-{submission_id}-disclosure.json"
    return Response(text, mimetype="application/json",
                    headers={"Content-Disposition": f"attachment; filename={name}"})


@bp.app_context_processor
def helpers():
    return {"disclosure_verdict": lambda export_file: disclosure.verdict(export_file) if disclosure.enabled() else None,
            "disclosure_summary": disclosure.summary, "earlier_reviews": disclosure.earlier_reviews,
            "rejected_files": _rejected_files, "disclosure_override": disclosure.OVERRIDE}


def _rejected_files(submission_id: int) -> int:
    """Files whose last request rejected them: the owner may ask again."""
    latest = {}
    for item in ReleaseItem.query.join(ReleaseRequest).filter(ReleaseRequest.submission_id == submission_id) \
            .order_by(ReleaseItem.id):
        latest[item.file_id] = item.status
    return sum(status == "rejected" for status in latest.values())
