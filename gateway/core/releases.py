"""What leaves, what each researcher was given, and differencing across releases.

    reviewers release a file -> ``leaving`` / ``released_source``: a model file
        leaves as the sanitised copy the report job made on the data side (plain
        tensors, low mantissa bits rounded away: m2d/disclosure/sanitise.py) when
        RELEASE_SANITISED_MODELS is on; a model file (by the report's type) without
        one leaves as written only where the report's `sanitise` check is `review`
        (reviewers saw why it could not be re-saved), and is refused otherwise;
        any other file leaves as the job wrote it. The gateway never sanitises
        anything itself: the copy comes only from the report job
    -> ``record``: a released_file row per researcher, kept for good: the hash of
        what left, the file's report entry, and what later releases are compared with
        (a model's weight sketch, a small table's cells)
    -> a later request of the same researcher: ``checks_for`` compares each file
        with what they were given before; one that differs from an earlier one by
        only a few cases' worth of data (a model whose weights moved by less than
        RELEASE_DIFF_MODEL, a table whose counts moved by at most RELEASE_DIFF_CELLS,
        another file of the same type and size) gets a `differencing` check,
        status review, with the reason: two releases that differ by a few cases
        give those cases away (train with and without a patient, subtract).

The report (disclosure/report.json, written by the sealed report job) is read
through gateway.jobfiles like everything a job wrote; the sanitised copy's
sha256 comes from it, and the copy is released only if its bytes match.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass

from flask import current_app

from ..extensions import db
from . import jobfiles, provenance
from .models import ExportFile, ReleasedFile, ReleaseItem, Submission

REPORT_NAME = "report.json"
REPORT_MAX_BYTES = 16 * 1024**2
TABLE_MAX_BYTES = 64 * 1024  # a table's cells are kept and compared up to this size (the review page's preview)
TABLE_SUFFIXES = (".csv", ".tsv")
SIZE_CLASS = 0.01  # files of a type without a finer comparison: sizes within 1 % are "the same size"
# a model file's copy is safetensors; an archive's that holds one is the archive again (archives.py)
_SANITISED_NAME = re.compile(r"sanitised/[0-9a-f]{64}\.(?:safetensors|zip|tar|gz|bz2|xz)")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# the report's types of a model file (m2d/disclosure/report.py's MODEL_TYPES): with
# RELEASE_SANITISED_MODELS on, each leaves as its sanitised copy or by a reviewed decision
MODEL_TYPES = frozenset({"pytorch-zip", "pytorch-legacy", "safetensors", "onnx", "hdf5", "keras"})
SANITISED, AS_WRITTEN = "sanitised copy", "as written"


# ------------------------------------------------------------------ the report's entry

def report_entry(submission_id: int, export_file: ExportFile) -> dict | None:
    """The report job's entry for ``export_file`` (same path and sha256), or None."""
    return report_entries(submission_id).get((export_file.path, export_file.sha256))


def report_entries(submission_id: int) -> dict[tuple[str, str], dict]:
    """{(path, sha256): entry} of the report job's report.json (empty without one)."""
    data = jobfiles.read_head(submission_id, jobfiles.DISCLOSURE, REPORT_NAME, REPORT_MAX_BYTES + 1)
    if not data or len(data) > REPORT_MAX_BYTES:
        return {}
    try:
        files = json.loads(data).get("files")
    except (ValueError, AttributeError):
        return {}
    found = {}
    for entry in files if isinstance(files, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("sha256"), str):
            found.setdefault((entry["path"], entry["sha256"]), entry)
    return found


def _sanitised(entry: dict | None) -> dict | None:
    """The entry's sanitised copy, if it names one as the interface says."""
    found = entry.get("sanitised") if entry else None
    if not isinstance(found, dict) or not isinstance(found.get("name"), str) \
            or not _SANITISED_NAME.fullmatch(found["name"]) or not isinstance(found.get("sha256"), str) \
            or not _HEX64.fullmatch(found["sha256"]) or not isinstance(found.get("size"), int):
        return None
    return found


def _holds_models(entry: dict | None) -> bool:
    """Whether the report found model files inside this file (an archive: its
    ``model_members``): it leaves as a copy or by a reviewed decision, as a model does."""
    found = entry.get("model_members") if entry else None
    return isinstance(found, int) and not isinstance(found, bool) and found > 0


def _held_out(copy: dict) -> str:
    """The rounded copy's held-out metric beside the original's, as the report
    job measured them through the submission's predict ('' where it did not)."""
    found = copy.get("held_out")
    if not isinstance(found, dict):
        return ""
    shown = []
    for key, name in (("auc", "AUC"), ("accuracy", "accuracy")):
        before, after = (found.get(side, {}).get(key) if isinstance(found.get(side), dict) else None
                         for side in ("original", "rounded"))
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (before, after)):
            shown.append(f"held-out {name} {before:.3f} as written, {after:.3f} as released")
    return f"; {', '.join(shown)}" if shown else ""


# ------------------------------------------------------------------ what leaves

