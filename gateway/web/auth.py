"""Sign-up, email verification, login and logout, password reset, and API
token authentication. Changing a password: gateway.web.account."""
from functools import wraps
from urllib.parse import urlsplit

from flask import Blueprint, current_app, flash, g, redirect, render_template, request, session, url_for
from flask_login import current_user, login_required, login_user, logout_user

from ..core import accounts
from ..core.models import ApiToken, User, utcnow
from ..extensions import db, limiter, login_manager
from .errors import json_error

bp = Blueprint("auth", __name__)

login_manager.login_message = "Log in to see this page."
login_manager.login_message_category = "info"


@login_manager.user_loader
def load_user(session_id):
    """The session names the user and their password's stamp: a changed
    password, a disabled account or a withdrawn approval end the session."""
    user_id, _, stamp = str(session_id).partition(".")
    if not user_id.isdigit():
        return None
    user = db.session.get(User, int(user_id))
    if user is None or not user.is_active:
        return None
    # a bare id (a session from before stamps) counts only for an account
    # without a web password: no password change can have happened to it
    if stamp != user.session_stamp and (stamp or user.password_hash):
        return None
    return user


# -------------------------------------------------------------- rate limits
# Only refusals count (deduct_when): a researcher who types their password
# right is never slowed down, and the sixth wrong one within a minute is
# refused before the password is even checked.

def _form_email():
    return "account:" + (request.form.get("email") or "").strip().lower()[:254]


def _refused(response):
    return response.status_code in (400, 401)


def _limit(setting, **kwargs):
    return limiter.limit(lambda: current_app.config[setting], methods=["POST"], **kwargs)


# ------------------------------------------------------------------ sign-up

@bp.route("/signup", methods=["GET", "POST"])
@_limit("SIGNUP_LIMIT", scope="signup-address")
@_limit("SIGNUP_LIMIT", key_func=_form_email, scope="signup-account")
def signup():
    if current_user.is_authenticated:
        return redirect(url_for("submissions.index"))
    if request.method == "POST":
        try:
            application = accounts.Application.from_form(request.form)
        except accounts.AccountError as e:
            flash(str(e), "error")
            return render_template("signup.html", form=request.form), 400
        accounts.apply(application)
        # the same words whether or not the address has an account already
        return render_template("signup_sent.html", email=application.email)
    return render_template("signup.html", form={})


@bp.get("/verify/<token>")
def verify(token):
    try:
        accounts.verify_email(token)
    except accounts.LinkError as e:
        return render_template("error.html", title="This link does not work", message=str(e)), 400
    flash("Thank you: your email address is confirmed. An admin will now review your "
          "application; you will get an email when they decide.")
    return redirect(url_for("auth.login"))


# -------------------------------------------------------------------- login

@bp.route("/login", methods=["GET", "POST"])
@_limit("LOGIN_LIMIT_ADDRESS", scope="login-address", deduct_when=_refused)
@_limit("LOGIN_LIMIT_ACCOUNT", key_func=_form_email, scope="login-account", deduct_when=_refused)
def login():
    if request.method == "POST":
        email = (request.form.get("email") or "").strip().lower()
        user = User.query.filter_by(email=email[:254]).first()
        if user is None or not user.check_password(request.form.get("password", "")):
            flash("Wrong email or password.", "error")
            return render_template("login.html", email=email), 401
        # the password was right: now the account's state may be said
        if user.disabled:
            flash("This account is disabled. Ask an admin.", "error")
        elif user.approved:
            session.clear()  # a new session: nothing from before the login survives
            login_user(user, remember=bool(request.form.get("remember")))
            return redirect(_next_page() or url_for("submissions.index"))
        elif user.rejected_at:
            flash("Your application was not approved; the email we sent says why.", "error")
        elif not user.email_verified_at:
            flash("Confirm your email address first: open the link we sent you.", "error")
        else:
            flash("Your account is waiting for an admin's approval. You will get an email.", "error")
        return render_template("login.html", email=email), 403
    return render_template("login.html", email="")


def _next_page():
    target = request.args.get("next", "")
    parts = urlsplit(target)
    if target.startswith("/") and not target.startswith("//") and not parts.netloc and not parts.scheme:
        return target
    return None


@bp.route("/logout", methods=["POST"])
@login_required
def logout():
    logout_user()
    session.clear()
    flash("You are logged out.")
    return redirect(url_for("auth.login"))


# ----------------------------------------------------------------- passwords

@bp.route("/reset", methods=["GET", "POST"])
@_limit("RESET_LIMIT", scope="reset-address")
@_limit("RESET_LIMIT", key_func=_form_email, scope="reset-account")
def reset_request():
    if request.method == "POST":
        email = (request.form.get("email") or "").strip()
        if email:
            accounts.request_reset(email)
        # the same words whether or not the address has an account
        flash("If that address has an account, an email with a link to choose a new "
              "password is on its way. The link works once, for an hour.")
        return redirect(url_for("auth.login"))
    return render_template("reset_request.html")


@bp.route("/reset/<token>", methods=["GET", "POST"])
@_limit("RESET_LIMIT", scope="reset-use")
def reset(token):
    try:
        user = accounts.user_for_reset(token)
    except accounts.LinkError as e:
        return render_template("error.html", title="This link does not work", message=str(e)), 400
    if request.method == "POST":
        password = request.form.get("password", "")
        if password != request.form.get("confirm", ""):
            flash("The two passwords differ.", "error")
        else:
            try:
                accounts.set_password(user, password)
            except accounts.AccountError as e:
                flash(str(e), "error")
            else:
                logout_user()
                session.clear()
                flash("Your password is changed. Log in with the new one.")
                return redirect(url_for("auth.login"))
        return render_template("reset.html"), 400
    return render_template("reset.html")


# ----------------------------------------------------------------- API tokens

def token_required(view):
    """API views: the caller is the approved, enabled user owning the Bearer token."""
    @wraps(view)
    def wrapped(*args, **kwargs):
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _unauthorized("Send your API token as 'Authorization: Bearer <token>'. "
                                 "Create one on your account page.")
        row = ApiToken.query.filter_by(token_hash=ApiToken.hash(token.strip())).first()
        if row is None or row.revoked_at is not None:
            return _unauthorized("This API token is not valid. Create a new one on your account page.")
        if row.user.disabled:
            return _unauthorized("This account is disabled. Ask an admin.", 403)
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
