"""Users: sign-up, approval, and the MLflow account approval brings."""
import re

from flask import current_app

from .adapters.mlflow import MlflowAdmin
from .extensions import db
from .models import User, utcnow


class AccountError(ValueError):
    pass


def create_user(email, name, password=None, is_admin=False):
    email = email.strip().lower()
    if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", email):
        raise AccountError(f"'{email}' is not an email address.")
    if User.query.filter_by(email=email).first():
        raise AccountError(f"A user with the email {email} already exists.")
    user = User(email=email, name=name.strip() or email, is_admin=is_admin)
    if password:
        user.set_password(password)
    db.session.add(user)
    db.session.commit()
    return user


def approve(user):
    """Approve ``user`` and give them an MLflow account and experiment.

    Safe to repeat: provisioning completes whatever is missing and returns
    the current password.
    """
    if not user.mlflow_username:
        user.mlflow_username = mlflow_username_for(user)
        db.session.commit()
    account = MlflowAdmin.from_config(current_app.config).provision(user.mlflow_username)
    user.mlflow_password = account.password
    user.mlflow_experiment_id = account.experiment_id
    user.approved_at = user.approved_at or utcnow()
    db.session.commit()
    return user


def mlflow_username_for(user):
    # readable and unique: the email's local part plus the user id
    local = re.sub(r"[^a-z0-9]+", "-", user.email.split("@")[0].lower()).strip("-") or "user"
    return f"{local}-{user.id}"


def find(email):
    user = User.query.filter_by(email=email.strip().lower()).first()
    if user is None:
        raise AccountError(f"No user with the email {email}.")
    return user
