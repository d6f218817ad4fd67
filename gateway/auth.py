"""Sign-up, login and logout pages, and API token authentication."""
from functools import wraps

from flask import Blueprint, flash, g, redirect, render_template, request, url_for
from flask_login import login_required, login_user, logout_user

from . import accounts
from .errors import json_error
from .extensions import db, login_manager
from .models import ApiToken, User, utcnow

bp = Blueprint("auth", __name__)


@login_manager.user_loader
def load_user(user_id):
    return db.session.get(User, int(user_id))


@bp.route("/signup", methods=["GET", "POST"])
def signup():
    if request.method == "POST":
        form = request.form
        if len(form.get("password", "")) < 12:
            flash("Choose a password of at least 12 characters.", "error")
        else:
            try:
                accounts.create_user(form.get("email", ""), form.get("name", ""), form["password"])
            except accounts.AccountError as e:
                flash(str(e), "error")
            else:
                flash("Thank you. An admin will review your account; you can log in once it is approved.")
                return redirect(url_for("auth.login"))
    return render_template("signup.html")


@bp.route("/login", methods=["GET", "POST"])
def login():
    if request.method == "POST":
        user = User.query.filter_by(email=request.form.get("email", "").strip().lower()).first()
        if user is None or not user.check_password(request.form.get("password", "")):
            flash("Wrong email or password.", "error")
        elif not user.approved:
            flash("Your account is waiting for an admin's approval.", "error")
        else:
            login_user(user)
            return redirect(url_for("submissions.index"))
    return render_template("login.html")


@bp.route("/logout", methods=["POST"])
@login_required
def logout():
    logout_user()
    return redirect(url_for("auth.login"))


def token_required(view):
    """API views: the caller is the approved user owning the Bearer token."""
    @wraps(view)
    def wrapped(*args, **kwargs):
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _unauthorized("Send your API token as 'Authorization: Bearer <token>'. "
                                 "An admin creates one with: flask --app gateway tokens create EMAIL")
        row = ApiToken.query.filter_by(token_hash=ApiToken.hash(token.strip())).first()
        if row is None:
            return _unauthorized("This API token is not valid. Ask an admin for a new one.")
        if not row.user.approved:
            return _unauthorized("Your account is waiting for an admin's approval.", 403)
        row.last_used_at = utcnow()
        db.session.commit()
        g.user = row.user
        return view(*args, **kwargs)
    return wrapped


def _unauthorized(message, status=401):
    response = json_error(status, "unauthorized", message)
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response
