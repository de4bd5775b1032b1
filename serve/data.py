"""What ``deepaudit serve`` reads: the views of ``deepaudit query`` over an audit output or
a ledger, one snapshot taken at start.

At start the ``verdicts`` view (see :mod:`deepaudit.jobs.query`) is copied, without its
list columns, into an in-memory DuckDB table ``items`` with a row id ``_id``: every page
then reads memory, never the Parquet (or S3) again, and a million rows sort and filter
in milliseconds. An item's list columns (face boxes, frame scores) are read from the view
when its page is opened, straight from that row's verdict file (opened afresh, checked
against the size and time it had at start: :class:`Gone` when it was removed or rewritten).
The lazy views are dropped once the snapshot is taken, so nothing scans the target's files
through DuckDB again. Nothing is ever written to the target.

Items pages are paged by keyset, never ``OFFSET``: the order is ``col ASC|DESC NULLS
LAST, _id``, and the page after a row is the rows that come after it in that order. Pages
are answered from memory without DuckDB: the whole table's order per sort (one DuckDB
sort on first use, then kept), and per filter a boolean mask over the rows (low-cardinality
columns as dictionary codes, ``p_fake`` as float64; text search asks DuckDB once per
search text), so a filtered page costs about one pass over the mask, never a scan of the
table. A cursor is ``[sort, order, is_null, value, _id]`` as URL-safe base64 JSON. Exports
keep DuckDB's ``WHERE`` (:meth:`ItemQuery.where`), which the masks mirror exactly.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import math
import os
import posixpath
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepaudit.infra.storage import StorageConfig, filesystem_for, is_s3, join
from deepaudit.pipeline import reviews as rv
from deepaudit.pipeline.query import QueryError, connect

log = logging.getLogger(__name__)

LIST_COLUMNS = ("face_boxes", "frame_indices", "frame_p_fake", "frame_weights",
                "dropped_frames")
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


class BadRequest(ValueError):
    """A bad parameter: the server answers 400 with this message."""


class NotFound(LookupError):
    """No such run or item: the server answers 404 with this message."""


class Gone(LookupError):
    """The item's run was removed or rewritten after the server started: 410."""


class Unavailable(OSError):
    """A file the page needs cannot be read now (storage, credentials): 503."""


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
# Archive keeps in _review_latest; Archive._review_mask is the same for pages.
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


@dataclass
class RunInfo:
    run_id: str
    run_dir: str  # OUT/runs/<run_id>, local path or s3:// URI
    root: str  # OUT
    summary: dict = field(default_factory=dict)


class LRU:
    """A small thread-safe least-recently-used cache."""

    def __init__(self, size: int = 256) -> None:
        self.size, self.data, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key, make):
        with self.lock:
            if key in self.data:
                self.data.move_to_end(key)
                return self.data[key]
        value = make()
        with self.lock:
            self.data[key] = value
            while len(self.data) > self.size:
                self.data.popitem(last=False)
        return value

    def clear(self) -> None:
        with self.lock:
            self.data.clear()


