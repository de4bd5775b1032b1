"""What ``deepaudit serve`` reads: the views of ``deepaudit query`` over an audit output or
a ledger, one snapshot taken at start (:class:`Archive`).

At start the ``verdicts`` view (see :mod:`deepaudit.pipeline.query`) is copied, without its
list columns, into an in-memory DuckDB table ``items`` with a row id ``_id``: every page
then reads memory, never the Parquet (or S3) again, and a million rows sort and filter
in milliseconds. The lazy views are dropped once the snapshot is taken, so nothing scans
the target's files through DuckDB again. Nothing is ever written to the target here.

The snapshot's parts, each in its module: the items pages and exports (:mod:`.paging`,
over :mod:`.item_query`), the reviews (:mod:`.review_index`), and the files read later, an
item's list columns, evidence and media (:mod:`.files`). The runs, an item's row, its
history and its ledger entries are here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading

import pyarrow as pa

from deepaudit.infra.storage import StorageConfig, filesystem_for, is_s3, join
from deepaudit.pipeline import reviews as rv
from deepaudit.pipeline.query import QueryError, connect
from deepaudit.serve.common import (  # noqa: F401 (re-exported: the pages' errors)
    LRU,
    BadRequest,
    Gone,
    NotFound,
    Unavailable,
    storage_errors,
)
from deepaudit.serve.files import LIST_COLUMNS, MediaFiles, RunInfo, bucket, verdict_sources
from deepaudit.serve.item_query import (  # noqa: F401 (re-exported)
    LIST_SHOWN,
    LOW_CARDINALITY,
    MEDIA_TYPES,
    REVIEW_FILTERS,
    STATUSES,
    VERDICTS,
    ItemQuery,
    Page,
    decode_cursor,
    encode_cursor,
)
from deepaudit.serve.paging import Pager
from deepaudit.serve.review_index import ReviewIndex

log = logging.getLogger(__name__)


class Archive:
    """One read-only snapshot of an audit output or a ledger: ``pages`` (items pages and
    exports), ``reviews`` (the latest review per media id, and every one), ``files`` (an
    item's evidence and media)."""

    def __init__(self, target: str, storage: StorageConfig | None = None) -> None:
        self.target = target
        self.storage = storage or StorageConfig()
        con = connect(target, self.storage)  # QueryError when it is not one
        self.con = con
        # Each run's verdict files as they are now, before the snapshot reads them: an
        # item's list columns are read from its file later, only while it is unchanged.
        self.sources = verdict_sources(con, target, self.storage)
        self.local = threading.local()
        # Queries at once: one per core, the rest wait their turn (first come, first
        # served) instead of all sharing the cores, which makes every one slow.
        self.slots = threading.BoundedSemaphore(max(1, min(4, os.cpu_count() or 1)))
        self.cache = LRU()
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
        # Views over registered Arrow data are seen by this connection only: copy what the
        # pages read into tables, which every thread's cursor sees.
        con.execute("CREATE TABLE runs_t AS SELECT * FROM runs")
        con.execute("CREATE TABLE ledger_t AS SELECT media_id, run_id, model, audited_at, "
                    "status, error_code, attempts, change_key, verdict_file FROM ledger")
        self.is_ledger = con.execute("SELECT count(*) FROM ledger_t").fetchone()[0] > 0
        self.item_columns = [r[0] for r in con.execute("DESCRIBE items").fetchall()
                             if not r[0].startswith("_")]
        self.runs = self._run_infos()
        self.buckets = {bucket(u) for u in [target, *(src.uri for files in
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
        # then kept up to date in memory as this server writes them (reviews.add).
        self.reviews = ReviewIndex(con, self.shown["media_id"])
        try:
            start = con.sql("SELECT * FROM reviews").to_arrow_table()
        except Exception:  # noqa: BLE001 - a query.py without the view: read them here
            start = rv.read_reviews(target, self.storage)
        self.reviews.add(start)
        self.pages = Pager(con, self.shown, self.item_columns, self.reviews, self.cursor,
                           self.slots)
        self.files = MediaFiles(self.runs, self.buckets, self.storage)
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

    # ------------------------------------------------------------------ runs and items

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
            raise NotFound(f"no run {run_id!r} in this output")  # no server paths

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

    # ------------------------------------------------------------------ the parts

    def page(self, query: ItemQuery) -> Page:
        return self.pages.page(query)

    def export(self, query: ItemQuery, batch_rows: int = 50_000):
        return self.pages.export(query, batch_rows)

    def check_current(self, run_id: str) -> None:
        """:class:`Gone` when a verdict file of the run is gone or changed since the start
        (the output deleted, or replaced by a file): nothing should be written for it."""
        for src in self.sources.get(run_id, ()):
            src.check()


def open_archive(target: str, storage: StorageConfig | None = None) -> Archive:
    try:
        return Archive(target, storage)
    except (OSError, pa.ArrowException) as exc:
        raise QueryError(f"cannot read {target} ({type(exc).__name__}: {exc})") from None
