"""Database models: the only truth about users, submissions and their emails."""
import hashlib
import json
import secrets
from datetime import datetime, timezone

from flask_login import UserMixin
from sqlalchemy import Index, UniqueConstraint
from werkzeug.security import check_password_hash, generate_password_hash

from m2d.contract.states import Status

from .. import secrets as sealed
from ..extensions import db


def utcnow():
    return datetime.now(timezone.utc).replace(tzinfo=None)  # stored as naive UTC


class User(UserMixin, db.Model):
    id = db.Column(db.Integer, primary_key=True)
    email = db.Column(db.String(255), unique=True, nullable=False)
    name = db.Column(db.String(255), nullable=False)
    password_hash = db.Column(db.String(255))
    is_admin = db.Column(db.Boolean, nullable=False, default=False)
    # may approve or reject the release of exported files (gateway.core.airlock)
    is_reviewer = db.Column(db.Boolean, nullable=False, default=False, server_default="0")
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow)
    approved_at = db.Column(db.DateTime)
    # The MLflow password is shown to the user on their account page and given
    # to their jobs, so it is kept (never logged): MLflow has no way to read a
    # password back. Only its ciphertext is stored; see mlflow_password.
    mlflow_username = db.Column(db.String(255), unique=True)
    mlflow_password_encrypted = db.Column(db.String(255))
    mlflow_experiment_id = db.Column(db.String(64))
    # the dry run's experiment, "<experiment>-dryrun" (made at approval, or
    # at the first dry run of a user approved before dry runs existed)
    mlflow_dry_run_experiment_id = db.Column(db.String(64))
    # an admin's exception: this researcher's submissions skip the dry run
    # (flask --app gateway users dry-run EMAIL --skip)
    skip_dry_run = db.Column(db.Boolean, nullable=False, default=False, server_default="0")
    # the web portal's sign-up, approval and admin actions (gateway.core.accounts)
    affiliation = db.Column(db.String(200), nullable=False, default="", server_default="")
    intended_use = db.Column(db.Text, nullable=False, default="", server_default="")
    email_verified_at = db.Column(db.DateTime)
    rejected_at = db.Column(db.DateTime)
    rejection_reason = db.Column(db.Text)
    disabled_at = db.Column(db.DateTime)

    submissions = db.relationship("Submission", back_populates="user", lazy="dynamic")

    @property
    def approved(self):
        return self.approved_at is not None

    @property
    def disabled(self):
        return self.disabled_at is not None

    @property
    def is_active(self):  # flask-login: only approved, enabled users log in or use tokens
        return self.approved and not self.disabled

    @property
    def account_state(self):
        """One word for the admin pages: where the account stands."""
        if self.disabled:
            return "disabled"
        if self.approved:
            return "approved"
        if self.rejected_at:
            return "rejected"
        return "pending" if self.email_verified_at else "unverified"

    def get_id(self):
        # The session names the password too: changing it ends every other
        # session and every "remember me" cookie (gateway.web.auth.load_user).
        return f"{self.id}.{self.session_stamp}"

    @property
    def session_stamp(self):
        return hashlib.sha256((self.password_hash or "").encode()).hexdigest()[:16]

    @property
    def mlflow_password(self):
        return sealed.decrypt(self.mlflow_password_encrypted)

    @mlflow_password.setter
    def mlflow_password(self, plain):
        self.mlflow_password_encrypted = sealed.encrypt(plain)

    def set_password(self, password):
        self.password_hash = generate_password_hash(password)

    def check_password(self, password):
        return bool(self.password_hash) and check_password_hash(self.password_hash, password)


class ApiToken(db.Model):
    id = db.Column(db.Integer, primary_key=True)
    user_id = db.Column(db.Integer, db.ForeignKey("user.id"), nullable=False, index=True)
    # only the hash is kept: a leaked database does not leak tokens
    token_hash = db.Column(db.String(64), unique=True, nullable=False)
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow)
    last_used_at = db.Column(db.DateTime)
    name = db.Column(db.String(100), nullable=False, default="", server_default="")
    revoked_at = db.Column(db.DateTime)

    user = db.relationship("User")

    @staticmethod
    def hash(token):
        return hashlib.sha256(token.encode()).hexdigest()

    @classmethod
    def issue(cls, user, name=""):
        token = "m2d_" + secrets.token_urlsafe(32)
        db.session.add(cls(user=user, token_hash=cls.hash(token), name=name))
        return token


