"""The owner's side of the export airlock (the rules are gateway.core.airlock):
the export section of their submission's page (templates/export_section.html),
the release request form, and downloads of what reviewers released. The
reviewers' pages: gateway.web.review."""
from flask import Blueprint, abort, flash, redirect, request, url_for
from flask_login import current_user, login_required

from ..core import airlock
from ..core.models import Submission
from .api import download_response

bp = Blueprint("exports", __name__)


@bp.app_context_processor
def export_helpers():
    return {"export_of": _export_of}


def _export_of(submission):
    """For the submission page: the manifest (once the job ended) and the requests."""
    return airlock.overview(submission)


@bp.post("/submissions/<int:submission_id>/release-requests")
@login_required
def request_release(submission_id):
    submission = Submission.of(current_user, submission_id) or abort(404)
    try:  # every file not yet requested: the owner does not see their names (gateway.core.airlock)
        release = airlock.request_release(current_user, submission, None, request.form.get("justification", ""))
    except airlock.AirlockError as e:
        flash(e.message, "error")
    else:
        flash(f"Release request {release.id} sent to the reviewers. You will get an email with their decision.")
    return redirect(url_for("submissions.detail", submission_id=submission_id) + "#export")


@bp.get("/submissions/<int:submission_id>/export/<path:path>")
@login_required
def download(submission_id, path):
    submission = Submission.of(current_user, submission_id) or abort(404)
    return download_response(current_user, submission, path, lambda status, code, message: abort(status, message))
