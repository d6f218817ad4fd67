"""A local SMTP server that keeps every message it receives as a file.

The testbed's mail relay: the gateway sends its emails here, and tests read
them back from the mail folder.  Each message is written exactly as received
(raw bytes of the DATA section) to ``<UTC timestamp>-<counter>.eml``, so that
sorting the names gives the order of arrival.  A file appears whole or not at
all: it is written under a hidden temporary name and then renamed.

    python smtp_sink.py --dir /opt/testbed/mail [--host 127.0.0.1] [--port 8025]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session


class MailDirHandler:
    """aiosmtpd handler: one .eml file per message in ``mail_dir``."""

    def __init__(self, mail_dir: Path):
        self.mail_dir = Path(mail_dir)
        self.mail_dir.mkdir(parents=True, exist_ok=True)
        self._counter = itertools.count(1)
        self._last_stamp = ""

    def _next_name(self) -> str:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        # Should the clock step back, keep names ascending anyway.
        if stamp < self._last_stamp:
            stamp = self._last_stamp
        self._last_stamp = stamp
        return f"{stamp}-{next(self._counter):06d}.eml"

    def save(self, raw: bytes) -> Path:
        name = self._next_name()
        final = self.mail_dir / name
        tmp = self.mail_dir / f".{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        return final

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):  # only with decode_data=True, which we do not use
            raw = raw.encode("utf-8", "surrogateescape")
        self.save(raw)
        return "250 Message accepted for delivery"


async def serve(mail_dir: Path, host: str = "127.0.0.1", port: int = 8025) -> None:
    """Serve until SIGTERM or SIGINT."""
    handler = MailDirHandler(mail_dir)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, enable_SMTPUTF8=True, hostname="testbed-smtp-sink"),
        host=host,
        port=port,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"smtp_sink: listening on {host}:{port}, writing to {handler.mail_dir}", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, type=Path, help="folder for the .eml files")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", default=8025, type=int)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.dir, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
