"""Web pages for researchers: upload form, their submissions, their account."""
from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from . import intake, lifecycle
from .api import mlflow_settings
from .models import Submission
from .states import IllegalTransition
from .validation import Refusal

bp = Blueprint("submissions", __name__)


@bp.route("/", methods=["GET", "POST"])
@login_required
def index():
    if request.method == "POST":
        try:
            submission = intake.accept(current_user, request.files.get("file"))
        except Refusal as refusal:
            flash(refusal.message, "error")
            return render_template("index.html", submissions=_mine()), 400
        flash(f"Submission {submission.id} received. You will get an email at each step.")
        return redirect(url_for("submissions.detail", submission_id=submission.id))
    return render_template("index.html", submissions=_mine())


@bp.get("/submissions/<int:submission_id>")
@login_required
def detail(submission_id):
    submission = Submission.of(current_user, submission_id) or abort(404)
    return render_template("detail.html", submission=submission)


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


@bp.get("/account")
@login_required
def account():
    return render_template("account.html", mlflow=mlflow_settings(current_user))


def _mine():
    return current_user.submissions.order_by(Submission.id.desc()).limit(50).all()
