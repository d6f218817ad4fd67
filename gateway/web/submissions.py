"""Web pages for researchers: their submissions, the upload form, a
submission's story (updated live while it is active). Their account: gateway.web.account."""
from flask import Blueprint, abort, flash, jsonify, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from werkzeug.datastructures import FileStorage

from m2d.contract.states import IllegalTransition, Status
from m2d.contract.validation import Refusal

from ..adapters.slurm import SlurmError, queue_position
from ..core import intake, lifecycle, runs, scheduling
from ..core.models import Build, Email, Submission
from ..core.storage import SubmissionFiles
from ..extensions import db
from . import pagination

bp = Blueprint("submissions", __name__)
PER_PAGE = 20
BUILD_LOG_LINES = 60


@bp.route("/", methods=["GET", "POST"])
@login_required
def index():
    """My submissions, newest first, a page at a time. (A POST here is an
    upload, as before the upload form had a page of its own.)"""
    if request.method == "POST":
        return upload()
    query = db.select(Submission).filter_by(user_id=current_user.id)
    return render_template("index.html", page=pagination.page_from_request(query, Submission.id, PER_PAGE))


@bp.route("/upload", methods=["GET", "POST"])
@login_required
def upload():
    if request.method == "POST":
        try:
            submission = intake.accept(current_user, request.files.get("file"))
        except Refusal as refusal:
            return render_template("upload.html", limits=intake.limits(), refusal=refusal.message), 400
        flash(f"Submission {submission.id} received. This page follows it; you will also get an "
              "email at each step.")
        return redirect(url_for("submissions.detail", submission_id=submission.id))
    return render_template("upload.html", limits=intake.limits(), refusal=None)


@bp.get("/submissions/<int:submission_id>")
@login_required
def detail(submission_id):
    submission = Submission.of(current_user, submission_id) or abort(404)
    return render_template("detail.html", **detail_context(submission), admin_view=False)


@bp.get("/submissions/<int:submission_id>/live")
@login_required
def live(submission_id):
    """What the detail page's script polls while the submission is active."""
    submission = Submission.of(current_user, submission_id) or abort(404)
    return live_response(submission, admin_view=False)


@bp.post("/submissions/<int:submission_id>/cancel")
@login_required
def cancel(submission_id):
    submission = Submission.of(current_user, submission_id) or abort(404)
    try:
        lifecycle.cancel(submission)
    except IllegalTransition as e:
        flash(f"{e}; there is nothing to cancel.", "error")
    else:
        flash(f"Submission {submission_id} is being cancelled.")
    return redirect(url_for("submissions.detail", submission_id=submission_id))


@bp.post("/submissions/<int:submission_id>/resubmit")
@login_required
def resubmit(submission_id):
    """The same zip again, as a new submission (the same rules and quota)."""
    submission = Submission.of(current_user, submission_id) or abort(404)
    path = SubmissionFiles(submission.id).upload
    if not path.is_file():
        flash("The zip of this submission is no longer kept; upload it again.", "error")
        return redirect(url_for("submissions.upload"))
    try:
        with open(path, "rb") as stream:
            again = intake.accept(current_user, FileStorage(stream, filename=submission.filename or "upload.zip"))
    except Refusal as refusal:
        flash(refusal.message, "error")
        return redirect(url_for("submissions.detail", submission_id=submission_id))
    flash(f"Submission {again.id} received: the code of submission {submission_id}, again.")
    return redirect(url_for("submissions.detail", submission_id=again.id))


# ------------------------------------------------------------ the story

def detail_context(submission):
    """What the detail page shows, for its owner and for admins alike."""
    return {"submission": submission, "mlflow": runs.for_submission(submission), **_live_values(submission)}


def live_response(submission, admin_view):
    values = _live_values(submission)
    html = render_template("_live.html", submission=submission, admin_view=admin_view, **values)
    return jsonify(status=submission.status, terminal=submission.state.terminal, html=html)


def _live_values(submission):
    emails = (Email.query.filter(Email.submission_id == submission.id, Email.sent_at.isnot(None))
              .order_by(Email.sent_at).all())
    build_log = None
    if submission.state == Status.BUILD_FAILED:
        build = (Build.query.filter_by(submission_id=submission.id, succeeded=False)
                 .order_by(Build.id.desc()).first())
        if build and build.log:
            build_log = "\n".join(build.log.splitlines()[-BUILD_LOG_LINES:])
    return {"emails": emails, "build_log": build_log, "slurm": _slurm_view(submission)}


def _slurm_view(submission):
    """While Slurm holds the job: its state, the reason it waits, and its
    place among the pending jobs, from squeue."""
    if not submission.slurm_job_id or submission.state not in (Status.QUEUED, Status.RUNNING):
        return None
    try:
        entries = scheduling.queue_view()
    except SlurmError as e:
        return {"error": str(e)}
    entry = next((e for e in entries if e.job_id == submission.slurm_job_id), None)
    if entry is None:
        return None
    return {"state": entry.state, "reason": entry.reason, "elapsed": entry.elapsed,
            "nodelist": entry.nodelist, "position": queue_position(entries, entry.job_id)}
