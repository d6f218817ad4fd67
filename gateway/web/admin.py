"""Admin pages: accounts waiting for approval, every user, every submission,
the cluster in Slurm's own words, and every researcher's usage and fair share."""
from datetime import datetime, timedelta
from functools import wraps

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user
from sqlalchemy.orm import contains_eager

from m2d.contract.states import IllegalTransition, Status

from ..adapters.mlflow import MlflowError
from ..adapters.slurm import SlurmError
from ..core import accounts, alerts, lifecycle, scheduling, usage
from ..core.models import Submission, User
from ..extensions import db, login_manager
from . import pagination

bp = Blueprint("admin", __name__, url_prefix="/admin")
PER_PAGE = 25


def admin_required(view):
    """Anonymous visitors go to the login page; researchers get a 403."""
    @wraps(view)
    def wrapped(*args, **kwargs):
        if not current_user.is_authenticated:
            return login_manager.unauthorized()
        if not current_user.is_admin:
            abort(403)
        return view(*args, **kwargs)
    return wrapped


def navigation():
    """Template values every page's header needs."""
    pending = 0
    if current_user.is_authenticated and current_user.is_admin:
        pending = _pending_query().count()
    return {"platform_name": current_app.config["PLATFORM_NAME"], "pending_accounts": pending}


def _pending_query():
    return User.query.filter(User.approved_at.is_(None), User.rejected_at.is_(None),
                             User.email_verified_at.isnot(None))


def _user(user_id):
    return db.session.get(User, user_id) or abort(404)


# ------------------------------------------------------------------ accounts

@bp.get("/")
@admin_required
def home():
    return redirect(url_for("admin.users"))


@bp.get("/users")
@admin_required
def users():
    pending = _pending_query().order_by(User.email_verified_at).all()
    everyone = User.query.order_by(User.id.desc()).all()
    return render_template("admin/users.html", pending=pending, users=everyone)


@bp.post("/users/<int:user_id>/approve")
@admin_required
def approve(user_id):
    user = _user(user_id)
    try:
        accounts.approve(user, notify=True)
    except MlflowError as e:
        flash(f"{user.email} is not approved: MLflow did not answer ({e}). Try again.", "error")
    except SlurmError as e:
        flash(f"{user.email} is not approved: Slurm's accounting refused their account ({e}). Try again.", "error")
    else:
        flash(f"{user.name} <{user.email}> is approved; MLflow user {user.mlflow_username}. "
              "They got an email.")
    return redirect(url_for("admin.users"))


@bp.post("/users/<int:user_id>/reject")
@admin_required
def reject(user_id):
    user = _user(user_id)
    try:
        accounts.reject(user, request.form.get("reason", ""))
    except accounts.AccountError as e:
        flash(str(e), "error")
    else:
        flash(f"The application of {user.email} is rejected; they got the reason by email.")
    return redirect(url_for("admin.users"))


@bp.post("/users/<int:user_id>/disable")
@admin_required
def disable(user_id):
    user = _user(user_id)
    if user.id == current_user.id:
        flash("You cannot disable your own account.", "error")
        return redirect(url_for("admin.users"))
    cancelled = accounts.disable(user)
    flash(f"{user.email} is disabled" + (f"; {cancelled} submission(s) are being cancelled." if cancelled else "."))
    return redirect(url_for("admin.users"))


@bp.post("/users/<int:user_id>/enable")
@admin_required
def enable(user_id):
    user = _user(user_id)
    try:
        accounts.enable(user)
    except SlurmError as e:
        flash(f"{user.email} is still disabled: Slurm's accounting did not answer ({e}). Try again.", "error")
    else:
        flash(f"{user.email} is enabled again.")
    return redirect(url_for("admin.users"))


# --------------------------------------------------------------- submissions

