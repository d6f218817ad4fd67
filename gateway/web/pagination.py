"""Keyset pagination: lists newest first, a page at a time, by id.

OFFSET pages scan every row they skip and "page N of M" needs a COUNT(*) of
the whole list; at 100,000 submissions both show. A keyset page
(WHERE id < cursor ORDER BY id DESC LIMIT n + 1) costs the same on the first
page and the five-thousandth, whatever the filters."""
from __future__ import annotations

from dataclasses import dataclass

from flask import abort, request

from ..extensions import db


@dataclass
class Page:
    items: list
    older: int | None  # cursor (?before=) of the next page back in time
    newer: int | None  # cursor (?after=) of the page before this one
    at_start: bool  # no cursor was given: an empty page here means an empty list


def cursor(raw: str | None) -> int | None:
    """A cursor from a query string: a positive id, or None (the first page)."""
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"a page cursor is a positive submission id, not {raw[:40]!r}")
    return int(raw)


def keyset(query, column, per_page: int, before: int | None = None, after: int | None = None) -> Page:
    """One page of ``query`` (a select without ORDER BY) by ``column`` (a unique,
    indexed id): the newest rows, or those older than ``before``, or the page of
    rows just newer than ``after``."""
    if after is not None:
        rows = list(db.session.scalars(query.where(column > after).order_by(column.asc()).limit(per_page + 1)))
        more_newer = len(rows) > per_page
        items = list(reversed(rows[:per_page]))
        more_older = bool(items) or _exists(query.where(column <= after))
    else:
        bounded = query if before is None else query.where(column < before)
        rows = list(db.session.scalars(bounded.order_by(column.desc()).limit(per_page + 1)))
        items = rows[:per_page]
        more_older = len(rows) > per_page
        more_newer = before is not None and _exists(query.where(column >= before))
    ids = [getattr(row, column.key) for row in items]
    return Page(items=items,
                older=ids[-1] if ids and more_older else None,
                newer=ids[0] if ids and more_newer else None,
                at_start=before is None and after is None)


def _exists(query) -> bool:
    return db.session.scalar(db.select(query.limit(1).exists())) or False


def page_from_request(query, column, per_page: int) -> Page:
    """The page that ``?before=`` / ``?after=`` of this request ask for; a bad
    cursor is a 400 that says what a cursor is."""
    try:
        before, after = cursor(request.args.get("before")), cursor(request.args.get("after"))
    except ValueError as e:
        abort(400, description=f"Bad page link: {e}. Start again from the first page.")
    return keyset(query, column, per_page, before=before, after=after)
