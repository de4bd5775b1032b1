"""The audit ledger: an append-only record of every media item audited, so a rerun over
a growing archive audits only what is new, changed, or worth retrying.

Layout of LEDGER (a local folder or an ``s3://`` prefix)::

    LEDGER/part-<run_id>-<nnnnn>.parquet          rows of verdict file nnnnn of that run
    LEDGER/part-<run_id>-recovered-<nnnnn>.parquet  the same, written by a later run after a crash
    LEDGER/_runs/<run_id>/run.json                the run: output folder, model, start time
    LEDGER/_runs/<run_id>/plan.arrow              what it set out to audit (key, attempt)
    LEDGER/_runs/<run_id>/done.json               written when the run ends (or is recovered)

The folder reads as plain Parquet: ``pyarrow.dataset.dataset("LEDGER/")`` skips paths
that start with ``_`` or ``.`` (the bookkeeping, temporary files), and no bookkeeping
file ends in ``.parquet``, so DuckDB's ``read_parquet('LEDGER/**/*.parquet')`` also
returns exactly the entries. Ledgers written before this layout (``runs/``, with
``plan.parquet``) are moved over on first use (:meth:`Ledger.migrate`).

Nothing is ever rewritten. A part is written right after its verdict file is durably
closed, and files only ever appear complete (temporary name + rename locally; on S3 an
object exists only once its upload completes). A run that crashes between the two
leaves a verdict file the ledger does not cover: the next run finds it through the
crashed run's ``run.json`` (no ``done.json``), and ledgers its rows from its own plan,
so they are neither redone nor duplicated.

Reading the ledger reads every part and keeps the latest entry per (media_id, model).
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from pyarrow.fs import FSSpecHandler, PyFileSystem

from deepaudit.infra.storage import StorageConfig, filesystem_for, is_s3, join

log = logging.getLogger(__name__)

LEDGER_SCHEMA = pa.schema(
    [
        ("media_id", pa.string()),
        ("uri", pa.string()),
        ("change_key", pa.string()),  # size+etag (S3) or size+mtime (local), from the listing
        ("model", pa.string()),  # the model id: name@sha256-prefix
        ("run_id", pa.string()),
        ("status", pa.string()),  # ok / no_face / error
        ("error_code", pa.string()),  # the error's code (before the colon), null unless error
        ("attempts", pa.int32()),  # audits of this item with this model and change key
        ("verdict_file", pa.string()),  # URI of the Parquet file holding the verdict row
        ("manifest_row", pa.int64()),  # the row's position in that run's manifest
        ("audited_at", pa.timestamp("us", tz="UTC")),
    ]
)
# What a run set out to audit: enough to ledger its verdict files if it crashes.
PLAN_SCHEMA = pa.schema(
    [
        ("manifest_row", pa.int64()),
        ("media_id", pa.string()),
        ("uri", pa.string()),
        ("change_key", pa.string()),
        ("attempt", pa.int32()),
        ("reason", pa.string()),
    ]
)

# Why an item is audited (or not) in this run.
NEW, CHANGED, NEW_MODEL, RETRY = "new", "changed", "new_model", "retry"
SKIPPED, GAVE_UP = "skipped", "gave_up"
REASONS = (NEW, CHANGED, NEW_MODEL, RETRY, SKIPPED, GAVE_UP)
DONE_STATUSES = ("ok", "no_face")


@dataclass(frozen=True)
class LedgerPolicy:
    """What a rerun redoes."""

    max_attempts: int = 3  # an item that errored this many times is left alone
    retry_errors: bool = False  # retry errored items whatever their attempt count
    any_model: bool = False  # an unchanged item audited by any model counts as done

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")


def error_code(status: str | None, error: str | None) -> str | None:
    if status != "error" or not error:
        return None
    return error.split(":", 1)[0].strip()


def latest_entries(entries: pa.Table, keys: tuple[str, ...] = ("media_id", "model")) -> pa.Table:
    """The latest entry per ``keys``: by ``audited_at``, then by the order parts were read."""
    return latest_rows(entries, keys, "audited_at")


def latest_rows(table: pa.Table, keys: tuple[str, ...], time_column: str) -> pa.Table:
    """The latest row per ``keys``: by ``time_column``, then by the order rows were read
    (the ledger's entries, the reviews)."""
    if table.num_rows == 0:
        return table
    n = table.num_rows
    t = table.append_column("_read", pa.array(np.arange(n), pa.int64()))
    t = t.sort_by([(time_column, "ascending"), ("_read", "ascending")])
    t = t.append_column("_pos", pa.array(np.arange(n), pa.int64()))
    last = t.group_by(list(keys), use_threads=False).aggregate([("_pos", "max")])
    picked = pc.sort_indices(last["_pos_max"])
    return t.take(pc.take(last["_pos_max"], picked)).drop_columns(["_read", "_pos"])


def decide(items: pa.Table, entries: pa.Table, model: str, policy: LedgerPolicy) -> pa.Table:
    """Per manifest row: why it is audited, or skipped, and its attempt number.

    ``items`` has ``manifest_row``, ``media_id`` and ``change_key``; ``entries`` is the
    ledger as read. Returns ``manifest_row``, ``reason`` (one of :data:`REASONS`) and
    ``attempt`` (the attempt this run would be, for this model and change key), in the
    order of ``items``.
    """
    n = items.num_rows
    base = items.select(["manifest_row", "media_id", "change_key"]).append_column(
        "_order", pa.array(np.arange(n), pa.int64()))
    if entries.num_rows == 0:
        return pa.table({"manifest_row": items["manifest_row"],
                         "reason": pa.array([NEW] * n, pa.string()),
                         "attempt": pa.array(np.ones(n, np.int32))})
    cols = ["media_id", "change_key", "status", "attempts", "model"]
    by_any = latest_entries(entries, ("media_id",)).select(cols)
    by_model = latest_entries(entries.filter(pc.equal(entries["model"], model))).select(cols)
    ref = by_any if policy.any_model else by_model
    ref = ref.rename_columns(["media_id", "ref_key", "ref_status", "ref_attempts", "ref_model"])
    anyt = by_any.select(["media_id", "change_key"]).rename_columns(["media_id", "any_key"])
    t = base.join(ref, "media_id", join_type="left outer").join(
        anyt, "media_id", join_type="left outer").sort_by("_order")

    def filled(name: str) -> np.ndarray:
        return np.asarray(pc.fill_null(t[name], "").to_pylist(), dtype=object)

    key, ref_key, any_key = filled("change_key"), filled("ref_key"), filled("any_key")
    has_ref = np.asarray(pc.is_valid(t["ref_status"]).to_pylist(), bool)
    has_any = np.asarray(pc.is_valid(t["any_key"]).to_pylist(), bool)
    status = filled("ref_status")
    attempts = np.asarray(pc.fill_null(t["ref_attempts"], 0).to_pylist(), np.int32)

    same = has_ref & (ref_key == key)
    done = same & np.isin(status, DONE_STATUSES)
    errored = same & (status == "error")
    gave_up = errored & (attempts >= policy.max_attempts) & (not policy.retry_errors)
    retry = errored & ~gave_up
    reason = np.full(n, CHANGED, dtype=object)
    reason[~has_any] = NEW
    reason[has_any & ~has_ref & (any_key == key)] = NEW_MODEL
    reason[retry] = RETRY
    reason[gave_up] = GAVE_UP
    reason[done] = SKIPPED
    attempt = np.where(retry | gave_up, attempts + 1, 1).astype(np.int32)
    return pa.table({"manifest_row": t["manifest_row"],
                     "reason": pa.array(reason.tolist(), pa.string()),
                     "attempt": pa.array(attempt)})


def change_keys(manifest: pa.Table, storage: StorageConfig | None = None,
                workers: int = 32) -> pa.Array:
    """The change key of every manifest row, without reading any object.

    From the manifest's own ``size`` and ``etag``/``mtime`` columns when it has them
    (``deepaudit manifest`` and prefix listings write them), else from a parallel stat of
    each uri (a HEAD request on S3). ``size=N;etag=E`` on S3, ``size=N;mtime_us=T``
    locally; null when the object cannot be stat'ed (it is then always audited).
    """
    names = manifest.column_names
    if "size" in names and ("etag" in names or "mtime" in names):
        size = manifest["size"].to_pylist()
        etag = manifest["etag"].to_pylist() if "etag" in names else [None] * len(size)
        mtime = (pc.cast(manifest["mtime"], pa.int64()).to_pylist() if "mtime" in names
                 else [None] * len(size))
        return pa.array([_key(s, e, m) for s, e, m in zip(size, etag, mtime)], pa.string())
    uris = manifest["uri"].to_pylist()
    if not uris:
        return pa.array([], pa.string())
    s3 = any(is_s3(u) for u in uris if u)
    fs = filesystem_for("s3://x", storage)[0] if s3 else None

    def stat(uri: str | None) -> str | None:
        if not uri:
            return None
        try:
            if is_s3(uri):
                info = fs.info(uri.split("://", 1)[1])
                return _key(info.get("size"), str(info.get("ETag") or "").strip('"'), None)
            st = os.stat(filesystem_for(uri)[1])
            return _key(st.st_size, None, st.st_mtime_ns // 1000)
        except (OSError, ValueError):
            return None

    with ThreadPoolExecutor(workers if s3 else 4) as pool:
        return pa.array(list(pool.map(stat, uris, chunksize=64)), pa.string())


def _key(size, etag, mtime_us) -> str | None:
    if size is None:
        return None
    if etag:
        return f"size={int(size)};etag={etag}"
    if mtime_us is not None:
        return f"size={int(size)};mtime_us={int(mtime_us)}"
    return None


RUNS = "_runs"  # per-run bookkeeping; a leading '_' keeps it out of dataset reads
LEGACY_RUNS = "runs"


def _arrow_fs(fs):
    return PyFileSystem(FSSpecHandler(fs))


class Ledger:
    """One ledger folder. Cheap to create: nothing is read until asked."""

    def __init__(self, uri: str, storage: StorageConfig | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.storage = storage or StorageConfig()
        self.fs, self.path = filesystem_for(self.uri, self.storage)
        self.remote = is_s3(self.uri)

    # -- reading ---------------------------------------------------------------------
    def parts(self) -> list[str]:
        if not self.fs.exists(self.path):
            return []
        names = self.fs.ls(self.path, detail=False)
        return sorted(p for p in names
                      if p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".parquet"))

    def read(self) -> pa.Table:
        """Every entry of every part, in part-name order. A verdict file ledgered twice
        (a run reconciled while it was in fact still running) counts once."""
        parts = self.parts()
        if not parts:
            return LEDGER_SCHEMA.empty_table()
        ds = pads.dataset(parts, schema=LEDGER_SCHEMA, format="parquet",
                          filesystem=_arrow_fs(self.fs))
        t = ds.to_table()
        t = t.append_column("_i", pa.array(np.arange(t.num_rows), pa.int64()))
        first = t.group_by(["media_id", "model", "verdict_file"], use_threads=False).aggregate(
            [("_i", "min")])["_i_min"]
        if len(first) < t.num_rows:
            t = t.take(pc.take(first, pc.sort_indices(first)))  # keep the read order
        return t.drop_columns(["_i"])

    def latest(self) -> pa.Table:
        return latest_entries(self.read())

    # -- writing ---------------------------------------------------------------------
    def _write_table(self, name: str, table: pa.Table) -> str:
        """Write a Parquet file that only ever appears complete."""
        self.fs.makedirs(self.path, exist_ok=True)
        final = f"{self.path}/{name}"
        if self.remote:
            with self.fs.open(final, "wb") as f:
                pq.write_table(table, f, compression="zstd")
        else:
            folder, base = final.rsplit("/", 1)
            os.makedirs(folder, exist_ok=True)
            tmp = f"{folder}/.{base}.inprogress"
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, final)
        return final

    def _write_bytes(self, name: str, data: bytes) -> None:
        """Write a file that only ever appears complete (a rename locally, one PUT on S3)."""
        final = f"{self.path}/{name}"
        folder, base = final.rsplit("/", 1)
        self.fs.makedirs(folder, exist_ok=True)
        if self.remote:
            self.fs.pipe_file(final, data)
        else:
            tmp = f"{folder}/.{base}.inprogress"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)

    def _write_json(self, name: str, payload: dict) -> None:
        self._write_bytes(name, json.dumps(payload, indent=2, default=str).encode())

    def _write_plan(self, name: str, plan: pa.Table) -> None:
        """The plan as an Arrow IPC file: not ``*.parquet``, so no Parquet glob sees it."""
        sink = pa.BufferOutputStream()
        with ipc.new_file(sink, plan.schema) as w:
            w.write_table(plan)
        self._write_bytes(name, sink.getvalue().to_pybytes())

    def read_plan(self, run_id: str) -> pa.Table:
        folder = f"{self.path}/{RUNS}/{run_id}"
        if self.fs.exists(f"{folder}/plan.arrow"):
            with self.fs.open(f"{folder}/plan.arrow", "rb") as f:
                return ipc.open_file(pa.BufferReader(f.read())).read_all()
        with self.fs.open(f"{folder}/plan.parquet", "rb") as f:  # moved, not yet converted
            return pq.read_table(f)

    def migrate(self) -> int:
        """Move a pre-``_runs`` ledger's ``runs/<id>/`` bookkeeping to ``_runs/<id>/``,
        plans converted to ``plan.arrow``. Returns the runs moved (0: nothing to do)."""
        legacy = f"{self.path}/{LEGACY_RUNS}"
        if not self.fs.exists(legacy):
            return 0
        moved = 0
        for folder in sorted(self.fs.ls(legacy, detail=False)):
            run_id = folder.rstrip("/").rsplit("/", 1)[-1]
            for src in sorted(self.fs.find(folder)):
                name = src.rsplit("/", 1)[-1]
                if name == "plan.parquet":
                    with self.fs.open(src, "rb") as f:
                        self._write_plan(f"{RUNS}/{run_id}/plan.arrow", pq.read_table(f))
                    self.fs.rm_file(src)
                elif not name.startswith("."):
                    dst = f"{self.path}/{RUNS}/{run_id}/{name}"
                    self.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
                    self.fs.mv(src, dst)
            moved += 1
        self.fs.rm(legacy, recursive=True)
        log.warning("ledger %s: moved the bookkeeping of %d run(s) from runs/ to %s/", self.uri,
                    moved, RUNS)
        return moved

    def start_run(self, run_id: str, output_dir: str, model: str, plan: pa.Table,
                  started_at: datetime | None = None) -> None:
        """Record a run before it writes anything: where its verdicts go and its plan
        (``started_at``: the run's own clock, as in its summary)."""
        self._write_plan(f"{RUNS}/{run_id}/plan.arrow",
                         plan.select(PLAN_SCHEMA.names).cast(PLAN_SCHEMA))
        self._write_json(f"{RUNS}/{run_id}/run.json", {
            "run_id": run_id, "output": output_dir, "model": model,
            "started_at": (started_at or datetime.now(timezone.utc)).isoformat(),
        })

    def finish_run(self, run_id: str, **info) -> None:
        self._write_json(f"{RUNS}/{run_id}/done.json",
                         {"run_id": run_id, "finished_at": datetime.now(timezone.utc).isoformat(),
                          **info})

    def append(self, name: str, rows: pa.Table) -> str:
        """Write one part ``part-<name>.parquet`` with :data:`LEDGER_SCHEMA` rows."""
        return self._write_table(f"part-{name}.parquet",
                                 rows.select(LEDGER_SCHEMA.names).cast(LEDGER_SCHEMA))

    # -- crash recovery --------------------------------------------------------------
    def unfinished_runs(self, exclude: str | None = None) -> list[dict]:
        """``run.json`` of every run that has no ``done.json``."""
        runs_dir = f"{self.path}/{RUNS}"
        if not self.fs.exists(runs_dir):
            return []
        files = self.fs.find(runs_dir)
        started = {p.rsplit("/", 2)[-2] for p in files if p.endswith("/run.json")}
        done = {p.rsplit("/", 2)[-2] for p in files if p.endswith("/done.json")}
        out = []
        for run_id in sorted(started - done - {exclude}):
            with self.fs.open(f"{runs_dir}/{run_id}/run.json", "r") as f:
                out.append(json.load(f))
        return out

    def reconcile(self, entries: pa.Table, current_run: str | None = None) -> pa.Table:
        """Ledger the rows of complete verdict files of unfinished earlier runs that no
        part covers; return the entries written (empty when there was nothing to do)."""
        covered = set(pc.unique(entries["verdict_file"]).to_pylist()) if entries.num_rows else set()
        written = []
        for run in self.unfinished_runs(exclude=current_run):
            run_id, output = run["run_id"], run["output"]
            out_fs, out_path = filesystem_for(output, self.storage)
            files = []
            if out_fs.exists(out_path):
                files = sorted(p for p in out_fs.ls(out_path, detail=False)
                               if p.rsplit("/", 1)[-1].startswith("verdicts-")
                               and p.endswith(".parquet"))
            orphans = [p for p in files if join(output, p.rsplit("/", 1)[-1]) not in covered]
            if orphans:
                plan = self.read_plan(run_id)
            for path in orphans:
                uri = join(output, path.rsplit("/", 1)[-1])
                with out_fs.open(path, "rb") as f:
                    rows = pq.read_table(f, columns=["manifest_row", "status", "error",
                                                     "audited_at"])
                part = ledger_rows(rows, plan, run["model"], run_id, uri)
                stem = path.rsplit("/", 1)[-1].removesuffix(".parquet").removeprefix("verdicts-")
                self.append(f"{run_id}-recovered-{stem}", part)
                written.append(part)
                log.warning("ledger: recovered %d rows of %s (run %s ended without closing)",
                            part.num_rows, uri, run_id)
            self.finish_run(run_id, recovered_by=current_run,
                            recovered_files=[join(output, p.rsplit("/", 1)[-1]) for p in orphans])
        if not written:
            return LEDGER_SCHEMA.empty_table()
        return pa.concat_tables(written)


