"""Users: sign-up, email verification, approval (and the MLflow and Slurm
accounts it brings), rejection, disabling, password resets, and the emails
they owe."""
import hashlib
import logging
import re
import secrets as random
from dataclasses import dataclass

from flask import current_app
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from rq import Retry
from sqlalchemy.exc import IntegrityError

from m2d.contract.states import IllegalTransition

from .. import queue
from ..adapters.mlflow import MlflowAdmin
from ..adapters.slurm import SlurmError
from ..extensions import db
from . import lifecycle, scheduling
from .models import AccountEmail, User, utcnow

log = logging.getLogger(__name__)

# What a sign-up form may carry; longer is refused, not truncated.
LIMITS = {"name": 200, "email": 254, "affiliation": 200, "intended_use": 2000, "password": 256}
MIN_PASSWORD = 12


class AccountError(ValueError):
    pass


def create_user(email, name, password=None, is_admin=False):
    email = email.strip().lower()
    if len(email) > LIMITS["email"] or not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", email):
        raise AccountError(f"'{email[:LIMITS['email']]}' is not an email address.")
    if len(name) > LIMITS["name"]:
        raise AccountError(f"A name has at most {LIMITS['name']} characters.")
    if User.query.filter_by(email=email).first():
        raise AccountError(f"A user with the email {email} already exists.")
    user = User(email=email, name=name.strip() or email, is_admin=is_admin)
    if password:
        user.set_password(password)
    db.session.add(user)
    db.session.commit()
    return user


def approve(user, notify=False):
    """Approve ``user`` and give them an MLflow account and experiment, and
    a Slurm account (their jobs' fair share and limits).

    Safe to repeat: provisioning completes whatever is missing and returns
    the current password. ``notify``: email the user (once) that they may
    log in (the admin pages do; the command line does not).
    """
    if not user.mlflow_username:
        user.mlflow_username = mlflow_username_for(user)
        db.session.commit()
    account = MlflowAdmin.from_config(current_app.config).provision(user.mlflow_username, dry_run=True)
    slurm_account(user)
    user.mlflow_password = account.password
    user.mlflow_experiment_id = account.experiment_id
    user.mlflow_dry_run_experiment_id = account.dry_run_experiment_id
    first = user.approved_at is None
    user.approved_at = user.approved_at or utcnow()
    user.email_verified_at = user.email_verified_at or user.approved_at
    user.rejected_at = user.rejection_reason = None
    db.session.commit()
    if first and notify:
        owe_email(user, "approved", f"approved-{user.id}")
    return user


def mlflow_username_for(user):
    # readable and unique: the email's local part plus the user id
    local = re.sub(r"[^a-z0-9]+", "-", user.email.split("@")[0].lower()).strip("-") or "user"
    return f"{local}-{user.id}"


def slurm_account(user):
    """The user's Slurm account (``m2d-<mlflow user>``), made if missing (one
    sacctmgr query when it exists); None while SLURM_ACCOUNTS is off.

    Called at approval and before every sbatch, so users approved before
    accounts existed, or whose account an admin removed, get one again."""
    found = _slurm(user)
    if found is None:
        return None
    slurm, name = found
    if slurm.ensure(name):
        log.info("Slurm account %s made for user %s", name, user.id)
        if user.disabled_at:
            slurm.disable(name)
    return name


def _slurm(user):
    """(the accounting adapter, the user's account name), or None when off."""
    if not current_app.config["SLURM_ACCOUNTS"]:
        return None
    slurm = scheduling.accounts()
    return slurm, slurm.name_for(user.mlflow_username or mlflow_username_for(user))


def find(email):
    user = User.query.filter_by(email=email.strip().lower()).first()
    if user is None:
        raise AccountError(f"No user with the email {email}.")
    return user


# ------------------------------------------------------------------ sign-up

@dataclass
class Application:
    """What the sign-up form carries, checked."""
    name: str
    email: str
    affiliation: str
    intended_use: str
    password: str

    @classmethod
    def from_form(cls, form):
        """The form's fields, or AccountError naming the first thing to fix."""
        values = {key: (form.get(key) or "") for key in LIMITS}
        for key in ("name", "email", "affiliation", "intended_use"):
            values[key] = values[key].strip()
        labels = {"name": "Your name", "email": "Your email", "affiliation": "Your affiliation",
                  "intended_use": "The intended use", "password": "The password"}
        for key, limit in LIMITS.items():
            if not values[key]:
                raise AccountError(f"{labels[key]} is missing.")
            if len(values[key]) > limit:
                raise AccountError(f"{labels[key]} has at most {limit} characters.")
        if len(values["password"]) < MIN_PASSWORD:
            raise AccountError(f"Choose a password of at least {MIN_PASSWORD} characters.")
        values["email"] = values["email"].lower()
        if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", values["email"]):
            raise AccountError("That is not an email address.")
        return cls(**values)


def apply(application):
    """Record a sign-up and owe its verification email.

    An address already registered gets no second account and no error: the
    page says the same either way, so nobody learns who has an account."""
    if User.query.filter_by(email=application.email).first():
        User(password_hash=None).set_password(application.password)  # same work, same time
        log.info("sign-up for an address already registered")
        return None
    user = User(email=application.email, name=application.name, affiliation=application.affiliation,
                intended_use=application.intended_use)
    user.set_password(application.password)
    db.session.add(user)
    try:
        db.session.commit()
    except IntegrityError:  # the same address, twice at once
        db.session.rollback()
        return None
    owe_email(user, "verify", f"verify-{user.id}")
    return user


