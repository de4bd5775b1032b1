"""Items pages of ``deepaudit serve`` answered from memory, without a query.

Pages are keyset pages (:mod:`.item_query`): the page after a row is the rows that come
after it in the sort's order. Per sort, the whole table's order is built by one DuckDB sort
on first use, then kept; per filter, a boolean mask over the rows (low-cardinality columns
as dictionary codes, ``p_fake`` as float64; text search asks DuckDB once per search text;
reviews as one code per row), so a filtered page costs about one pass over the mask, never
a scan of the table. Exports keep DuckDB's ``WHERE`` (:meth:`ItemQuery.where`), which the
masks mirror exactly.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepaudit.serve.common import LRU, BadRequest
from deepaudit.serve.item_query import ItemQuery, Page, encode_cursor, order_sql, sort_expr
from deepaudit.serve.review_index import FAKE, NONE, REAL, UNSURE, ReviewIndex


class Pager:
    """Pages and exports of the snapshot's ``items`` table. ``shown`` holds the list
    page's columns in row-id order (low-cardinality ones dictionary encoded); ``cursor``
    gives this thread's DuckDB cursor; ``slots`` bounds the queries run at once."""

    # Filters with at most this share of the rows sort their rows' places in the order
    # (cheap when they are few); larger ones walk the order until the page is full.
    SORT_BELOW = 1 / 16

    def __init__(self, con, shown: pa.Table, item_columns: list[str], reviews: ReviewIndex,
                 cursor: Callable, slots: threading.BoundedSemaphore) -> None:
        self.con, self.shown, self.item_columns = con, shown, item_columns
        self.reviews, self.cursor, self.slots = reviews, cursor, slots
        self.n_items = shown.num_rows
        self.orders = LRU(16)  # whole-table sort orders (see order)
        self.masks = LRU(16)  # rows each filter selects, and how many (see mask)
        self.texts = LRU(16)  # rows each text search selects (see text_mask)
        self.order_lock = threading.Lock()
        # What the filters read, in row-id order: dictionary codes (-1: null) of the
        # columns filtered by equality, and p_fake as float64 (null: NaN, in no range; NaN:
        # +inf, which DuckDB orders above every number). About 13 bytes a row.
        self.codes = {}
        for col in ("verdict", "status", "media_type", "error_code", "model", "run_id"):
            arr = self.shown[col].chunk(0)
            values = arr.dictionary.to_pylist()
            codes = pc.fill_null(arr.indices, -1).to_numpy()
            self.codes[col] = (codes.astype(np.min_scalar_type(-max(1, len(values)))),
                               {v: k for k, v in enumerate(values)})
        p = self.shown["p_fake"].chunk(0).cast(pa.float64())
        self.p_fake = pc.fill_null(pc.if_else(pc.is_nan(p), math.inf, p), math.nan).to_numpy()

    def page(self, query: ItemQuery) -> Page:
        desc = query.order == "desc"
        reverse = query.before is not None
        cursor = query.before if reverse else query.after
        if cursor and not 1 <= cursor[2] <= self.n_items:
            raise BadRequest("the page cursor names no row: start again from the first page")
        order, keys, position = self.order(query.sort, desc)
        n = len(order)
        # The page is the first (last: reverse) limit + 1 selected places in [lo, hi) of
        # the order; the one more tells whether there is a further page.
        lo, hi = 0, n
        if cursor and reverse:
            hi = int(position[cursor[2] - 1])
        elif cursor:
            lo = int(position[cursor[2] - 1]) + 1
        need = query.limit + 1
        mask, total = self.mask(query)
        if mask is None:  # the whole table: a slice of its order
            places = np.arange(max(lo, hi - need), hi) if reverse else \
                np.arange(lo, min(hi, lo + need))
        elif total <= n * self.SORT_BELOW:
            places = np.sort(position[np.flatnonzero(mask)])
            places = places[np.searchsorted(places, lo):np.searchsorted(places, hi)]
            places = places[-need:] if reverse else places[:need]
        else:
            places = walk(order, mask, lo, hi, need, reverse)
        more = len(places) == need
        if more:
            places = places[1:] if reverse else places[:-1]
        rows = []
        if len(places):
            row_ids = order[places]  # _id - 1
            taken = self.shown.take(pa.array(row_ids, pa.int64())).to_pylist()
            rows = [{**r, "_id": int(i) + 1, "_key": k}
                    for r, i, k in zip(taken, row_ids, keys.take(pa.array(places)).to_pylist())]

        def cur(r):
            return encode_cursor(query.sort, query.order, r["_key"] is None, r["_key"], r["_id"])

        if reverse:
            next_c = cur(rows[-1]) if rows else None
            prev_c = cur(rows[0]) if rows and more else None
            first = (total - len(rows) + 1) if query.before == () else query.start + 1
        else:
            next_c = cur(rows[-1]) if rows and more else None
            prev_c = cur(rows[0]) if rows and (query.after is not None) else None
            first = query.start + 1
        return Page(rows=rows, total=total, next_cursor=next_c, prev_cursor=prev_c,
                    first_row=max(1, first), last_page=next_c is None)

    def mask(self, query: ItemQuery) -> tuple[np.ndarray | None, int]:
        """``(mask, count)``: which rows (in row-id order) the query's filters select, and
        how many; ``(None, n_items)`` without filters. The same rows as its SQL ``where()``."""
        filters = query.filters()
        if not filters:
            return None, self.n_items

        def make():
            mask = np.ones(self.n_items, bool)
            if query.verdict is not None:  # "none": no verdict (null)
                mask &= self.equals("verdict", None if query.verdict == "none"
                                     else query.verdict)
            for col, value in (("status", query.status), ("media_type", query.media_type),
                               ("error_code", query.error_code), ("model", query.model),
                               ("run_id", query.run)):
                if value is not None:
                    mask &= self.equals(col, value)
            if query.p_min is not None:
                mask &= self.p_fake >= query.p_min  # float64 on both sides, as DuckDB
            if query.p_max is not None:
                mask &= self.p_fake <= query.p_max
            if query.q:
                mask &= self.text_mask(query.q.lower())
            if query.review:
                mask &= self.review_mask(query.review)
            return mask, int(np.count_nonzero(mask))

        # A review filter's rows change as reviews come in: keyed by the reviews' version.
        key = tuple(sorted(filters.items())) + ((self.reviews.version,) if query.review else ())
        return self.masks.get(key, make)

    def equals(self, col: str, value: str | None) -> np.ndarray:
        """Rows whose ``col`` is ``value`` (None: is null), from its dictionary codes."""
        codes, index = self.codes[col]
        if value is None:
            return codes == -1
        return codes == index[value] if value in index else np.zeros(len(codes), bool)

    def text_mask(self, text: str) -> np.ndarray:
        """Rows whose media id or URI contains ``text`` (lower case): DuckDB's substring
        search over the table, once per text (about 0.1-0.3 s at a million rows)."""
        def make():
            with self.slots:
                found = self.cursor().execute("SELECT _id FROM items WHERE contains(_text, ?)",
                                              [text]).fetchnumpy()["_id"]
            mask = np.zeros(self.n_items, bool)
            mask[np.asarray(found, np.int64) - 1] = True
            return mask
        return self.texts.get(text, make)

    def order(self, sort: str, desc: bool):
        """``(order, keys, position)`` of the whole table in page order: the row ids - 1
        and the sort keys in that order, and each row's place in it (by row id - 1). Built
        on first use of a sort (a DuckDB sort of the table, about 0.2-0.5 s at a million
        rows), then kept."""
        def make():
            t = self.con.cursor().sql(f"SELECT _id, {sort_expr(sort)} AS k FROM items ORDER BY "
                                      f"{order_sql(sort, desc)}").to_arrow_table()
            order = (t["_id"].to_numpy() - 1).astype(np.int32)
            position = np.empty(len(order), np.int32)
            position[order] = np.arange(len(order), dtype=np.int32)
            return order, t["k"].combine_chunks(), position

        with self.order_lock:
            return self.orders.get((sort, desc), make)

    def export(self, query: ItemQuery, batch_rows: int = 50_000):
        """A record batch reader over the scalar columns of every row the filter selects,
        in the page's order (the list columns stay in the Parquet: use deepaudit query)."""
        where, args = query.where()
        cols = ", ".join(f'"{c}"' for c in self.item_columns)
        sql = (f"SELECT {cols} FROM items WHERE {where} "
               f"ORDER BY {order_sql(query.sort, query.order == 'desc')}")
        cur = self.con.cursor()
        reader = cur.sql(sql, params=args).to_arrow_reader(batch_rows)
        return reader

    def review_mask(self, state: str) -> np.ndarray:
        """Rows whose latest review says ``state`` of their verdict (as REVIEW_SQL)."""
        row = self.reviews.row_kinds()
        fake, real = self.equals("verdict", "fake"), self.equals("verdict", "real")
        return {"unreviewed": row == NONE, "reviewed": row != NONE, "unsure": row == UNSURE,
                "confirmed": ((row == FAKE) & fake) | ((row == REAL) & real),
                "overturned": ((row == FAKE) & real) | ((row == REAL) & fake)}[state]


def walk(order: np.ndarray, mask: np.ndarray, lo: int, hi: int, need: int,
         reverse: bool) -> np.ndarray:
    """The first ``need`` places in ``[lo, hi)`` of ``order`` (the last ones: ``reverse``)
    whose row the mask selects, in ascending place order; read in growing chunks from the
    near end, so a dense filter reads a few thousand places, a sparse one at most all."""
    found, got, step = [], 0, 4096
    while lo < hi and got < need:
        a, b = (max(lo, hi - step), hi) if reverse else (lo, min(hi, lo + step))
        hits = np.flatnonzero(mask[order[a:b]]) + a
        found.append(hits)
        got += len(hits)
        lo, hi = (lo, a) if reverse else (b, hi)
        step *= 4
    if not found:
        return np.empty(0, np.int64)
    places = np.concatenate(found[::-1] if reverse else found)
    return places[-need:] if reverse else places[:need]