class Submission(db.Model):
    # the daily quota counts a user's recent uploads
    __table_args__ = (Index("ix_submission_user_id_created_at", "user_id", "created_at"),)
    id = db.Column(db.Integer, primary_key=True)
    user_id = db.Column(db.Integer, db.ForeignKey("user.id"), nullable=False, index=True)
    status = db.Column(db.String(20), nullable=False, default=Status.RECEIVED.value, index=True)
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow)
    updated_at = db.Column(db.DateTime, nullable=False, default=utcnow)
    filename = db.Column(db.String(255))
    zip_sha256 = db.Column(db.String(64))
    env_key = db.Column(db.String(64))
    image_digest = db.Column(db.String(80))
    slurm_job_id = db.Column(db.String(32), index=True)
    exit_code = db.Column(db.Integer)
    reason = db.Column(db.String(255))  # why it failed: "exit code 1", "TIMEOUT", ...
    error = db.Column(db.Text)  # pip's error or the tail of stderr
    # the version of the dataset its jobs ran on (DATASET_VERSION when it first
    # went to Slurm): the real data's, and its twin's in the dry run
    dataset_version = db.Column(db.String(64))
    # the dry run on the synthetic twin (jobs.poller): its job, its outcome
    # and its whole log (no real data was involved, so nothing is hidden)
    dry_run_job_id = db.Column(db.String(32), index=True)
    dry_run_exit_code = db.Column(db.Integer)
    dry_run_reason = db.Column(db.String(255))
    dry_run_log = db.Column(db.Text)
    # what it left in export-dryrun/, read once when it ended (gateway.core.jobfiles):
    # JSON, a list of {path, size, text}; the API never opens the folder
    dry_run_files = db.Column(db.Text)
    # prepares that failed for a reason other than Slurm (gateway.core.alerts):
    # the sweep tries again after a growing pause, then the submission fails
    prepare_failures = db.Column(db.Integer, nullable=False, default=0, server_default="0")
    prepare_failed_at = db.Column(db.DateTime)
    prepare_error = db.Column(db.Text)

    user = db.relationship("User", back_populates="submissions")
    events = db.relationship("Event", order_by="Event.id", lazy="selectin")

    @property
    def state(self):
        return Status(self.status)

    @classmethod
    def of(cls, user, submission_id):
        """``user``'s submission, or None: another's looks exactly like a missing one."""
        return cls.query.filter_by(id=submission_id, user_id=user.id).first()

    def to_dict(self):
        return {
            "id": self.id,
            "status": self.status,
            "filename": self.filename,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "zip_sha256": self.zip_sha256,
            "image_digest": self.image_digest,
            "dataset_version": self.dataset_version,
            "slurm_job_id": self.slurm_job_id,
            "exit_code": self.exit_code,
            "reason": self.reason,
            "error": self.error,
            "events": [e.to_dict() for e in self.events],
            "dry_run": self.dry_run_dict(),
        }

    def dry_run_dict(self):
        """The dry run as the researcher sees it: everything (fake data only)."""
        if not (self.dry_run_job_id or self.status.startswith("dry_run")):
            return None
        export = self.dry_run_export()
        found = {"slurm_job_id": self.dry_run_job_id, "exit_code": self.dry_run_exit_code,
                 "reason": self.dry_run_reason, "log": self.dry_run_log, "export": export,
                 "headline": None, "hint": None}
        if self.status == Status.DRY_RUN_FAILED.value:
            found.update(self._dry_run_failure(export))
        return found

    def _dry_run_failure(self, export):
        """What ended the failed dry run: the last exception in its log, else in
        a text file it left in export-dryrun/ (code that sends its own stderr
        there), and what to change when it named what the platform sets."""
        from flask import current_app

        from .failures import headline, hint
        line = headline(self.dry_run_log)
        for f in export:
            line = line or headline(f["text"])
        return {"headline": line, "hint": hint(line, current_app.config["MLFLOW_PUBLIC_URL"])}

    def dry_run_export(self) -> list[dict]:
        """The files the dry run left in export-dryrun/ (path, size, the text of
        small text files), as read when it ended; [] before that."""
        return json.loads(self.dry_run_files) if self.dry_run_files else []


class Event(db.Model):
    """One row per status change: the submission's history."""
    id = db.Column(db.Integer, primary_key=True)
    submission_id = db.Column(db.Integer, db.ForeignKey("submission.id"), nullable=False, index=True)
    status = db.Column(db.String(20), nullable=False)
    # when it happened (Slurm's own start/end time where known) and when we saw it
    at = db.Column(db.DateTime, nullable=False, default=utcnow)
    recorded_at = db.Column(db.DateTime, nullable=False, default=utcnow)
    detail = db.Column(db.Text)

    def to_dict(self):
        return {"status": self.status, "at": _iso(self.at), "recorded_at": _iso(self.recorded_at),
                "detail": self.detail}


