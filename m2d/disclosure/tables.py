"""Tables (CSV, XLSX) as ACRO checks them, and tables with a row per case.

ACRO's rules with its default parameters (acro/default.yaml): a frequency cell
below ``THRESHOLD`` (10) or zero is `review`; a magnitude cell whose
contributions fail the N-K dominance rule (the largest ``NK_N`` = 2 make up
``NK_K`` = 90 % of the total or more) or the p-ratio rule (what is left after
the two largest is less than ``P_RATIO`` = 10 % of the largest) is `review`.
An exported table carries no per-record contributions, so dominance and
p-ratio are applied where the table itself shows a total and its parts (a row
or column labelled total/sum/all beside the others); magnitude cells in a row
whose count column is below the threshold are `review` too. A table with as
many rows as the dataset has cases or images of some split (within 10 %) is
row-level data: `fail` (`review` when a column counts epochs or steps, as a
training log of that length would).
"""
from __future__ import annotations

import csv
import io
import re
import zipfile
from dataclasses import dataclass

THRESHOLD = 10
NK_N, NK_K = 2, 0.90
P_RATIO = 0.10
ZEROS_ARE_DISCLOSIVE = True
LONG_TABLE = 100  # rows: beyond this a table that matches no count is still reviewed as row-level
ROW_TOLERANCE = 0.10
LABEL_COLUMN = re.compile(r"(?i)^(|unnamed.*|index|id|label|labels|class|classes|name|metric|metrics|split|"
                          r"epoch|epochs|step|steps|iteration|fold|year|seed|view|group|category|true|predicted)$")
SEQUENCE_COLUMN = re.compile(r"(?i)^(epoch|epochs|step|steps|iteration|iter|round)$")
COUNT_COLUMN = re.compile(r"(?i)^(n|count|counts|support|cases|images|patients|freq|frequency|num|number)$")
TOTAL_LABEL = re.compile(r"(?i)^(total|sum|all|overall)$")
SEPARATORS = ",;\t|"


@dataclass
class Sheet:
    name: str  # "" for a CSV
    rows: list[list[str]]  # cells as text, first row as read


def read_csv(text: str, max_cells: int) -> Sheet:
    try:
        dialect = csv.Sniffer().sniff(text[:8192], delimiters=SEPARATORS)
    except csv.Error:
        dialect = csv.excel
    rows, cells = [], 0
    reader = csv.reader(io.StringIO(text), dialect)
    while cells <= max_cells:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error:  # a field over csv's size limit, a NUL: the rest is searched as text only
            break
        rows.append(row)
        cells += len(row)
    return Sheet("", rows)


def read_xlsx(data, max_cells: int, max_unpacked: int) -> list[Sheet]:
    """The sheets of a workbook (values, not formulas), after checking its parts unpack
    within ``max_unpacked`` bytes (openpyxl would otherwise inflate a bomb)."""
    import openpyxl

    raw = io.BytesIO(bytes(data))
    with zipfile.ZipFile(raw) as z:
        if sum(i.file_size for i in z.infolist()) > max_unpacked:
            raise ValueError(f"its parts unpack to more than {max_unpacked} bytes")
    workbook = openpyxl.load_workbook(raw, read_only=True, data_only=True)
    sheets, cells = [], 0
    try:
        for ws in workbook.worksheets:
            rows = []
            for row in ws.iter_rows(values_only=True):
                rows.append(["" if v is None else str(v) for v in row])
                cells += len(row)
                if cells > max_cells:
                    break
            sheets.append(Sheet(ws.title, rows))
    finally:
        workbook.close()
    return sheets


def _number(cell: str) -> float | None:
    try:
        value = float(cell.strip().replace("%", ""))
    except ValueError:
        return None
    return value if value == value else None  # NaN is missing, not a number


def _is_int(cell: str) -> bool:
    return re.fullmatch(r"\s*[+-]?\d+(\.0+)?\s*", cell) is not None


