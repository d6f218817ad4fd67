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

from gateway.adapters.smtp import Mailer
from gateway.extensions import db
from gateway.models import Email, utcnow
from gateway.templating import render as render_template

log = logging.getLogger(__name__)

# a claim older than this belongs to a sender that died mid-way
STALE_CLAIM = timedelta(minutes=10)


class TemplateError(Exception):
    pass


def render(email: Email) -> tuple[str, str]:
    """Subject and body for an owed email (template's first line is the subject)."""
    submission = email.submission
    text = render_template(
        f"mail/{email.kind}.txt",
        submission=submission, user=submission.user, event=email.event,
        url=f"{current_app.config['PUBLIC_URL'].rstrip('/')}/submissions/{submission.id}",
        at=format_datetime(email.event.at.replace(tzinfo=timezone.utc)),
    )
    first, _, body = text.partition("\n")
    if not first.startswith("Subject: "):
        raise TemplateError(f"template {email.kind}.txt must start with 'Subject: '")
    return first.removeprefix("Subject: ").strip(), body.lstrip("\n")


def send_owed(submission_id: int, mailer: Mailer | None = None) -> int:
    """Send this submission's owed emails in order; returns how many were sent."""
    mailer = mailer or Mailer.from_config(current_app.config)
    sent = 0
    owed = (Email.query.filter_by(submission_id=submission_id, sent_at=None)
            .order_by(Email.id).all())
    for email in owed:
        if not _claim(email.id):
            break  # another sender holds it; it will send the rest in order
        try:
            subject, body = render(email)
            mailer.send(email.submission.user.email, subject, body,
                        message_id=f"<m2d-{submission_id}-{email.kind}@{socket.getfqdn()}>")
        except Exception as e:
            _release(email.id, str(e))
            raise
        _mark_sent(email.id)
        sent += 1
    return sent


def _claim(email_id):
    now = utcnow()
    result = db.session.execute(
        update(Email)
        .where(Email.id == email_id, Email.sent_at.is_(None),
               or_(Email.claimed_at.is_(None), Email.claimed_at < now - STALE_CLAIM))
        .values(claimed_at=now, attempts=Email.attempts + 1)
        .execution_options(synchronize_session=False))
    db.session.commit()
    return result.rowcount == 1


def _release(email_id, error):
    db.session.rollback()
    db.session.execute(update(Email).where(Email.id == email_id)
                       .values(claimed_at=None, last_error=error[:2000])
                       .execution_options(synchronize_session=False))
    db.session.commit()
    log.warning("email %s not sent: %s", email_id, error)


def _mark_sent(email_id):
    db.session.execute(update(Email).where(Email.id == email_id)
                       .values(sent_at=utcnow(), last_error=None)
                       .execution_options(synchronize_session=False))
    db.session.commit()