# ---------------------------------------------------- links sent by email
# Signed (itsdangerous, with the app's secret key), expiring, and single use:
# each names a fact the first use changes (the address not yet verified, the
# password hash), so a second use finds the link spent.

def _serializer(purpose):
    return URLSafeTimedSerializer(current_app.config["SECRET_KEY"], salt=f"m2d-{purpose}")


def _fingerprint(user):
    return hashlib.sha256(f"{user.email}|{user.password_hash}".encode()).hexdigest()[:20]


def verification_token(user):
    return _serializer("verify").dumps({"u": user.id, "e": user.email})


def reset_token(user):
    return _serializer("reset").dumps({"u": user.id, "f": _fingerprint(user)})


class LinkError(AccountError):
    pass


def verify_email(token):
    """Mark the address verified; the user waits for approval after."""
    data = _load("verify", token, current_app.config["VERIFY_MAX_AGE"])
    user = db.session.get(User, data.get("u"))
    if user is None or user.email != data.get("e") or user.email_verified_at:
        raise LinkError("This link has been used already. Log in, or sign up again.")
    user.email_verified_at = utcnow()
    db.session.commit()
    return user


def user_for_reset(token):
    data = _load("reset", token, current_app.config["RESET_MAX_AGE"])
    user = db.session.get(User, data.get("u"))
    if user is None or _fingerprint(user) != data.get("f"):
        raise LinkError("This link has been used already. Ask for a new one.")
    return user


def _load(purpose, token, max_age):
    try:
        data = _serializer(purpose).loads(token, max_age=max_age)
    except SignatureExpired:
        raise LinkError("This link has expired. Ask for a new one.") from None
    except BadSignature:
        raise LinkError("This link is not valid. Copy the whole link from the email.") from None
    if not isinstance(data, dict):
        raise LinkError("This link is not valid.")
    return data


def request_reset(email):
    """Owe a reset email if ``email`` has an account that can log in; says
    nothing either way (the page shows the same message)."""
    user = User.query.filter_by(email=(email or "").strip().lower()[:LIMITS["email"]]).first()
    if user is None or not user.password_hash or not user.is_active:
        return None
    owe_email(user, "reset", f"reset-{user.id}-{random.token_hex(8)}")
    return user


def set_password(user, password):
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"Choose a password of at least {MIN_PASSWORD} characters.")
    if len(password) > LIMITS["password"]:
        raise AccountError(f"A password has at most {LIMITS['password']} characters.")
    user.set_password(password)
    db.session.commit()


# ------------------------------------------------------------- admin acts

def reject(user, reason):
    reason = (reason or "").strip()
    if not reason:
        raise AccountError("Give the applicant a reason.")
    if len(reason) > 2000:
        raise AccountError("A reason has at most 2000 characters.")
    if user.approved:
        raise AccountError(f"{user.email} is approved already; disable the account instead.")
    user.rejected_at, user.rejection_reason = utcnow(), reason
    db.session.commit()
    owe_email(user, "rejected", f"rejected-{user.id}-{user.rejected_at:%Y%m%d%H%M%S%f}")


def disable(user):
    """A disabled user cannot log in, submit or use a token; what they have
    waiting or running is cancelled. Returns how many were cancelled.

    First Slurm stops their account's waiting jobs from starting (its
    history stays), so none starts while the cancels are on their way."""
    user.disabled_at = user.disabled_at or utcnow()
    db.session.commit()
    if user.mlflow_username and (found := _slurm(user)):
        slurm, name = found
        try:
            slurm.ensure(name)
            slurm.disable(name)
        except SlurmError:  # the cancels below still stop the jobs
            log.exception("could not disable Slurm account %s", name)
    cancelled = 0
    # waiting ones first: a running job's end frees its slot, and a queued job
    # of the account could start in it before the new limit reaches slurmctld
    for submission in sorted(user.submissions, key=lambda s: s.status == "running"):
        if submission.state.terminal:
            continue
        try:
            lifecycle.cancel(submission, by="an admin (account disabled)")
        except IllegalTransition:
            continue  # it ended meanwhile
        cancelled += 1
    return cancelled


def enable(user):
    """Lift a disable; the Slurm account gets the configured limits again."""
    if user.mlflow_username and (found := _slurm(user)):
        slurm, name = found
        slurm.ensure(name)
        slurm.set_limits(name)
    user.disabled_at = None
    db.session.commit()


# ---------------------------------------------------------------- emails

def owe_email(user, kind, key):
    """Write the email's row (its key makes it owed once), then queue it."""
    row = AccountEmail(user_id=user.id, kind=kind, key=key)
    db.session.add(row)
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        return None
    enqueue(row.id)
    return row


def enqueue(email_id):
    # through the gateway's outbound port, like a submission's emails
    queue._enqueue("mail", "jobs.tasks.send_account_mail", email_id, skip_if=queue.PENDING,
                   retry=Retry(max=5, interval=[5, 15, 60, 300, 900]))
