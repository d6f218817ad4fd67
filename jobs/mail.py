"""Status emails: rendering, the SMTP adapter, and sending what is owed, once.

An email is owed when its row exists (written with the status change). A
sender claims the row before sending and marks it sent after, so retries and
racing workers never send it twice. Emails of one submission go out in the
order they were owed: a sender stops at a row someone else holds.
"""
import logging
import smtplib
import socket
from datetime import timedelta, timezone
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

from flask import current_app
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from sqlalchemy import or_, update

from gateway.extensions import db
from gateway.models import Email, utcnow

log = logging.getLogger(__name__)

TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates" / "mail"),
    undefined=StrictUndefined, keep_trailing_newline=True,
)
# a claim older than this belongs to a sender that died mid-way
STALE_CLAIM = timedelta(minutes=10)


class MailError(Exception):
    pass


def render(email):
    """Subject and body for an owed email (template's first line is the subject)."""
    submission = email.submission
    text = TEMPLATES.get_template(f"{email.kind}.txt").render(
        submission=submission, user=submission.user, event=email.event,
        url=f"{current_app.config['PUBLIC_URL'].rstrip('/')}/submissions/{submission.id}",
        at=format_datetime(email.event.at.replace(tzinfo=timezone.utc)),
    )
    first, _, body = text.partition("\n")
    if not first.startswith("Subject: "):
        raise MailError(f"template {email.kind}.txt must start with 'Subject: '")
    return first.removeprefix("Subject: ").strip(), body.lstrip("\n")


class Mailer:
    """The SMTP adapter: the only code that talks to the mail server."""

    def __init__(self, host, port, sender, timeout=30):
        self.host, self.port, self.sender, self.timeout = host, int(port), sender, timeout

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg["SMTP_HOST"], cfg["SMTP_PORT"], cfg["MAIL_FROM"])

    def send(self, to, subject, body, message_id=None):
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = self.sender, to, subject
        message["Message-ID"] = message_id or make_msgid(domain="m2d.local")
        message.set_content(body)
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
                smtp.send_message(message)
        except (OSError, smtplib.SMTPException) as e:
            raise MailError(f"could not send to {to} via {self.host}:{self.port}: {e}") from e


def send_owed(submission_id, mailer=None):
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
