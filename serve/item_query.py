"""What an items request asks for: its filters, sort and page (:class:`ItemQuery`,
validated, 400 otherwise), the same filters as SQL for the exports (:meth:`ItemQuery.where`)
and the keyset page cursors.

A cursor is ``[sort, order, is_null, value, _id]`` as URL-safe base64 JSON: the sort key
and row id of the row a page starts after (or ends before). The order of a sort is ``col
ASC|DESC NULLS LAST, _id``, never ``OFFSET``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any

from deepaudit.pipeline import reviews as rv
from deepaudit.serve.common import BadRequest

VERDICTS = ("fake", "real", "none")
STATUSES = ("ok", "no_face", "error")
# Columns of the items table shown in the list, in order; every one can be sorted on.
LIST_SHOWN = ["media_id", "verdict", "label", "p_fake", "margin", "status", "error_code",
              "media_type", "n_frames_with_face", "model", "run_id", "audited_at", "uri"]
SORTABLE = set(LIST_SHOWN) | {"label", "size_bytes", "duration_s", "manifest_row",
                              "n_frames_sampled"}
LOW_CARDINALITY = {"verdict", "status", "error_code", "media_type", "model", "run_id", "label"}
MEDIA_TYPES = ("image", "video")
REVIEW_FILTERS = rv.STATES  # unreviewed, reviewed, confirmed, overturned, unsure
MAX_LIMIT = 500
MAX_TEXT = 300


def _text(params, name: str, limit: int = MAX_TEXT) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if len(value) > limit:
        raise BadRequest(f"{name} is longer than {limit} characters")
    if "\x00" in value:
        raise BadRequest(f"{name} contains a NUL character")
    return value


def _prob(params, name: str) -> float | None:
    value = _text(params, name, 32)
    if value is None:
        return None
    try:
        p = float(value)
    except ValueError:
        raise BadRequest(f"{name} must be a number between 0 and 1, got {value!r}") from None
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise BadRequest(f"{name} must be between 0 and 1, got {value!r}")
    return p


def _int(params, name: str, default: int, lo: int, hi: int) -> int:
    value = _text(params, name, 32)
    if value is None:
        return default
    try:
        n = int(value)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number, got {value!r}") from None
    if not lo <= n <= hi:
        raise BadRequest(f"{name} must be between {lo} and {hi}, got {n}")
    return n


@dataclass(frozen=True)
class ItemQuery:
    """The filters, sort and page of an items request, validated."""

    verdict: str | None = None
    status: str | None = None
    media_type: str | None = None
    error_code: str | None = None
    p_min: float | None = None
    p_max: float | None = None
    model: str | None = None
    run: str | None = None
    q: str | None = None
    review: str | None = None
    sort: str = "p_fake"
    order: str = "desc"
    limit: int = 50
    after: tuple | None = None
    before: tuple | None = None  # () for "the last page"
    start: int = 0  # the first row's number, for display only

    FILTERS = ("verdict", "status", "media_type", "error_code", "p_min", "p_max", "model", "run",
               "q", "review")

    @classmethod
    def parse(cls, params) -> ItemQuery:
        known = set(cls.FILTERS) | {"sort", "order", "limit", "after", "before", "start",
                                    "token"}
        unknown = sorted(set(params.keys()) - known)
        if unknown:
            raise BadRequest(f"unknown parameter(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known - {'token'}))}")
        verdict, status = _text(params, "verdict"), _text(params, "status")
        if verdict is not None and verdict not in VERDICTS:
            raise BadRequest(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
        if status is not None and status not in STATUSES:
            raise BadRequest(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        media_type = _text(params, "media_type")
        if media_type is not None and media_type not in MEDIA_TYPES:
            raise BadRequest(f"media_type must be one of {', '.join(MEDIA_TYPES)}, "
                             f"got {media_type!r}")
        review = _text(params, "review")
        if review is not None and review not in REVIEW_FILTERS:
            raise BadRequest(f"review must be one of {', '.join(REVIEW_FILTERS)}, "
                             f"got {review!r}")
        p_min, p_max = _prob(params, "p_min"), _prob(params, "p_max")
        if p_min is not None and p_max is not None and p_min > p_max:
            raise BadRequest(f"p_min ({p_min}) is above p_max ({p_max})")
        sort = _text(params, "sort", 64) or "p_fake"
        if sort not in SORTABLE:
            raise BadRequest(f"cannot sort on {sort!r}; sortable: {', '.join(sorted(SORTABLE))}")
        order = _text(params, "order", 8) or ("desc" if sort in ("p_fake", "audited_at")
                                             else "asc")
        if order not in ("asc", "desc"):
            raise BadRequest(f"order must be asc or desc, got {order!r}")
        after, before = _text(params, "after", 2000), _text(params, "before", 2000)
        if after and before:
            raise BadRequest("give after or before, not both")
        return cls(verdict=verdict, status=status, media_type=media_type,
                   error_code=_text(params, "error_code"), p_min=p_min, p_max=p_max,
                   model=_text(params, "model"),
                   run=_text(params, "run"), q=_text(params, "q"), review=review,
                   sort=sort, order=order,
                   limit=_int(params, "limit", 50, 1, MAX_LIMIT),
                   after=decode_cursor(after, sort, order) if after else None,
                   before=(() if before == "end" else decode_cursor(before, sort, order))
                   if before else None,
                   start=_int(params, "start", 0, 0, 10**12))

    def filters(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.FILTERS if getattr(self, k) is not None}

    def where(self) -> tuple[str, list]:
        sql, args = ["TRUE"], []
        if self.verdict == "none":
            sql.append("verdict IS NULL")
        elif self.verdict:
            sql.append("verdict = ?")
            args.append(self.verdict)
        for col, value in (("status", self.status), ("media_type", self.media_type),
                           ("error_code", self.error_code), ("model", self.model),
                           ("run_id", self.run)):
            if value is not None:
                sql.append(f"{col} = ?")
                args.append(value)
        if self.p_min is not None:
            sql.append("p_fake >= ?")
            args.append(self.p_min)
        if self.p_max is not None:
            sql.append("p_fake <= ?")
            args.append(self.p_max)
        if self.q:
            sql.append("contains(_text, ?)")
            args.append(self.q.lower())
        if self.review:
            sql.append(REVIEW_SQL[self.review])
        return " AND ".join(sql), args


# The review filters in SQL (exports), over the latest review per media id that the
# review index keeps in _review_latest (serve/review_index.py); the pages' masks
# (serve/paging.py) select the same rows.
_REVIEWED = "EXISTS (SELECT 1 FROM _review_latest r WHERE r.media_id = items.media_id{})"
REVIEW_SQL = {
    "unreviewed": "NOT " + _REVIEWED.format(""),
    "reviewed": _REVIEWED.format(""),
    "unsure": _REVIEWED.format(" AND r.review = 'unsure'"),
    "confirmed": _REVIEWED.format(" AND r.review = items.verdict"),
    "overturned": _REVIEWED.format(" AND r.review IN ('fake', 'real') AND items.verdict IN "
                                   "('fake', 'real') AND r.review <> items.verdict"),
}


NUMERIC = {"p_fake", "margin", "n_frames_with_face", "n_frames_sampled", "size_bytes",
           "duration_s", "manifest_row", "audited_at"}


def sort_expr(sort: str) -> str:
    return "epoch_us(audited_at)" if sort == "audited_at" else f'"{sort}"'


def order_sql(sort: str, desc: bool) -> str:
    """``sort`` ascending or descending, nulls last, ties by row id."""
    return f"{sort_expr(sort)} {'DESC' if desc else 'ASC'} NULLS LAST, _id ASC"


def encode_cursor(sort: str, order: str, is_null: bool, value, row_id: int) -> str:
    raw = json.dumps([sort, order, bool(is_null), value, int(row_id)], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(text: str, sort: str, order: str) -> tuple:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        c_sort, c_order, is_null, value, row_id = json.loads(raw)
    except (ValueError, TypeError, binascii.Error, RecursionError):  # [[[[... nests deep
        raise BadRequest("the page cursor (after/before) is malformed: start again from the "
                         "first page") from None
    if (c_sort, c_order) != (sort, order):
        raise BadRequest(f"the page cursor was made for sort={c_sort} order={c_order}, not "
                         f"sort={sort} order={order}: start again from the first page")
    numeric = sort in NUMERIC
    ok = (isinstance(is_null, bool) and isinstance(row_id, int) and not isinstance(row_id, bool)
          and (value is None if is_null else
               (isinstance(value, (int, float)) and not isinstance(value, bool)
                and abs(value) < 2**63 and math.isfinite(value)) if numeric
               else isinstance(value, str)))
    if not ok:
        raise BadRequest("the page cursor is malformed: start again from the first page")
    return is_null, value, row_id


@dataclass
class Page:
    rows: list[dict]
    total: int
    next_cursor: str | None
    prev_cursor: str | None
    first_row: int  # 1-based number of the first row, when known
    last_page: bool = False
