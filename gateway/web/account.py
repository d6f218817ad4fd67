"""A researcher's account page: their MLflow login, their usage against their
limits, their API tokens (created here, shown once, revocable) and their password."""
from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, session, url_for
from flask_login import current_user, login_required, login_user

from ..core import accounts, usage
from ..core.models import ApiToken, utcnow
from ..extensions import db
from .api import mlflow_settings

bp = Blueprint("account", __name__)
TOKEN_NAME_MAX = 100


@bp.get("/account")
@login_required
def page():
    return _account_page()


@bp.post("/account/tokens")
@login_required
def create_token():
    name = (request.form.get("name") or "").strip()
    if not name or len(name) > TOKEN_NAME_MAX:
        flash(f"Give the token a name of 1 to {TOKEN_NAME_MAX} characters, e.g. 'laptop'.", "error")
        return _account_page(), 400
    token = ApiToken.issue(current_user, name=name)
    db.session.commit()
    # shown in this answer only: never in a redirect, a cookie or a log
    return _account_page(new_token=token, new_token_name=name), 201


@bp.post("/account/tokens/<int:token_id>/revoke")
@login_required
def revoke_token(token_id):
    token = ApiToken.query.filter_by(id=token_id, user_id=current_user.id).first() or abort(404)
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        db.session.commit()
    flash(f"The token '{token.name or token.id}' is revoked: programs using it are refused now.")
    return redirect(url_for("account.page") + "#tokens")


@bp.post("/account/password")
@login_required
def change_password():
    if not current_user.check_password(request.form.get("current", "")):
        flash("Your current password is not right.", "error")
    elif request.form.get("password", "") != request.form.get("confirm", ""):
        flash("The two new passwords differ.", "error")
    else:
        try:
            accounts.set_password(current_user, request.form.get("password", ""))
        except accounts.AccountError as e:
            flash(str(e), "error")
        else:
            # the stamp changed: every other session is over, this one goes on
            session.clear()
            login_user(current_user._get_current_object())
            flash("Your password is changed. Other sessions are logged out.")
    return redirect(url_for("account.page") + "#password")


def _account_page(**extra):
    tokens = (ApiToken.query.filter_by(user_id=current_user.id)
              .order_by(ApiToken.revoked_at.isnot(None), ApiToken.id.desc()).all())
    response = current_app.make_response(render_template(
        "account.html", mlflow=mlflow_settings(current_user), tokens=tokens, usage=usage.for_user(current_user),
        **extra))
    response.headers["Cache-Control"] = "no-store"  # credentials on the page
    return response