class Delivery:
    """What jobs.mail's claim/send protocol keeps on every email it owes:
    claimed before sending, marked sent after, released with the error."""
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow)
    claimed_at = db.Column(db.DateTime)
    sent_at = db.Column(db.DateTime)
    attempts = db.Column(db.Integer, nullable=False, default=0)
    last_error = db.Column(db.Text)


class Email(Delivery, db.Model):
    """An email owed to the user; written in the same transaction as the
    status change, sent (once) by a worker.

    Status emails go to the submission's owner, one per kind. Airlock emails
    (gateway.core.airlock) name what they are about in ``ref`` ("request-3") and
    may go to someone else (``recipient``, a reviewer); both are "" otherwise,
    never NULL, so that the unique constraint guards every row."""
    __table_args__ = (UniqueConstraint("submission_id", "kind", "ref", "recipient",
                                       name="uq_email_submission_id_kind_ref_recipient"),)
    id = db.Column(db.Integer, primary_key=True)
    submission_id = db.Column(db.Integer, db.ForeignKey("submission.id"), nullable=False, index=True)
    event_id = db.Column(db.Integer, db.ForeignKey("event.id"))  # status emails only
    kind = db.Column(db.String(20), nullable=False)
    ref = db.Column(db.String(64), nullable=False, default="", server_default="")
    recipient = db.Column(db.String(255), nullable=False, default="", server_default="")  # "": the owner
    release_request_id = db.Column(db.Integer, db.ForeignKey("release_request.id"))
    alert_id = db.Column(db.Integer, db.ForeignKey("alert.id"))  # the admins' alerts (gateway.core.alerts)

    submission = db.relationship("Submission")
    event = db.relationship("Event")
    release_request = db.relationship("ReleaseRequest")
    alert = db.relationship("Alert")

    @property
    def to_address(self):
        return self.recipient or self.submission.user.email


class AccountEmail(Delivery, db.Model):
    """An email about an account (verification, approval, rejection, password
    reset), owed once its row exists and sent once by jobs.mail, like Email.

    ``key`` names the one email ("approved-7", "reset-7-<nonce>"): writing the
    same key twice is refused by the database, so no action owes it twice."""
    id = db.Column(db.Integer, primary_key=True)
    user_id = db.Column(db.Integer, db.ForeignKey("user.id"), nullable=False, index=True)
    kind = db.Column(db.String(20), nullable=False)  # verify | approved | rejected | reset
    key = db.Column(db.String(100), nullable=False, unique=True)

    user = db.relationship("User")


class Alert(db.Model):
    """Something the admins must look at (gateway.core.alerts): a submission stuck
    in one status (``stuck``), or one whose prepare kept failing
    (``prepare_failed``). One per episode: the status and the moment the
    submission entered it (``since``, its updated_at then), so a second poller
    or a later cycle finds the row and raises nothing more."""
    __table_args__ = (UniqueConstraint("submission_id", "kind", "since", name="uq_alert_submission_id_kind_since"),)
    id = db.Column(db.Integer, primary_key=True)
    submission_id = db.Column(db.Integer, db.ForeignKey("submission.id"), nullable=False, index=True)
    kind = db.Column(db.String(20), nullable=False)  # stuck | prepare_failed
    status = db.Column(db.String(20), nullable=False)
    since = db.Column(db.DateTime, nullable=False)
    raised_at = db.Column(db.DateTime, nullable=False, default=utcnow)
    detail = db.Column(db.Text, nullable=False, default="")

    submission = db.relationship("Submission")

    @property
    def open(self) -> bool:
        """Still true: the submission has not moved since."""
        return self.submission.status == self.status and self.submission.updated_at == self.since


class Build(db.Model):
    """One row per environment image actually built (reuse writes none)."""
    id = db.Column(db.Integer, primary_key=True)
    env_key = db.Column(db.String(64), nullable=False, index=True)
    submission_id = db.Column(db.Integer, db.ForeignKey("submission.id"))
    succeeded = db.Column(db.Boolean, nullable=False)
    image_digest = db.Column(db.String(80))
    seconds = db.Column(db.Float)
    log = db.Column(db.Text)
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow)


# ------------------------------------------------------------------ the airlock
# (gateway.core.airlock has the rules; gateway.core.provenance the chain)

class Export(db.Model):
    """A submission's export folder once its job ended: when its manifest was
    taken, its warning sent, its files deleted."""
    submission_id = db.Column(db.Integer, db.ForeignKey("submission.id"), primary_key=True)
    manifest_at = db.Column(db.DateTime)
    total_bytes = db.Column(db.BigInteger)
    # why it could not be read (too many files, too deep, too slow): then no file is listed
    error = db.Column(db.Text)
    warned_at = db.Column(db.DateTime)  # retention: "deleted in 7 days"
    purged_at = db.Column(db.DateTime)

    submission = db.relationship("Submission")
    files = db.relationship("ExportFile", order_by="ExportFile.path", lazy="selectin")


