"""Researchers and admins for the in-process app (Flask's test client on a
local database): one user factory, an API token's header, and logging in
through the form (with its CSRF token) or straight into the session."""
import re

from flask import g

from gateway.core import accounts
from gateway.core.models import ApiToken, utcnow
from gateway.extensions import db

PASSWORD = "correct horse battery staple"


def make_user(email, *, password=PASSWORD, admin=False, approved=True):
    user = accounts.create_user(email, email.split("@")[0].title(), password, is_admin=admin)
    if approved:
        user.approved_at = user.email_verified_at = utcnow()
        user.mlflow_username = accounts.mlflow_username_for(user)
    db.session.commit()
    return user


def log_in(client, email, password=PASSWORD, **extra):
    return post(client, "/login", {"email": email, "password": password, **extra})


def token_header(user):
    token = ApiToken.issue(user)
    db.session.commit()
    return {"Authorization": f"Bearer {token}"}


def log_in_session(client, user):
    """Logged in without the form: the session holds the user, as after /login."""
    with client.session_transaction() as session:
        session["_user_id"] = user.get_id()
        session["_fresh"] = True


def csrf(client, path="/login"):
    # the test's app context (local_app) is shared by its requests, and so is
    # flask.g, where Flask-WTF caches the token: a session cleared at login
    # would otherwise get no new one
    fresh()
    page = client.get(path).get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def fresh():
    """Forget what flask.g holds from the previous request (see csrf)."""
    g.pop("csrf_token", None)
    g.pop("_login_user", None)


def post(client, path, data, page=None):
    return client.post(path, data={"csrf_token": csrf(client, page or path), **data})
