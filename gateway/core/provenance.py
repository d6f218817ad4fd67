"""Each submission's provenance: one hash-chained, append-only record.

    upload (zip sha256) -> environment (requirements key, image digest)
    -> dry_run_job, dry_run_mlflow (the same two links for the dry run on the twin)
    -> job (Slurm job id, node, start, end, state, exit; from sacct)
    -> mlflow (the run ids the job created, tagged by its relay) -> manifest (path, size, sha256)
    -> release requests, each review decision, each release (naming the job, node
       and runs again), each download, purges

A row's hash is sha256(prev_hash + canonical JSON of the row's content:
submission, seq, kind, time, payload), so changing, removing or reordering a
row breaks every link after it; ``verify`` names the first broken one.

``record`` is the one way in. It writes in the caller's transaction (the fact
and its record commit together) and does not commit. Rows are never updated
or deleted by the gateway; a second writer racing for the same seq loses on
the unique (submission_id, seq) key instead of forking the chain.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update

from ..extensions import db
from .models import ProvenanceRecord, Submission, _iso, utcnow

GENESIS = "0" * 64


def canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def link_hash(prev_hash: str, submission_id: int, seq: int, kind: str, at: datetime, payload: str) -> str:
    content = canonical({"submission_id": submission_id, "seq": seq, "kind": kind, "at": _iso(at),
                         "payload": json.loads(payload)})
    return hashlib.sha256((prev_hash + content).encode()).hexdigest()


def record(submission_id: int, kind: str, **payload: object) -> ProvenanceRecord:
    """Append ``kind`` with ``payload`` to the submission's chain (flushed, not committed)."""
    # Take the submission's row lock first (a no-op update), so two writers
    # of one chain queue up instead of both reading the same last link.
    db.session.execute(update(Submission).where(Submission.id == submission_id)
                       .values(id=Submission.id).execution_options(synchronize_session=False))
    last = db.session.execute(
        select(ProvenanceRecord.seq, ProvenanceRecord.hash)
        .where(ProvenanceRecord.submission_id == submission_id)
        .order_by(ProvenanceRecord.seq.desc()).limit(1)).first()
    seq, prev = (last.seq + 1, last.hash) if last else (1, GENESIS)
    at = utcnow().replace(microsecond=0)
    text = canonical(payload)
    row = ProvenanceRecord(submission_id=submission_id, seq=seq, kind=kind, at=at, payload=text,
                           prev_hash=prev, hash=link_hash(prev, submission_id, seq, kind, at, text))
    db.session.add(row)
    db.session.flush()
    return row


def chain(submission_id: int) -> list[ProvenanceRecord]:
    return (ProvenanceRecord.query.filter_by(submission_id=submission_id)
            .order_by(ProvenanceRecord.seq).all())


def latest(submission_id: int, kind: str) -> dict:
    """The payload of the submission's last ``kind`` link; {} when it has none."""
    row = (ProvenanceRecord.query.filter_by(submission_id=submission_id, kind=kind)
           .order_by(ProvenanceRecord.seq.desc()).first())
    return json.loads(row.payload) if row else {}


def to_dict(row: ProvenanceRecord) -> dict:
    return {"seq": row.seq, "kind": row.kind, "at": _iso(row.at), "payload": json.loads(row.payload),
            "prev_hash": row.prev_hash, "hash": row.hash}


def owner_view(row: ProvenanceRecord, disclosed: set[str]) -> dict:
    """A link as the submission's owner sees it: the names, sizes and hashes of
    export files reviewers have not released are left out (counted), the way
    gateway.core.airlock.overview shows the export. The hashes still chain: the
    gateway verifies them on the whole rows."""
    shown = to_dict(row)
    payload = shown["payload"]
    if not isinstance(payload, dict):
        return shown
    hidden = "path" in payload and payload["path"] not in disclosed
    for key in ("files", "paths", "skipped"):
        if isinstance(payload.get(key), list):
            payload[key] = f"{len(payload[key])} (names shown to reviewers until released)"
    if hidden:
        payload["path"] = "(shown to reviewers until released)"
        for key in ("sha256", "manifest_sha256"):
            payload.pop(key, None)
    return shown


@dataclass
class Broken:
    submission_id: int
    seq: int
    row_id: int | None
    why: str

    def __str__(self):
        return f"submission {self.submission_id}: link {self.seq} (row {self.row_id}) {self.why}"


def verify(submission_id: int) -> Broken | None:
    """The first broken link of the submission's chain, or None when it holds."""
    prev, expected = GENESIS, 1
    for row in chain(submission_id):
        if row.seq != expected:
            return Broken(submission_id, expected, None, f"is missing (the next row has seq {row.seq})")
        if row.prev_hash != prev:
            return Broken(submission_id, row.seq, row.id, "does not follow the link before it (prev_hash)")
        try:
            actual = link_hash(prev, submission_id, row.seq, row.kind, row.at, row.payload)
        except ValueError:
            actual = None
        if actual != row.hash:
            return Broken(submission_id, row.seq, row.id, "was changed after it was written (hash mismatch)")
        prev, expected = row.hash, expected + 1
    return None


def submissions_with_records() -> list[int]:
    return list(db.session.scalars(select(ProvenanceRecord.submission_id).group_by(
        ProvenanceRecord.submission_id).order_by(func.min(ProvenanceRecord.id))))