class Archive:
    """One read-only snapshot of an audit output or a ledger."""

    def __init__(self, target: str, storage: StorageConfig | None = None) -> None:
        self.target = target
        self.storage = storage or StorageConfig()
        con = connect(target, self.storage)  # QueryError when it is not one
        self.con = con
        # Each run's verdict files as they are now, before the snapshot reads them: an
        # item's list columns are read from its file later, only while it is unchanged.
        self.sources = _sources(con, target, self.storage)
        self.local = threading.local()
        # Queries at once: one per core, the rest wait their turn (first come, first
        # served) instead of all sharing the cores, which makes every one slow.
        self.slots = threading.BoundedSemaphore(max(1, min(4, os.cpu_count() or 1)))
        self.cache = LRU()
        self.orders = LRU(16)  # whole-table sort orders (see _order)
        self.masks = LRU(16)  # rows each filter selects, and how many (see _mask)
        self.texts = LRU(16)  # rows each text search selects (see _text_mask)
        self.order_lock = threading.Lock()
        cols = {r[0]: r[1] for r in con.execute("DESCRIBE verdicts").fetchall()}
        self.columns = cols
        keep = [c for c in cols if c not in LIST_COLUMNS]
        select = ", ".join(f'"{c}"' for c in keep)
        if "label" not in cols:
            select += ", NULL::VARCHAR AS label"
        if "manifest_row" not in cols:
            raise QueryError(f"{target}: its verdict rows have no manifest_row column")
        con.execute("SET threads = 1")  # per query: queries run side by side (self.slots)
        con.execute(
            f"CREATE TABLE _base AS SELECT {select}, CASE WHEN error IS NULL THEN NULL "
            "ELSE split_part(error, ':', 1) END AS error_code, "
            "lower(coalesce(media_id, '') || chr(10) || coalesce(uri, '')) AS _text, "
            "row_number() OVER (ORDER BY run_id, manifest_row) AS _id FROM verdicts")
        # Stored in row-id order: a page's rows are then fetched by id from few blocks.
        con.execute("CREATE TABLE items AS SELECT * FROM _base ORDER BY _id")
        con.execute("DROP TABLE _base")
        # The label column is listed when the manifest gave labels.
        self.has_label = con.execute("SELECT count(label) FROM items").fetchall()[0][0] > 0
        self.list_shown = [c for c in LIST_SHOWN if c != "label" or self.has_label]
        # The list page's columns, in row-id order, as Arrow: a page's rows are a take() of
        # their ids (DuckDB's "_id IN (...)" scans the table: 100+ ms at a million rows).
        shown = ", ".join(f'"{c}"' for c in self.list_shown)
        t = con.sql(f"SELECT {shown}, manifest_row FROM items ORDER BY _id").to_arrow_table()
        self.shown = pa.table({
            c: (t[c].combine_chunks().dictionary_encode() if c in LOW_CARDINALITY
                else t[c].combine_chunks()) for c in t.column_names})
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
        # Views over registered Arrow data are seen by this connection only: copy what the
        # pages read into tables, which every thread's cursor sees.
        con.execute("CREATE TABLE runs_t AS SELECT * FROM runs")
        con.execute("CREATE TABLE ledger_t AS SELECT media_id, run_id, model, audited_at, "
                    "status, error_code, attempts, change_key, verdict_file FROM ledger")
        self.is_ledger = con.execute("SELECT count(*) FROM ledger_t").fetchone()[0] > 0
        self.item_columns = [r[0] for r in con.execute("DESCRIBE items").fetchall()
                             if not r[0].startswith("_")]
        self.runs = self._run_infos()
        self.buckets = {_bucket(u) for u in [target, *(src.uri for files in
                                                      self.sources.values() for src in files),
                                             *(str(r.summary.get("manifest") or "")
                                               for r in self.runs.values())] if is_s3(u)}
        self.n_items = con.execute("SELECT count(*) FROM items").fetchone()[0]
        self.models = [r[0] for r in con.execute(
            "SELECT DISTINCT model FROM items WHERE model IS NOT NULL ORDER BY 1").fetchall()]
        self.error_codes = [r[0] for r in con.execute(
            "SELECT error_code, count(*) n FROM items WHERE error_code IS NOT NULL "
            "GROUP BY 1 ORDER BY n DESC LIMIT 50").fetchall()]
        # Reviews are not part of the snapshot: they are read once here (query's view) and
        # then kept up to date in memory as this server writes them (add_reviews).
        self.review_lock = threading.Lock()
        self.review_version = 0
        self._media = None  # media_id dictionary codes, made on the first review filter
        try:
            start = con.sql("SELECT * FROM reviews").to_arrow_table()
        except Exception:  # noqa: BLE001 - a query.py without the view: read them here
            start = rv.read_reviews(target, self.storage)
        self.reviews = rv.empty()
        con.execute("CREATE TABLE _review_latest (media_id VARCHAR, review VARCHAR)")
        self.add_reviews(start)
        # The snapshot is complete: drop the lazy views over the target's files, so no
        # request can scan them through DuckDB (a scan of files deleted under a running
        # server deadlocked inside pyarrow's scanner while holding the GIL).
        for view in ("last_run", "latest", "runs", "verdicts", "ledger_latest", "ledger",
                     "reviews"):
            con.execute(f"DROP VIEW IF EXISTS {view}")
        for name in ("_verdicts", "_ledger", "_run_info", "_reviews", "_review_of"):
            with contextlib.suppress(Exception):  # _review*: registered by query.py
                con.unregister(name)

    # ------------------------------------------------------------------ plumbing

    def cursor(self):
        cur = getattr(self.local, "cur", None)
        if cur is None:
            cur = self.local.cur = self.con.cursor()
        return cur

    def rows(self, sql: str, args: list | None = None) -> list[dict]:
        cur = self.cursor()
        with self.slots:
            cur.execute(sql, args or [])
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def scalar(self, sql: str, args: list | None = None):
        with self.slots:
            rows = self.cursor().execute(sql, args or []).fetchall()  # completes the result
            return rows[0][0] if rows else None

    def _run_infos(self) -> dict[str, RunInfo]:
        runs: dict[str, RunInfo] = {}
        if self.is_ledger:
            found = self.rows("SELECT run_id, any_value(verdict_file) AS f FROM ledger_t "
                              "WHERE verdict_file IS NOT NULL GROUP BY run_id")
            for r in found:
                run_dir = r["f"].rsplit("/", 1)[0]
                root = run_dir.rsplit("/", 2)[0] if run_dir.rsplit("/", 2)[-2:-1] == ["runs"] \
                    else run_dir
                runs[r["run_id"]] = RunInfo(r["run_id"], run_dir, root)
        else:
            for (run_id,) in self.con.execute("SELECT DISTINCT run_id FROM items").fetchall():
                if run_id is not None:
                    runs[run_id] = RunInfo(run_id, join(self.target, "runs", run_id), self.target)
        for info in runs.values():
            try:
                fs, path = filesystem_for(join(info.run_dir, "_summary.json"), self.storage)
                with fs.open(path, "r") as f:
                    info.summary = json.load(f)
            except storage_errors():  # missing (interrupted), unreadable or not JSON
                info.summary = {}
            if not isinstance(info.summary, dict):
                info.summary = {}
        return runs

    # ------------------------------------------------------------------ reviews

    def add_reviews(self, rows: pa.Table) -> None:
        """Take in review rows (read at start, or just written): the latest per media id
        is recomputed, and the filters and exports see it from now on."""
        with self.review_lock:
            rows = rows.select(rv.REVIEW_SCHEMA.names).cast(rv.REVIEW_SCHEMA)
            self.reviews = pa.concat_tables([self.reviews, rows])
            latest = rv.latest_reviews(self.reviews)
            self.latest_review = {r["media_id"]: r for r in latest.to_pylist()}
            cur = self.con.cursor()
            cur.register("_new_latest", latest.select(["media_id", "review"]))
            cur.execute("BEGIN")
            cur.execute("DELETE FROM _review_latest")
            cur.execute("INSERT INTO _review_latest SELECT * FROM _new_latest")
            cur.execute("COMMIT")
            cur.unregister("_new_latest")
            cur.close()
            self.review_version += 1

    def review_of(self, media_id: str | None) -> dict | None:
        """The latest review of ``media_id``, or None."""
        return self.latest_review.get(media_id)

    def review_history(self, media_id: str) -> list[dict]:
        """Every review of ``media_id``, newest first."""
        with self.review_lock:
            t = self.reviews
        found = t.filter(pc.equal(t["media_id"], media_id)).to_pylist()
        return sorted(found, key=lambda r: r["reviewed_at"], reverse=True)

    def _review_mask(self, state: str) -> np.ndarray:
        """Rows whose latest review says ``state`` of their verdict (as REVIEW_SQL)."""
        with self.review_lock:
            if self._media is None:  # media_id as dictionary codes, -1 for null
                arr = self.shown["media_id"].combine_chunks().dictionary_encode()
                codes = pc.fill_null(arr.indices, -1).to_numpy(zero_copy_only=False)
                self._media = (codes.astype(np.int64), arr.dictionary)
            codes, dictionary = self._media
            latest = list(self.latest_review.values())
        # Per media code: 0 none, 1 fake, 2 real, 3 unsure; the last slot is for null ids.
        kind = np.zeros(len(dictionary) + 1, np.int8)
        if latest:
            where = pc.index_in(pa.array([r["media_id"] for r in latest], pa.string()),
                                value_set=dictionary).to_numpy(zero_copy_only=False)
            said = np.array([("fake", "real", "unsure").index(r["review"]) + 1
                             if r["review"] in ("fake", "real", "unsure") else 0
                             for r in latest], np.int8)
            found = ~np.isnan(where.astype(float))
            kind[where[found].astype(np.int64)] = said[found]
        row = kind[codes]  # codes == -1 reads the last slot: 0
        fake, real = self._equals("verdict", "fake"), self._equals("verdict", "real")
        return {"unreviewed": row == 0, "reviewed": row > 0, "unsure": row == 3,
                "confirmed": ((row == 1) & fake) | ((row == 2) & real),
                "overturned": ((row == 1) & real) | ((row == 2) & fake)}[state]

    # ------------------------------------------------------------------ model quality

    def quality(self, model: str | None) -> dict:
        """The measured out-of-domain quality and caveat of ``model``, from the newest run
        summary that recorded it; unmeasured when none did."""
        from deepaudit.models.checkpoint import model_quality

        best = None
        for info in self.runs.values():
            s = info.summary
            if s.get("model") == model and isinstance(s.get("model_quality"), dict):
                if best is None or str(s.get("started_at")) > str(best.get("started_at")):
                    best = s
        if best is not None:
            return best["model_quality"]
        return model_quality(None, trained=True)

    # ------------------------------------------------------------------ pages

    def run_list(self) -> list[dict]:
        def make():
            rows = self.rows("SELECT * FROM runs_t ORDER BY started DESC NULLS LAST, run_id")
            for r in rows:
                s = self.runs.get(r["run_id"], RunInfo(r["run_id"], "", "")).summary
                r["state"] = s.get("state") or "unknown"
                r["trained"] = s.get("model_trained", True)
            return rows
        return self.cache.get(("runs",), make)

    def run(self, run_id: str) -> dict:
        if run_id not in self.runs:
            raise NotFound(f"no run {run_id!r} in {self.target}")

        def make():
            info = self.runs[run_id]
            (row,) = [r for r in self.run_list() if r["run_id"] == run_id] or [{}]
            counts = {}
            for col in ("status", "verdict", "error_code"):
                counts[col] = self.rows(
                    f"SELECT coalesce({col}, 'none') AS k, count(*) AS n FROM items "
                    f"WHERE run_id = ? GROUP BY 1 ORDER BY n DESC", [run_id])
            return {"info": info, "row": row, "summary": info.summary, "counts": counts}
        return self.cache.get(("run", run_id), make)

    def scores(self, run_id: str) -> tuple[list[float], list | None]:
        from deepaudit.pipeline.render import label_value

        cur = self.cursor()
        t = cur.sql("SELECT p_fake, label FROM items WHERE run_id = ? AND p_fake IS NOT NULL",
                    params=[run_id]).to_arrow_table()
        scores = t.column("p_fake").to_pylist()
        labels = [label_value(v) for v in t.column("label").to_pylist()]
        return scores, (labels if any(v is not None for v in labels) else None)

    # Filters with at most this share of the rows sort their rows' places in the order
    # (cheap when they are few); larger ones walk the order until the page is full.
    SORT_BELOW = 1 / 16

    def page(self, query: ItemQuery) -> Page:
        desc = query.order == "desc"
        reverse = query.before is not None
        cursor = query.before if reverse else query.after
        if cursor and not 1 <= cursor[2] <= self.n_items:
            raise BadRequest("the page cursor names no row: start again from the first page")
        order, keys, position = self._order(query.sort, desc)
        n = len(order)
        # The page is the first (last: reverse) limit + 1 selected places in [lo, hi) of
        # the order; the one more tells whether there is a further page.
        lo, hi = 0, n
        if cursor and reverse:
            hi = int(position[cursor[2] - 1])
        elif cursor:
            lo = int(position[cursor[2] - 1]) + 1
        need = query.limit + 1
        mask, total = self._mask(query)
        if mask is None:  # the whole table: a slice of its order
            places = np.arange(max(lo, hi - need), hi) if reverse else \
                np.arange(lo, min(hi, lo + need))
        elif total <= n * self.SORT_BELOW:
            places = np.sort(position[np.flatnonzero(mask)])
            places = places[np.searchsorted(places, lo):np.searchsorted(places, hi)]
            places = places[-need:] if reverse else places[:need]
        else:
            places = _walk(order, mask, lo, hi, need, reverse)
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

    def _mask(self, query: ItemQuery) -> tuple[np.ndarray | None, int]:
        """``(mask, count)``: which rows (in row-id order) the query's filters select, and
        how many; ``(None, n_items)`` without filters. The same rows as its SQL ``where()``."""
        filters = query.filters()
        if not filters:
            return None, self.n_items

        def make():
            mask = np.ones(self.n_items, bool)
            if query.verdict is not None:  # "none": no verdict (null)
                mask &= self._equals("verdict", None if query.verdict == "none"
                                     else query.verdict)
            for col, value in (("status", query.status), ("media_type", query.media_type),
                               ("error_code", query.error_code), ("model", query.model),
                               ("run_id", query.run)):
                if value is not None:
                    mask &= self._equals(col, value)
            if query.p_min is not None:
                mask &= self.p_fake >= query.p_min  # float64 on both sides, as DuckDB
            if query.p_max is not None:
                mask &= self.p_fake <= query.p_max
            if query.q:
                mask &= self._text_mask(query.q.lower())
            if query.review:
                mask &= self._review_mask(query.review)
            return mask, int(np.count_nonzero(mask))

        # A review filter's rows change as reviews come in: keyed by the reviews' version.
        key = tuple(sorted(filters.items())) + ((self.review_version,) if query.review else ())
        return self.masks.get(key, make)

    def _equals(self, col: str, value: str | None) -> np.ndarray:
        """Rows whose ``col`` is ``value`` (None: is null), from its dictionary codes."""
        codes, index = self.codes[col]
        if value is None:
            return codes == -1
        return codes == index[value] if value in index else np.zeros(len(codes), bool)

    def _text_mask(self, text: str) -> np.ndarray:
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

    def _order(self, sort: str, desc: bool):
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

    def item(self, run_id: str, row: int) -> dict:
        cols = ", ".join(f'"{c}"' for c in self.item_columns)
        found = self.rows(f"SELECT {cols} FROM items WHERE run_id = ? AND manifest_row = ?",
                          [run_id, row])
        if not found:
            raise NotFound(f"no item {row} in run {run_id!r}")
        item = found[0]
        if any(c in self.columns for c in LIST_COLUMNS):
            extra = self.cache.get(("lists", run_id, row), lambda: self._lists(run_id, row))
            item.update(extra)
        return item

    def _lists(self, run_id: str, row: int) -> dict:
        """The item's list columns, read from its run's verdict file (the row groups whose
        manifest_row range holds ``row``); :class:`Gone` when the file was removed or
        rewritten since the start."""
        for src in self.sources.get(run_id, ()):
            found = src.read_row(run_id, row)
            if found is not None:
                return found
        return {}

    def history(self, media_id: str) -> list[dict]:
        return self.rows("SELECT run_id, manifest_row, model, audited_at, status, error_code, "
                         "verdict, p_fake FROM items WHERE media_id = ? "
                         "ORDER BY audited_at DESC, run_id", [media_id])

    def ledger_entries(self, media_id: str) -> list[dict]:
        if not self.is_ledger:
            return []
        return self.rows("SELECT run_id, model, audited_at, status, error_code, attempts, "
                         "change_key FROM ledger_t WHERE media_id = ? ORDER BY audited_at DESC",
                         [media_id])

    # ------------------------------------------------------------------ files

    def media_source(self, uri: str | None) -> tuple[Any, str] | None:
        """``(fs, path)`` to draw an item's source media from, or None: a local path, or
        an ``s3://`` key in a bucket this output names (its own, its verdict files', its
        runs' manifests'): a row cannot send the server to any bucket it likes."""
        if not uri or not isinstance(uri, str) or "\x00" in uri:
            return None
        if is_s3(uri) and _bucket(uri) not in self.buckets:
            return None
        try:
            return filesystem_for(uri, self.storage)
        except storage_errors():
            return None

    def media_reachable(self, uri: str | None) -> bool:
        found = self.media_source(uri)
        if found is None:
            return False
        fs, path = found
        try:
            return bool(fs.isfile(path))
        except storage_errors() as exc:  # no credentials, an unreachable endpoint
            log.info("serve: media %s not reachable: %s", uri, exc)
            return False

    def evidence(self, item: dict, suffix: str) -> tuple[Any, str] | None:
        """``(fs, path)`` of the item's evidence strip (``.png``) or its JSON, only when
        it lies under ``OUT/evidence/`` of the item's own run; else None."""
        from deepaudit.pipeline.evidence import evidence_dirname, safe_filename

        info = self.runs.get(item.get("run_id"))
        if info is None:
            return None
        root = join(info.root, "evidence")
        candidates = []
        if item.get("evidence"):
            candidates.append(item["evidence"])
        candidates.append(join(root, evidence_dirname(item["media_id"]),
                               safe_filename(item["run_id"]) + ".png"))
        for cand in candidates:
            if not isinstance(cand, str) or not cand.endswith(".png"):
                continue
            cand = cand[: -len(".png")] + suffix
            resolved = _under(cand, root, self.storage)
            if resolved is None:
                continue
            fs, path = resolved
            try:
                if fs.isfile(path):
                    return fs, path
            except storage_errors():
                continue
        return None