class ExportFile(db.Model):
    """One file of the manifest: what the job left, hashed once it ended."""
    __table_args__ = (UniqueConstraint("submission_id", "path"),)
    id = db.Column(db.Integer, primary_key=True)
    submission_id = db.Column(db.Integer, db.ForeignKey("export.submission_id"), nullable=False, index=True)
    path = db.Column(db.String(1024), nullable=False)  # relative, "/"-separated
    size = db.Column(db.BigInteger, nullable=False)
    sha256 = db.Column(db.String(64))  # None: the gateway could not read it (never released)
    # why it can never be released (unreadable, a name too long to keep); None: it can
    note = db.Column(db.String(255))

    def to_dict(self, released=False):
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "released": released,
                "note": self.note}


class ReleaseRequest(db.Model):
    """A researcher's request to release some export files, with a reason."""
    id = db.Column(db.Integer, primary_key=True)
    submission_id = db.Column(db.Integer, db.ForeignKey("submission.id"), nullable=False, index=True)
    requester_id = db.Column(db.Integer, db.ForeignKey("user.id"), nullable=False)
    justification = db.Column(db.Text, nullable=False)
    # pending -> released | rejected | partly_released (once every file is decided)
    status = db.Column(db.String(20), nullable=False, default="pending", index=True)
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow)
    decided_at = db.Column(db.DateTime)

    submission = db.relationship("Submission")
    requester = db.relationship("User")
    items = db.relationship("ReleaseItem", order_by="ReleaseItem.id", lazy="selectin",
                            back_populates="request")

    def to_dict(self):
        return {"id": self.id, "submission_id": self.submission_id, "status": self.status,
                "justification": self.justification, "created_at": _iso(self.created_at),
                "decided_at": _iso(self.decided_at), "files": [i.to_dict() for i in self.items]}


class ReleaseItem(db.Model):
    """One file of a request, and its fate."""
    id = db.Column(db.Integer, primary_key=True)
    request_id = db.Column(db.Integer, db.ForeignKey("release_request.id"), nullable=False, index=True)
    file_id = db.Column(db.Integer, db.ForeignKey("export_file.id"), nullable=False, index=True)
    # pending -> released | rejected; changed: its bytes no longer match the
    # manifest; expired: deleted by retention before a decision
    status = db.Column(db.String(20), nullable=False, default="pending")
    released_at = db.Column(db.DateTime)
    expires_at = db.Column(db.DateTime)  # released: downloadable until then
    purged_at = db.Column(db.DateTime)

    request = db.relationship("ReleaseRequest", back_populates="items")
    file = db.relationship("ExportFile", lazy="joined")
    reviews = db.relationship("Review", order_by="Review.id", lazy="selectin")

    def to_dict(self):
        return {"path": self.file.path, "size": self.file.size, "sha256": self.file.sha256,
                "status": self.status, "released_at": _iso(self.released_at),
                "expires_at": _iso(self.expires_at), "purged": self.purged_at is not None,
                "reviews": [r.to_dict() for r in self.reviews]}


class Review(db.Model):
    """One reviewer's decision on one file; one per reviewer and file."""
    __table_args__ = (UniqueConstraint("item_id", "reviewer_id"),)
    id = db.Column(db.Integer, primary_key=True)
    item_id = db.Column(db.Integer, db.ForeignKey("release_item.id"), nullable=False, index=True)
    reviewer_id = db.Column(db.Integer, db.ForeignKey("user.id"), nullable=False)
    decision = db.Column(db.String(10), nullable=False)  # approve | reject
    comment = db.Column(db.Text, nullable=False, default="")
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow)

    reviewer = db.relationship("User")

    def to_dict(self):
        return {"reviewer": self.reviewer.name, "decision": self.decision, "comment": self.comment,
                "at": _iso(self.created_at)}


class ProvenanceRecord(db.Model):
    """One link of a submission's hash chain (gateway.core.provenance): append-only."""
    __table_args__ = (UniqueConstraint("submission_id", "seq"),)
    id = db.Column(db.Integer, primary_key=True)
    submission_id = db.Column(db.Integer, db.ForeignKey("submission.id"), nullable=False, index=True)
    seq = db.Column(db.Integer, nullable=False)
    kind = db.Column(db.String(40), nullable=False)
    at = db.Column(db.DateTime, nullable=False, default=utcnow)
    payload = db.Column(db.Text, nullable=False)  # canonical JSON
    prev_hash = db.Column(db.String(64), nullable=False)
    hash = db.Column(db.String(64), nullable=False)


def _iso(dt):
    return dt.replace(tzinfo=timezone.utc).isoformat() if dt else None