def ledger_rows(rows: pa.Table, plan: pa.Table, model: str, run_id: str,
                verdict_file: str) -> pa.Table:
    """Ledger entries for the verdict ``rows`` (``manifest_row``, ``status``, ``error``,
    ``audited_at``) of one file, joined to the run's ``plan`` on ``manifest_row``."""
    t = rows.select(["manifest_row", "status", "error", "audited_at"]).join(
        plan.select(["manifest_row", "media_id", "uri", "change_key", "attempt"]),
        "manifest_row", join_type="left outer")
    n = t.num_rows
    codes = [error_code(s, e) for s, e in zip(t["status"].to_pylist(), t["error"].to_pylist())]
    return pa.table(
        {
            "media_id": t["media_id"],
            "uri": t["uri"],
            "change_key": t["change_key"],
            "model": pa.array([model] * n, pa.string()),
            "run_id": pa.array([run_id] * n, pa.string()),
            "status": t["status"],
            "error_code": pa.array(codes, pa.string()),
            "attempts": pc.fill_null(t["attempt"], 1).cast(pa.int32()),
            "verdict_file": pa.array([verdict_file] * n, pa.string()),
            "manifest_row": t["manifest_row"],
            "audited_at": t["audited_at"].cast(pa.timestamp("us", tz="UTC")),
        },
        schema=LEDGER_SCHEMA,
    )
