"""Status emails: rendering, and sending what is owed, once (through the SMTP adapter).

An email is owed when its row exists (written with the status change). A
sender claims the row before sending and marks it sent after, so retries and
racing workers never send it twice. Emails of one submission go out in the
order they were owed: a sender stops at a row someone else holds.
"""
import logging
import socket
from datetime import timedelta, timezone
from email.utils import format_datetime

from flask import current_app
from sqlalchemy import or_, update

from gateway import metrics
from gateway.adapters.smtp import Mailer
from gateway.core import accounts
from gateway.core.airlock import deletion_due
from gateway.core.models import AccountEmail, Email, Export, utcnow
from gateway.core.templating import render as render_template
from gateway.extensions import db

log = logging.getLogger(__name__)


class TemplateError(Exception):
    pass


def render(email: Email) -> tuple[str, str]:
    """Subject and body for an owed email (template's first line is the subject)."""
    submission = email.submission
    public = current_app.config["PUBLIC_URL"].rstrip("/")
    # airlock emails (gateway.core.airlock) have no event: their moment is their row's
    when = email.event.at if email.event else email.created_at
    text = render_template(
        f"mail/{email.kind}.txt",
        submission=submission, user=submission.user, event=email.event,
        url=f"{public}/submissions/{submission.id}",
        at=format_datetime(when.replace(tzinfo=timezone.utc)),
        request=email.release_request, alert=email.alert, public_url=public, **_airlock_values(email),
    )
    first, _, body = text.partition("\n")
    if not first.startswith("Subject: "):
        raise TemplateError(f"template {email.kind}.txt must start with 'Subject: '")
    return first.removeprefix("Subject: ").strip(), body.lstrip("\n")


def _airlock_values(email: Email) -> dict:
    if email.kind != "export_expiring":
        return {}
    export = db.session.get(Export, email.submission_id)
    return {"deletion": f"{deletion_due(export):%Y-%m-%d}", "export": export}


def send_owed(submission_id: int, mailer: Mailer | None = None) -> int:
    """Send this submission's owed emails in order; returns how many were sent."""
    mailer = mailer or Mailer.from_config(current_app.config)
    sent = 0
    owed = (Email.query.filter_by(submission_id=submission_id, sent_at=None)
            .order_by(Email.id).all())
    for email in owed:
        if not _claim(email.id):
            break  # another sender holds it; it will send the rest in order
        _send_claimed(mailer, email, email.to_address, render, email.kind)
        metrics.EMAIL_LAG_SECONDS.observe((utcnow() - email.created_at).total_seconds())
        sent += 1
    return sent


def _send_claimed(mailer: Mailer, email: Email | AccountEmail, to: str, rendered, kind: str) -> None:
    """Send one claimed email and mark it sent the moment the server took it.

    Dying between the server's acceptance and that mark is the one way an
    email goes out twice (its claim expires, MAIL_CLAIM_SECONDS, and it is
    sent again with the same Message-ID); failing before acceptance releases
    the claim for the next try, failing after it (the goodbye) keeps it sent."""
    email_id, model, marked = email.id, type(email), []

    def accepted():
        _mark_sent(email_id, model)
        marked.append(True)
    try:
        subject, body = rendered(email)
        mailer.send(to, subject, body, message_id=message_id(email), accepted=accepted)
    except Exception as e:
        if not marked:
            _release(email_id, str(e), model)
            metrics.EMAILS_FAILED.inc(kind=kind)
            raise
        log.warning("email %s was taken by the server; its goodbye failed: %s", email_id, e)
    metrics.EMAILS_SENT.inc(kind=kind)


def message_id(email: Email | AccountEmail) -> str:
    """The Message-ID of one owed email: the same on every try, so a receiver
    (and the fault tests) can tell a resend from a new message."""
    if isinstance(email, AccountEmail):
        return f"<m2d-account-{email.key}@{socket.getfqdn()}>"
    # status emails keep their old ids; airlock ones and alerts are many per kind
    unique = f"-{email.id}" if email.ref or email.recipient else ""
    return f"<m2d-{email.submission_id}-{email.kind}{unique}@{socket.getfqdn()}>"


def render_account(email: AccountEmail) -> tuple[str, str]:
    """Subject and body of an email about an account. Its link (verification,
    reset) is signed at sending time; it expires from then."""
    base = current_app.config["PUBLIC_URL"].rstrip("/")
    links = {"verify": lambda u: f"{base}/verify/{accounts.verification_token(u)}",
             "reset": lambda u: f"{base}/reset/{accounts.reset_token(u)}"}
    user = email.user
    text = render_template(
        f"mail/account_{email.kind}.txt", user=user, base=base,
        platform=current_app.config["PLATFORM_NAME"],
        link=links[email.kind](user) if email.kind in links else None,
        hours=lambda seconds: max(1, round(seconds / 3600)), config=current_app.config)
    first, _, body = text.partition("\n")
    if not first.startswith("Subject: "):
        raise TemplateError(f"template account_{email.kind}.txt must start with 'Subject: '")
    return first.removeprefix("Subject: ").strip(), body.lstrip("\n")


def send_account(email_id: int, mailer: Mailer | None = None) -> bool:
    """Send one email about an account, once; False if it was sent or is
    being sent already."""
    email = db.session.get(AccountEmail, email_id)
    if email is None or email.sent_at is not None or not _claim(email_id, AccountEmail):
        return False
    mailer = mailer or Mailer.from_config(current_app.config)
    _send_claimed(mailer, email, email.user.email, render_account, f"account_{email.kind}")
    return True


def _claim(email_id, model=Email):
    now = utcnow()
    # a claim older than MAIL_CLAIM_SECONDS belongs to a sender that died mid-way
    stale = now - timedelta(seconds=current_app.config["MAIL_CLAIM_SECONDS"])
    result = db.session.execute(
        update(model)
        .where(model.id == email_id, model.sent_at.is_(None),
               or_(model.claimed_at.is_(None), model.claimed_at < stale))
        .values(claimed_at=now, attempts=model.attempts + 1)
        .execution_options(synchronize_session=False))
    db.session.commit()
    return result.rowcount == 1


def _release(email_id, error, model=Email):
    db.session.rollback()
    db.session.execute(update(model).where(model.id == email_id)
                       .values(claimed_at=None, last_error=error[:2000])
                       .execution_options(synchronize_session=False))
    db.session.commit()
    log.warning("email %s not sent: %s", email_id, error)


def _mark_sent(email_id, model=Email):
    db.session.execute(update(model).where(model.id == email_id)
                       .values(sent_at=utcnow(), last_error=None)
                       .execution_options(synchronize_session=False))
    db.session.commit()