def _walk(order: np.ndarray, mask: np.ndarray, lo: int, hi: int, need: int,
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


def _under(uri: str, root: str, storage: StorageConfig) -> tuple[Any, str] | None:
    """``(fs, path)`` of ``uri`` when it resolves inside ``root`` (same scheme, no ``..``,
    symlinks followed for local paths); None otherwise."""
    if is_s3(uri) != is_s3(root) or "\x00" in uri:
        return None
    if is_s3(uri):
        key, base = uri.split("://", 1)[1], root.split("://", 1)[1].rstrip("/")
        if ".." in key.split("/") or posixpath.normpath(key) != key:
            return None
        if not key.startswith(base + "/"):
            return None
        fs, _ = filesystem_for(root, storage)
        return fs, key
    fs, path = filesystem_for(uri, storage)
    _, base = filesystem_for(root, storage)
    real, real_base = os.path.realpath(path), os.path.realpath(base)
    if os.path.commonpath([real, real_base]) != real_base or real == real_base:
        return None
    return fs, real


def _bucket(uri: str) -> str:
    return uri.split("://", 1)[1].split("/", 1)[0]


def storage_errors() -> tuple[type[BaseException], ...]:
    """What reading a file may raise: OS and Arrow errors, and botocore's own (missing
    credentials, an unreachable endpoint) for s3://."""
    errors: tuple = (OSError, ValueError, pa.ArrowException)
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        errors += (BotoCoreError, ClientError)
    except ImportError:
        pass
    return errors


def _stamp(info: dict) -> tuple:
    """What tells a rewritten file from the one read at start: size and modification time
    (local; plus the inode), or size, ETag and LastModified (S3)."""
    return (info.get("size"), info.get("mtime"), info.get("ino"), info.get("ETag"),
            str(info.get("LastModified") or ""))


@dataclass
class Source:
    """One verdict file as it was when the snapshot was taken."""

    run_id: str
    uri: str
    fs: Any
    path: str
    stamp: tuple
    groups: list[tuple[int, int | None, int | None]]  # (row group, min, max manifest_row)

    def read_row(self, run_id: str, row: int) -> dict | None:
        """The list columns of the verdict row (run_id, row) in this file, None when it is
        not here; :class:`Gone` when the file is gone, changed or unreadable."""
        groups = [g for g, lo, hi in self.groups
                  if lo is None or hi is None or lo <= row <= hi]
        if not groups:
            return None
        gone = (f"run {run_id!r} was removed or rewritten after this server started "
                f"({self.uri}): restart deepaudit serve to see the runs as they are now")
        try:
            if _stamp(self.fs.info(self.path)) != self.stamp:
                raise Gone(gone)
            import pyarrow.parquet as pq

            # A plain, synchronous read of the file opened now (never the start's dataset).
            with self.fs.open(self.path, "rb") as f:
                pf = pq.ParquetFile(f)
                names = set(pf.schema_arrow.names)
                cols = [c for c in LIST_COLUMNS if c in names]
                for g in groups:
                    t = pf.read_row_group(g, columns=["run_id", "manifest_row", *cols],
                                          use_threads=False)
                    hit = pc.and_(pc.equal(t["manifest_row"], row),
                                  pc.equal(t["run_id"], run_id))
                    found = t.filter(pc.fill_null(hit, False))
                    if found.num_rows:
                        return {c: found[c][0].as_py() for c in cols}
        except Gone:
            raise
        except FileNotFoundError:
            raise Gone(gone) from None
        except storage_errors() as exc:
            log.warning("serve: reading %s failed: %s", self.uri, exc)
            raise Unavailable(f"run {run_id!r}'s verdict file cannot be read now "
                              f"({type(exc).__name__}): check the storage and its "
                              "credentials") from None
        return None


def _sources(con, target: str, storage: StorageConfig) -> dict[str, list[Source]]:
    """Every run's verdict files, with their stamps and manifest_row ranges per row group
    (from the Parquet footers): under OUT/runs/<run_id>/, or those the ledger names."""
    import pyarrow.parquet as pq

    ledger = con.execute("SELECT DISTINCT run_id, verdict_file FROM ledger "
                         "WHERE verdict_file IS NOT NULL").fetchall()
    if ledger:
        files = sorted(ledger, key=lambda r: (str(r[0]), r[1]))
    else:
        fs, path = filesystem_for(target, storage)
        files = []
        for f in sorted(fs.glob(f"{path}/runs/*/verdicts-*.parquet")):
            uri = f"s3://{f}" if is_s3(target) else f
            files.append((f.rstrip("/").rsplit("/", 2)[-2], uri))
    found: dict[str, list[Source]] = {}
    filesystems: dict[bool, Any] = {}  # one S3 filesystem (a client each) for all the files
    for run_id, uri in files:
        fs, path = filesystem_for(uri, storage)
        fs = filesystems.setdefault(is_s3(uri), fs)
        try:
            stamp = _stamp(fs.info(path))
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
        except storage_errors() as exc:  # the snapshot will say what is wrong
            log.warning("serve: cannot read %s: %s", uri, exc)
            continue
        names = [meta.schema.column(i).name for i in range(meta.num_columns)]
        j = names.index("manifest_row") if "manifest_row" in names else None
        groups = []
        for g in range(meta.num_row_groups):
            st = meta.row_group(g).column(j).statistics if j is not None else None
            ok = st is not None and st.has_min_max
            groups.append((g, st.min if ok else None, st.max if ok else None))
        found.setdefault(run_id, []).append(Source(run_id, uri, fs, path, stamp, groups))
    return found


def open_archive(target: str, storage: StorageConfig | None = None) -> Archive:
    try:
        return Archive(target, storage)
    except (OSError, pa.ArrowException) as exc:
        raise QueryError(f"cannot read {target} ({type(exc).__name__}: {exc})") from None