@dataclass(frozen=True)
class Leaving:
    """Which bytes leave for a file (``leaves``: SANITISED or AS_WRITTEN) and
    why; ``refused``: why nothing may leave for it (then ``leaves`` is moot)."""
    leaves: str
    why: str
    refused: str | None = None

    @property
    def sanitised(self) -> bool:
        return self.leaves == SANITISED


def leaving(entry: dict | None) -> Leaving:
    """What leaves for a file whose report entry is ``entry`` (None: no report names it)."""
    if not current_app.config["RELEASE_SANITISED_MODELS"]:
        return Leaving(AS_WRITTEN, "RELEASE_SANITISED_MODELS is off: every file leaves as the job wrote it")
    copy = _sanitised(entry)
    if copy is not None:
        bits = copy.get("mantissa_bits")
        return Leaving(SANITISED, "the report job's copy: plain tensors (safetensors, no pickled code), floats "
                                  f"rounded to {bits if isinstance(bits, int) else '?'} mantissa bits, "
                                  f"sha256 {copy['sha256']}{_held_out(copy)}")
    kind = entry.get("type") if entry else None
    if kind not in MODEL_TYPES and not _holds_models(entry):
        return Leaving(AS_WRITTEN, "not a model file by its report" if entry else "no report names it")
    if kind not in MODEL_TYPES:
        kind = f"{kind} holding a"
    checks = entry.get("checks") if isinstance(entry.get("checks"), list) else []
    check = next((c for c in checks if isinstance(c, dict) and c.get("name") == "sanitise"), None)
    if check is not None and check.get("status") == "review":
        return Leaving(AS_WRITTEN, f"a {kind} model file the report job could not re-save as plain tensors; "
                                   f"it leaves as the job wrote it only by the reviewers' decision: "
                                   f"{str(check.get('reason') or '')[:300]}")
    return Leaving(AS_WRITTEN, "", refused=(
        f"a {kind} model file without a sanitised copy, and its report does not say why (no `sanitise` check "
        "in review): it would leave as written, low bits and pickle included. An admin runs its report "
        "again (its job re-saves it, RELEASE_SANITISED_MODELS), or reviewers reject it"))


def released_source(item: ReleaseItem, entry: dict | None) -> tuple[str, bytes, str, int]:
    """(jobfiles folder, name, sha256 it must have, its size) of what leaves for
    ``item``; ValueError when nothing may (``leaving``'s refusal)."""
    plan = leaving(entry)
    if plan.refused:
        raise ValueError(plan.refused)
    copy = _sanitised(entry) if plan.sanitised else None
    if copy is not None:
        return jobfiles.DISCLOSURE, copy["name"].encode(), copy["sha256"], copy["size"]
    return jobfiles.EXPORT, jobfiles.unescape(item.file.path), item.file.sha256, item.file.size


def leaving_for(submission_id: int, items) -> dict[int, Leaving]:
    """{item id: Leaving} of release items of one submission (the review page)."""
    entries = report_entries(submission_id)
    return {item.id: leaving(entries.get((item.file.path, item.file.sha256))) for item in items}


def refusal(items) -> tuple[int, str, str] | None:
    """Why the release items may not be approved (status, code, message): a model
    file that would leave as written without the reviewers having seen why."""
    for item in items:
        plan = leaving(report_entry(item.request.submission_id, item.file))
        if plan.refused:
            return (409, "no_sanitised_copy", f"'{item.file.path}' is {plan.refused}.")
    return None


def record(item: ReleaseItem, released_sha256: str, released_size: int, entry: dict | None) -> ReleasedFile:
    """Keep what was given to the item's owner, for good (in the caller's transaction)."""
    submission = db.session.get(Submission, item.request.submission_id)
    row = ReleasedFile(user_id=submission.user_id, submission_id=submission.id, item_id=item.id,
                       path=item.file.path, size=item.file.size, sha256=item.file.sha256,
                       released_sha256=released_sha256, released_size=released_size,
                       kind=_kind(item.file, entry),
                       report=json.dumps({"status": entry.get("status"), "checks": entry.get("checks")})
                       if entry else None,
                       sketch=_json(sketch_of(submission.id, item.file, entry)))
    db.session.add(row)
    return row


def _json(value) -> str | None:
    return None if value is None else json.dumps(value)


def _kind(export_file: ExportFile, entry: dict | None) -> str | None:
    kind = entry.get("type") if entry else None
    if isinstance(kind, str) and kind:
        return kind[:40]
    suffix = export_file.path.rpartition(".")[2].lower() if "." in export_file.path else ""
    return {"csv": "csv", "tsv": "csv"}.get(suffix)


def given(submission_id: int) -> dict[str, dict]:
    """{path: size, sha256 (and sanitised: true)} of what the owner was given of a
    released model file: what a download must check against (its sanitised copy
    is not the file the job wrote)."""
    rows = ReleasedFile.query.filter_by(submission_id=submission_id).order_by(ReleasedFile.id)
    return {row.path: {"size": row.released_size, "sha256": row.released_sha256, "sanitised": True}
            for row in rows if row.released_sha256 != row.sha256}


# ------------------------------------------------------------------ what is compared

