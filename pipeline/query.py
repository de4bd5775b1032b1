"""SQL over verdicts with DuckDB (``deepaudit query OUT_OR_LEDGER "SQL"``, and serve).

The Parquet files are opened with pyarrow (through s3fs for ``s3://``, so the endpoint,
retries and credentials are the audit's own, and nothing is downloaded at run time as
DuckDB's httpfs extension would) and handed to DuckDB as lazy Arrow datasets: DuckDB
pushes column selections and filters down, so a query reads only what it needs.

Views (the same names whether the target is an OUT folder or a ledger):

* ``verdicts``: every verdict row of every run (under OUT/runs, or that the ledger points to)
* ``latest``: the latest verdict per (media_id, model), with ``review``: the latest review
  of its media_id (fake, real, unsure; null when none)
* ``reviews``: every review (OUT/_reviews/, written by ``deepaudit serve``)
* ``runs``: one row per run: run_id, started, finished, rows, fakes, errors, model
* ``last_run``: the verdict rows of the most recent run
* ``ledger`` and ``ledger_latest``: the ledger's entries (a ledger target only)
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pyarrow.fs import FSSpecHandler, PyFileSystem

from deepaudit.infra.storage import (
    StorageConfig,
    filesystem_for,
    is_s3,
    open_readable,
)
from deepaudit.pipeline.ledger import LEDGER_SCHEMA, Ledger
from deepaudit.pipeline.schema import VERDICT_SCHEMA


class QueryError(ValueError):
    """The target cannot be queried; the message says why."""


def _dataset(fs, files: list[str]) -> pads.Dataset:
    """One dataset over Parquet files whose schemas may differ (manifest extras differ
    between runs): the union of their schemas, read from the footers only."""
    arrow_fs = PyFileSystem(FSSpecHandler(fs))
    if not files:
        return pads.dataset(VERDICT_SCHEMA.empty_table())
    schemas = []
    for f in files:
        with fs.open(f, "rb") as fh:
            schemas.append(pq.read_schema(fh))
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    return pads.dataset(files, schema=schema, format="parquet", filesystem=arrow_fs)


def _verdict_files(out: str, storage: StorageConfig) -> tuple[object, list[str]]:
    fs, path = filesystem_for(out, storage)
    files = fs.glob(f"{path}/runs/*/verdicts-*.parquet")
    return fs, sorted(files)


def open_target(target: str, storage: StorageConfig | None = None):
    """A DuckDB connection with the views above registered for ``target``."""
    import duckdb

    storage = storage or StorageConfig()
    fs, path = open_readable(target, storage, "TARGET", QueryError)
    if not fs.exists(path):
        raise QueryError(f"{target} does not exist")
    con = duckdb.connect()
    ledger = Ledger(target, storage)
    if ledger.parts():
        entries = ledger.read()
        files = sorted({f for f in entries["verdict_file"].to_pylist() if f})
        vfs = filesystem_for(files[0], storage)[0] if files else fs
        con.register("_ledger", pads.dataset(entries))
        con.execute("CREATE VIEW ledger AS SELECT * FROM _ledger")
        con.execute(
            "CREATE VIEW ledger_latest AS SELECT * FROM ledger QUALIFY row_number() OVER "
            "(PARTITION BY media_id, model ORDER BY audited_at DESC) = 1")
        verdicts = _dataset(vfs, [f.split("://", 1)[1] if is_s3(f) else f for f in files])
    elif fs.exists(f"{path}/runs"):
        vfs, files = _verdict_files(target, storage)
        verdicts = _dataset(vfs, files)
        con.register("_ledger", pads.dataset(LEDGER_SCHEMA.empty_table()))
        con.execute("CREATE VIEW ledger AS SELECT * FROM _ledger")
        con.execute("CREATE VIEW ledger_latest AS SELECT * FROM _ledger")
    else:
        raise QueryError(f"{target} is neither an audit output (no runs/ folder) nor a ledger "
                         "(no part-*.parquet files)")
    con.register("_verdicts", verdicts)
    con.execute("CREATE VIEW verdicts AS SELECT * FROM _verdicts")
    # Reviews (OUT/_reviews/, pipeline/reviews.py): every row, and the latest per media id
    # as latest's review column (null when none).
    from deepaudit.pipeline.reviews import latest_reviews, read_reviews

    reviews = read_reviews(target, storage)
    con.register("_reviews", reviews)
    con.register("_review_of", latest_reviews(reviews).select(["media_id", "review"]))
    con.execute("CREATE VIEW reviews AS SELECT * FROM _reviews")
    has_review = "review" in verdicts.schema.names  # a manifest column of that name
    pick = "v.* REPLACE (r.review AS review)" if has_review else "v.*, r.review"
    con.execute(
        f"CREATE VIEW latest AS SELECT {pick} FROM verdicts v LEFT JOIN _review_of r "
        "USING (media_id) QUALIFY row_number() OVER (PARTITION BY v.media_id, v.model "
        "ORDER BY v.audited_at DESC) = 1")
    # One clock: a run's start is its summary's started_at (also in the ledger's run.json);
    # the first row's audited_at only stands in for runs that recorded neither.
    con.register("_run_info", _run_info(target, storage))
    con.execute(
        "CREATE VIEW runs AS SELECT v.run_id, coalesce(any_value(i.started_at), "
        "min(v.audited_at)) AS started, coalesce(any_value(i.finished_at), max(v.audited_at)) "
        "AS finished, count(*) AS rows, "
        "count(*) FILTER (WHERE v.verdict = 'fake') AS fakes, "
        "count(*) FILTER (WHERE v.status = 'error') AS errors, any_value(v.model) AS model "
        "FROM verdicts v LEFT JOIN _run_info i ON v.run_id = i.run_id GROUP BY v.run_id")
    con.execute(
        "CREATE VIEW last_run AS SELECT * FROM verdicts WHERE run_id = "
        "(SELECT run_id FROM runs ORDER BY started DESC LIMIT 1)")
    return con


RUN_INFO_SCHEMA = pa.schema([("run_id", pa.string()),
                             ("started_at", pa.timestamp("us", tz="UTC")),
                             ("finished_at", pa.timestamp("us", tz="UTC"))])


def _run_info(target: str, storage: StorageConfig) -> pa.Table:
    """run_id, started_at, finished_at of every run with a summary (OUT/runs/*/
    _summary.json) or a ledger record (LEDGER/_runs/*/run.json and done.json)."""
    from datetime import datetime

    fs, path = filesystem_for(target, storage)
    info: dict[str, dict] = {}
    for pattern, keys in ((f"{path}/_runs/*/run.json", ("started_at",)),
                          (f"{path}/_runs/*/done.json", ("finished_at",)),
                          (f"{path}/runs/*/_summary.json", ("started_at", "finished_at"))):
        for f in fs.glob(pattern):
            try:
                with fs.open(f, "r") as fh:
                    doc = json.load(fh)
            except (OSError, ValueError):
                continue
            row = info.setdefault(f.rstrip("/").rsplit("/", 2)[-2], {})
            for k in keys:
                if doc.get(k):
                    row[k] = datetime.fromisoformat(doc[k])
    return pa.table({"run_id": list(info),
                     "started_at": [v.get("started_at") for v in info.values()],
                     "finished_at": [v.get("finished_at") for v in info.values()]},
                    schema=RUN_INFO_SCHEMA)


def connect(target: str, storage: StorageConfig | None = None):
    """:func:`open_target`, with an unreadable target reported as a :class:`QueryError`
    (what ``deepaudit query`` and ``deepaudit serve`` open)."""
    try:
        return open_target(target, storage)
    except QueryError:
        raise
    except (OSError, pa.ArrowException) as exc:  # unreadable, not Parquet, no permission
        raise QueryError(f"cannot read {target} ({type(exc).__name__}: {exc}); check the path "
                         "and that the credentials may read it") from None


def run_query(target: str, sql: str, storage: StorageConfig | None = None) -> pa.Table:
    """Run ``sql`` against ``target``'s views and return the result as an Arrow table."""
    import duckdb

    con = connect(target, storage)
    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as exc:
        raise QueryError(f"{type(exc).__name__}: {exc}") from None
    finally:
        con.close()
