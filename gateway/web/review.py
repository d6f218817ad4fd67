"""The reviewers' pages of the export airlock (the rules are gateway.core.airlock):
pending requests, each file with its hash and a preview, the code that produced
them (the submission's zip, browsable), approve or reject per file with a
comment. The owner's side (the request form, downloads): gateway.web.exports.
"""
from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user

from ..core import airlock, releases, runs
from ..core.models import ReleaseRequest
from ..extensions import db

bp = Blueprint("review", __name__, url_prefix="/review")


@bp.before_request
def reviewers_only():
    if not current_user.is_authenticated:
        return redirect(url_for("auth.login", next=request.path))
    if not current_user.is_reviewer:
        abort(403, "Only reviewers see release requests. An admin grants the role: "
                   "flask --app gateway users grant-reviewer EMAIL")
    return None


@bp.get("/")
def pending():
    decided = (ReleaseRequest.query.filter(ReleaseRequest.status != "pending")
               .order_by(ReleaseRequest.id.desc()).limit(20).all())
    return render_template("review/index.html", pending=airlock.pending_requests(), decided=decided)


@bp.get("/requests/<int:request_id>")
def show(request_id):
    release = _request_or_404(request_id)
    previews = {item.id: airlock.preview(release.submission_id, item.file) for item in release.items}
    return render_template("review/request.html", release=release, previews=previews,
                           leaving=releases.leaving_for(release.submission_id, release.items),
                           mlflow=runs.for_submission(release.submission),
                           mine=release.requester_id == current_user.id
                           or release.submission.user_id == current_user.id)


@bp.post("/requests/<int:request_id>/decide")
def decide(request_id):
    release = _request_or_404(request_id)
    path = request.form.get("path")
    try:
        airlock.decide(release, current_user, request.form.get("decision", ""), request.form.get("comment", ""),
                       [path] if path else None)
    except airlock.AirlockError as e:
        flash(e.message, "error")
    else:
        flash(f"Recorded: {request.form.get('decision')} {path or 'all pending files'}.")
    return redirect(url_for("review.show", request_id=request_id))


@bp.get("/submissions/<int:submission_id>/code")
def code(submission_id):
    submission = _submission_or_404(submission_id)
    return render_template("review/code.html", submission=submission,
                           files=airlock.code_listing(submission_id), name=None, text=None)


@bp.get("/submissions/<int:submission_id>/code/<path:name>")
def code_file(submission_id, name):
    submission = _submission_or_404(submission_id)
    text = airlock.code_file(submission_id, name)
    if text is None:
        abort(404, f"The submission's zip has no file '{name}'.")
    return render_template("review/code.html", submission=submission,
                           files=airlock.code_listing(submission_id), name=name, text=text)


def _request_or_404(request_id):
    release = db.session.get(ReleaseRequest, request_id)
    return release or abort(404, f"There is no release request {request_id}.")


def _submission_or_404(submission_id):
    # reviewers see the code of submissions with a release request only
    found = ReleaseRequest.query.filter_by(submission_id=submission_id).first()
    return (found and found.submission) or abort(404, "No release request concerns this submission.")