def check(sheet: Sheet, row_counts: dict[str, int], cell_name) -> list[tuple[str, str]]:
    """[(status, reason)] for one sheet. ``cell_name(row, col)`` names a cell for a reason."""
    rows = [r for r in sheet.rows if any(c.strip() for c in r)]
    if len(rows) < 2:
        return []
    width = max(len(r) for r in rows)
    rows = [r + [""] * (width - len(r)) for r in rows]
    first_numeric = sum(_number(c) is not None for c in rows[0])
    has_header = first_numeric < max(1, sum(_number(c) is not None for c in rows[1]))
    header = rows[0] if has_header else [""] * width
    body = rows[1:] if has_header else rows
    base = 2 if has_header else 1
    out: list[tuple[str, str]] = []

    # row-level data
    sequence = any(SEQUENCE_COLUMN.match(h.strip()) for h in header)
    for name, n in sorted(row_counts.items()):
        if abs(len(body) - n) <= ROW_TOLERANCE * n:
            what = name.replace("_", " ")
            if sequence:
                out.append(("review", f"{len(body)} rows, as many as the dataset's {what} ({n}); a column counts "
                                      "epochs or steps, so it may be a training log: check it is not one row per case"))
            else:
                out.append(("fail", f"{len(body)} rows, as many as the dataset's {what} ({n}): one row per case "
                                    "or image is row-level data"))
            return out
    if len(body) >= LONG_TABLE and not sequence:
        out.append(("review", f"{len(body)} rows: a long table may be row-level data"))

    # which columns hold counts (all non-negative integers) and which magnitudes
    counts_cols, magnitude_cols = [], []
    for j in range(width):
        name = header[j].strip()
        values = [c for c in (r[j] for r in body) if c.strip()]
        if not values or any(_number(c) is None for c in values):
            continue
        if LABEL_COLUMN.match(name) or (j == 0 and not name):
            continue
        if all(_is_int(c) and _number(c) >= 0 for c in values):
            counts_cols.append(j)
        else:
            magnitude_cols.append(j)
    if not has_header and body and all(_number(c) is None for c in (r[0] for r in body)):
        counts_cols = [j for j in counts_cols if j]

    small, zeros = [], []
    for i, r in enumerate(body):
        for j in counts_cols:
            if not r[j].strip():
                continue
            v = _number(r[j])
            if v == 0 and ZEROS_ARE_DISCLOSIVE:
                zeros.append(cell_name(base + i, j))
            elif 0 < v < THRESHOLD:
                small.append(cell_name(base + i, j))
    if small:
        out.append(("review", f"{len(small)} count cell(s) below the threshold of {THRESHOLD}: {_some(small)}"))
    if zeros:
        out.append(("review", f"{len(zeros)} zero count cell(s) (ACRO: zeros may disclose): {_some(zeros)}"))

    # magnitudes of small groups
    count_named = [j for j in range(width) if COUNT_COLUMN.match(header[j].strip())]
    thin = []
    for i, r in enumerate(body):
        for j in count_named:
            v = _number(r[j])
            if v is not None and 0 < v < THRESHOLD:
                thin.extend(cell_name(base + i, k) for k in magnitude_cols if r[k].strip())
    if thin:
        out.append(("review", f"{len(thin)} magnitude cell(s) of groups of fewer than {THRESHOLD}: {_some(thin)}"))

    # dominance and p-ratio of a shown total and its parts
    dominated: dict[str, list[str]] = {}  # rule -> cells
    total_rows = [i for i, r in enumerate(body) if TOTAL_LABEL.match(r[0].strip())]
    for t in total_rows[:1]:
        for j in magnitude_cols:
            parts = [_number(r[j]) for i, r in enumerate(body) if i != t and r[j].strip()]
            for rule in dominance(_number(body[t][j]), parts):
                dominated.setdefault(rule, []).append(cell_name(base + t, j))
    total_cols = [j for j in range(width) if TOTAL_LABEL.match(header[j].strip())]
    for j in total_cols[:1]:
        for i, r in enumerate(body):
            parts = [_number(r[k]) for k in magnitude_cols if k != j and r[k].strip()]
            for rule in dominance(_number(r[j]), parts) if j in magnitude_cols else ():
                dominated.setdefault(rule, []).append(cell_name(base + i, j))
    for rule, cells in dominated.items():
        out.append(("review", f"{len(cells)} total(s) {RULES[rule]}: {_some(cells)}"))
    return out


NK, PRATIO, NEGATIVE = "N-K", "p-ratio", "negative"
RULES = {NK: f"dominated by their largest parts (N={NK_N}, K={NK_K:.0%})",
         PRATIO: f"whose parts beside the two largest are less than {P_RATIO:.0%} of the largest (p-ratio)",
         NEGATIVE: "with a negative part: dominance is not defined (ACRO reviews it)"}


def dominance(total: float | None, parts: list[float | None]) -> list[str]:
    """The rules a total and its parts break, as ACRO's (acro 1.0.2, sdcchecks.py
    check_nk_dominance and check_ppercent_dominance) on a cell of those contributions:
    N-K where the N largest make up K or more of the total; p-ratio where what is
    left beside the two largest is below P of the largest; a negative part: neither
    is defined, reviewed (tests/test_disclosure.py compares them with ACRO's own)."""
    parts = sorted((p for p in parts if p is not None), reverse=True)
    if total is None or total <= 0 or not parts:
        return []
    if parts[-1] < 0:
        return [NEGATIVE]
    broken = []
    if sum(parts[:NK_N]) >= NK_K * total:
        broken.append(NK)
    if total - sum(parts[:2]) < P_RATIO * parts[0]:
        broken.append(PRATIO)
    return broken


def _some(names: list[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")
