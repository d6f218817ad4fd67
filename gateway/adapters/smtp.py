"""The SMTP adapter: the only code that talks to the mail server."""
from __future__ import annotations

import smtplib
from collections.abc import Callable, Mapping
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any


class MailError(Exception):
    """The mail server could not be reached or refused the message."""


class Mailer:
    def __init__(self, host: str, port: int, sender: str, timeout: float = 30) -> None:
        self.host, self.port, self.sender, self.timeout = host, port, sender, timeout

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Mailer:
        return cls(cfg["SMTP_HOST"], cfg["SMTP_PORT"], cfg["MAIL_FROM"], timeout=cfg["SMTP_TIMEOUT"])

    def send(self, to: str, subject: str, body: str, message_id: str | None = None,
             accepted: Callable[[], None] | None = None) -> None:
        """Hand one message to the server. ``accepted`` runs the moment the
        server has taken it, before the goodbye: a sender that records it
        there leaves the shortest window in which dying means sending twice."""
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = self.sender, to, subject
        message["Message-ID"] = message_id or make_msgid(domain="m2d.local")
        message.set_content(body)
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
                smtp.send_message(message)
                if accepted is not None:
                    accepted()
        except (OSError, smtplib.SMTPException) as e:
            raise MailError(f"could not send to {to} via {self.host}:{self.port}: {e}") from e

    def ping(self, timeout: float) -> str:
        """Whether the relay answers (greeting, NOOP) within ``timeout`` seconds."""
        try:
            with smtplib.SMTP(self.host, self.port, timeout=timeout) as smtp:
                code, _ = smtp.noop()
        except (OSError, smtplib.SMTPException) as e:
            raise MailError(f"{self.host}:{self.port}: {e}") from e
        if code != 250:
            raise MailError(f"{self.host}:{self.port} answered NOOP with {code}")
        return f"{self.host}:{self.port} answers"