def sketch_of(submission_id: int, export_file: ExportFile, entry: dict | None) -> dict | None:
    """A model's weight sketch (the report's), or a small table's cells, or None."""
    copy = _sanitised(entry)
    if copy is not None and isinstance(copy.get("sketch"), dict):
        return {"model": copy["sketch"]}
    if _kind(export_file, entry) == "csv" and export_file.size <= TABLE_MAX_BYTES:
        data = jobfiles.read_head(submission_id, jobfiles.EXPORT, jobfiles.unescape(export_file.path),
                                  TABLE_MAX_BYTES)
        table = parse_table(data) if data is not None else None
        return {"table": table} if table else None
    return None


def parse_table(data: bytes) -> list[list[str]] | None:
    """A CSV's rows of cells (delimiter sniffed), or None when it is not one."""
    text = jobfiles.text_of(data)
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
        rows = [row for row in csv.reader(io.StringIO(text), dialect) if row]
    except csv.Error:
        return None
    return rows if len(rows) >= 2 and len({len(r) for r in rows}) == 1 else None


def model_distance(new: dict, old: dict) -> float | None:
    """How far apart two models' weights are, relative to the older one's (from
    their sketches: fixed random projections that keep distances); None when
    they are not the same architecture (tensor names and shapes)."""
    if set(new) != set(old) or not new:
        return None
    apart = scale = 0.0
    for name, tensor in new.items():
        before = old[name]
        try:
            if tensor["shape"] != before["shape"] or len(tensor["projection"]) != len(before["projection"]):
                return None
            apart += sum((a - b) ** 2 for a, b in zip(tensor["projection"], before["projection"]))
            scale += float(before["norm"]) ** 2
        except (KeyError, TypeError):
            return None
    return math.sqrt(apart) / math.sqrt(scale) if scale > 0 else None


def table_difference(new: list[list[str]], old: list[list[str]]) -> tuple[int, float] | None:
    """(cells that differ, the largest difference) of two tables of the same
    header and shape whose differing cells are all numbers; None otherwise."""
    if len(new) != len(old) or new[0] != old[0] or any(len(a) != len(b) for a, b in zip(new, old)):
        return None
    changed, largest = 0, 0.0
    for row_new, row_old in zip(new[1:], old[1:]):
        for a, b in zip(row_new, row_old):
            if a == b:
                continue
            try:
                gap = abs(float(a) - float(b))
            except ValueError:
                return None  # a label changed: another table
            changed, largest = changed + 1, max(largest, gap)
    return changed, largest


def checks_for(user_id: int, submission_id: int, export_file: ExportFile, entry: dict | None) -> list[dict]:
    """The `differencing` check of one file about to be reviewed (empty: nothing
    close to it was released to this researcher before)."""
    cfg = current_app.config
    kind = _kind(export_file, entry)
    sketch = sketch_of(submission_id, export_file, entry)
    reasons = []
    for earlier in ReleasedFile.query.filter_by(user_id=user_id).order_by(ReleasedFile.id):
        if earlier.sha256 == export_file.sha256:
            continue  # the same bytes again: nothing new leaves
        old = json.loads(earlier.sketch) if earlier.sketch else {}
        where = (f"'{earlier.path}' of submission {earlier.submission_id}, released "
                 f"{earlier.released_at:%Y-%m-%d}")
        if sketch and "model" in sketch and "model" in old:
            distance = model_distance(sketch["model"], old["model"])
            if distance and distance < cfg["RELEASE_DIFF_MODEL"]:  # 0: the same weights, nothing new
                reasons.append(f"its weights differ from those of {where} by only {distance:.2%} "
                               f"(RELEASE_DIFF_MODEL {cfg['RELEASE_DIFF_MODEL']:.2%})")
        elif sketch and "table" in sketch and "table" in old:
            found = table_difference(sketch["table"], old["table"])
            if found and found[0] and found[1] <= cfg["RELEASE_DIFF_CELLS"]:
                reasons.append(f"it is the table {where} with {found[0]} cells changed by at most {found[1]:g} "
                               f"(RELEASE_DIFF_CELLS {cfg['RELEASE_DIFF_CELLS']})")
        elif not sketch and not old and kind == earlier.kind \
                and abs(export_file.size - earlier.size) <= SIZE_CLASS * max(export_file.size, earlier.size):
            reasons.append(f"it has the type ({kind or 'unknown'}) and size (within {SIZE_CLASS:.0%}) of {where}")
    if not reasons:
        return []
    return [{"name": "differencing", "status": "review",
             "reason": "released before in nearly the same form: " + "; ".join(reasons[:5])
             + ". Two releases that differ by a few cases' worth of data give those cases away"}]


def flag_request(submission: Submission, files: list[ExportFile]) -> dict[str, list[dict]]:
    """The differencing checks of the files of a new request, recorded in the
    submission's provenance (reviewers read it); {path: checks} of those flagged."""
    flagged = {}
    for export_file in files:
        checks = checks_for(submission.user_id, submission.id, export_file,
                            report_entry(submission.id, export_file))
        if checks:
            flagged[export_file.path] = checks
    if flagged:
        provenance.record(submission.id, "release_differencing",
                          files={path: checks[0]["reason"] for path, checks in flagged.items()})
    return flagged
