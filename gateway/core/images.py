"""Environment images' lifetime: those no submission used for IMAGE_GC_DAYS,
and that no submission still in flight runs in, are deleted. The database
says which images submissions use; the adapter's used-markers say when a
build last reused one (a build writes the submission's key only after)."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from flask import current_app
from sqlalchemy import func, select

from m2d.contract.states import TERMINAL

from ..adapters.apptainer import ImageBuilder
from ..extensions import db
from .models import Submission, utcnow

log = logging.getLogger(__name__)


def collect(dry_run: bool = False, days: float | None = None) -> dict:
    cfg = current_app.config
    period = timedelta(days=cfg["IMAGE_GC_DAYS"] if days is None else days)
    since = utcnow() - period
    active = set(db.session.scalars(select(Submission.env_key).where(
        Submission.env_key.is_not(None), Submission.status.not_in([s.value for s in TERMINAL]))))
    recent = set(db.session.scalars(select(Submission.env_key).where(Submission.env_key.is_not(None))
                                    .group_by(Submission.env_key)
                                    .having(func.max(Submission.created_at) >= since)))
    removed = ImageBuilder.from_config(cfg).collect(time.time() - period.total_seconds(), active | recent,
                                                    dry_run=dry_run)
    log.info("image gc: %s %d image(s)", "would delete" if dry_run else "deleted", len(removed))
    return {"deleted" if not dry_run else "would_delete": len(removed), "kept_active": len(active),
            "images": [path.name for path in removed]}