@bp.get("/submissions")
@admin_required
def submissions():
    query = db.select(Submission).join(User)
    who = (request.args.get("user") or "").strip()[:254]
    status = request.args.get("status") or ""
    since, until = _day(request.args.get("from")), _day(request.args.get("to"))
    if who:
        query = query.where(User.email.contains(who.lower()) | User.name.contains(who))
    if status in {s.value for s in Status}:
        query = query.where(Submission.status == status)
    if since:
        query = query.where(Submission.created_at >= since)
    if until:
        query = query.where(Submission.created_at < until + timedelta(days=1))
    page = pagination.page_from_request(query.options(contains_eager(Submission.user)), Submission.id, PER_PAGE)
    filters = {"user": who, "status": status, "from": request.args.get("from") or "",
               "to": request.args.get("to") or ""}
    stuck = alerts.open_alerts()
    return render_template("admin/submissions.html", page=page, filters=filters,
                           statuses=[s.value for s in Status], stuck=stuck,
                           stuck_ids={a.submission_id for a in stuck})


def _day(raw):
    try:
        return datetime.strptime(raw or "", "%Y-%m-%d")
    except ValueError:
        return None


@bp.get("/submissions/<int:submission_id>")
@admin_required
def detail(submission_id):
    from .submissions import detail_context
    submission = db.session.get(Submission, submission_id) or abort(404)
    return render_template("detail.html", **detail_context(submission), admin_view=True)


@bp.get("/submissions/<int:submission_id>/live")
@admin_required
def live(submission_id):
    from .submissions import live_response
    submission = db.session.get(Submission, submission_id) or abort(404)
    return live_response(submission, admin_view=True)


@bp.post("/submissions/<int:submission_id>/cancel")
@admin_required
def cancel(submission_id):
    submission = db.session.get(Submission, submission_id) or abort(404)
    _cancel(submission)
    return redirect(request.form.get("back") == "cluster" and url_for("admin.cluster")
                    or url_for("admin.detail", submission_id=submission_id))


def _cancel(submission):
    try:
        lifecycle.cancel(submission, by="an admin")
    except IllegalTransition as e:
        flash(f"{e}; there is nothing to cancel.", "error")
    else:
        flash(f"Submission {submission.id} is being cancelled.")


# ------------------------------------------------------------------ cluster

@bp.get("/cluster")
@admin_required
def cluster():
    prefix = f"{current_app.config['SLURM_JOB_PREFIX']}-"
    scheduler = scheduling.scheduler()
    error, queue, recent = None, [], []
    try:
        queue = scheduler.queue(prefix)
        recent = scheduler.recent(prefix)[:50]
    except SlurmError as e:
        error = str(e)
    ids = {entry.name.removeprefix(prefix) for entry in [*queue, *recent]}
    by_job = {s.slurm_job_id: s for s in Submission.query.filter(
        Submission.id.in_([int(i) for i in ids if i.isdigit()]))}
    return render_template("admin/cluster.html", queue=queue, recent=recent, error=error,
                           submissions=by_job)


@bp.post("/cluster/<job_id>/cancel")
@admin_required
def cancel_job(job_id):
    """Cancel one of the gateway's jobs: through its submission when it has
    one (the poller records the outcome), else straight through scancel."""
    submission = Submission.query.filter_by(slurm_job_id=job_id).first()
    if submission is not None:
        _cancel(submission)
        return redirect(url_for("admin.cluster"))
    prefix = f"{current_app.config['SLURM_JOB_PREFIX']}-"
    scheduler = scheduling.scheduler()
    try:
        if not any(e.job_id == job_id for e in scheduler.queue(prefix)):
            abort(404)
        scheduler.cancel(job_id)
    except SlurmError as e:
        flash(f"Slurm refused: {e}", "error")
    else:
        flash(f"Slurm job {job_id} is being cancelled.")
    return redirect(url_for("admin.cluster"))


# ------------------------------------------------------------ fair share

@bp.get("/usage")
@admin_required
def usage_page():
    """Every researcher's Slurm account: usage this period, limits, fair share."""
    return render_template("admin/usage.html", **usage.overview())
