"""The verdict writer: streams verdict rows into rolling Parquet files under
``OUT/runs/<run_id>/`` and keeps the run's tallies; :func:`read_verdicts` reads a run back.

Verdict rows are small (crops never reach the driver), so the driver streams them into
Parquet as they arrive, counts them, and at the end writes an error row for any manifest
row the pipeline failed to return: rows out always equal rows in.
"""

from __future__ import annotations

import heapq
import logging
import os
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deepaudit.infra.storage import StorageConfig, filesystem_for, is_s3, join
from deepaudit.pipeline.manifest import ROW_INDEX
from deepaudit.pipeline.schema import STAGE_VERDICT_SCHEMA, STATUS_ERROR, VERDICT_SCHEMA

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_run_id(run_id: str) -> str:
    """Run ids name folders under OUT/runs: letters, digits, '.', '_' and '-' only."""
    if not _RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise ValueError(
            f"--run-id {run_id!r} is not a safe folder name: use 1-128 letters, digits, '.', "
            "'_' or '-', starting with a letter or digit, and no '..'")
    return run_id


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


# Verdict rows per Parquet row group. The pipeline hands the driver one or two rows at a
# time; writing each as its own row group made files of thousands of tiny groups, which
# bloat the footer and slow every reader down. Rows wait in memory until a group is full
# or the file closes (a file is only ever published complete).
ROW_GROUP_ROWS = 1024
# Roll defaults (AuditConfig.roll_rows / roll_seconds); see docs/robustness.md.
ROLL_ROWS = 1_000
ROLL_SECONDS = 60.0
# Flagged items the run summary keeps, highest p_fake first (audit --top shows some).
TOP_FLAGGED = 100


class VerdictWriter:
    """Streams verdict batches into rolling Parquet files and keeps the run's tallies.

    A file closes once it holds ``roll_rows`` rows, or ``roll_seconds`` after its first
    row (checked after each batch and, with :meth:`start_roll_timer`, once a second even
    when no batch comes): that bounds what a killed driver loses. ``on_file_closed`` runs
    after each file is published, with its rows' ``manifest_row``, ``status``, ``error``,
    ``audited_at`` and ``evidence``. Thread-safe (the roll timer is a thread)."""

    def __init__(self, out_dir: str, storage: StorageConfig, manifest: pa.Table, run_id: str,
                 roll_rows: int = ROLL_ROWS,
                 on_file_closed: Callable[[str, pa.Table], None] | None = None,
                 roll_seconds: float | None = None,
                 metadata: dict[str, str] | None = None,
                 evidence_cap: int | None = None) -> None:
        if roll_rows < 1 or (roll_seconds is not None and roll_seconds <= 0):
            raise ValueError(f"--roll-rows must be >= 1 and --roll-seconds > 0, got "
                             f"{roll_rows} and {roll_seconds}")
        self.fs, self.dir = filesystem_for(out_dir, storage)
        self.fs.makedirs(self.dir, exist_ok=True)
        self.uri = out_dir
        self.extras = manifest.drop_columns(["uri", "media_id"])
        # manifest_row values of the rows to write (a ledger may have filtered the
        # manifest): sorted, so a row's position is a binary search away.
        self._rows = manifest.column(ROW_INDEX).to_numpy()
        if len(self._rows) > 1 and not np.all(self._rows[1:] > self._rows[:-1]):
            raise ValueError("manifest_row must be strictly increasing")
        self.on_file_closed, self.roll_seconds = on_file_closed, roll_seconds
        self._file_rows: list[pa.Table] = []  # (manifest_row, status, error, audited_at, evidence)
        self._opened_at = 0.0
        self._tmp: str | None = None
        extra_fields = [f for f in self.extras.schema if f.name != ROW_INDEX]
        # ``metadata``: the Parquet key-value metadata of every file (the model card summary).
        self.schema = pa.schema(list(VERDICT_SCHEMA) + extra_fields, metadata=metadata)
        self.run_id, self.roll_rows = run_id, roll_rows
        self.seen: set[int] = set()
        self.status: Counter[str] = Counter()
        self.verdicts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.evidence_written = 0
        # The run's --evidence-max, held here: each classifier actor counts only its own
        # items, and one restarted after its process died counts from 0 again.
        self.evidence_cap = evidence_cap
        self._top: list[tuple[float, str, str | None]] = []  # a min-heap of the top fakes
        self.files: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._sink = None
        self._rows_in_file = 0
        self._pending: list[pa.Table] = []  # rows of the open file's next row group
        self._pending_rows = 0
        self._lock = threading.RLock()
        self._timer: threading.Thread | None = None
        self._stop = threading.Event()

    def write(self, batch: pa.Table) -> None:
        with self._lock:
            self._write(batch)

    def _write(self, batch: pa.Table) -> None:
        batch = batch.select(STAGE_VERDICT_SCHEMA.names).cast(STAGE_VERDICT_SCHEMA)
        rows = batch.column(ROW_INDEX).to_pylist()
        fresh = [i for i, r in enumerate(rows) if r not in self.seen]  # retried tasks can repeat
        if len(fresh) < len(rows):
            batch = batch.take(pa.array(fresh, pa.int64()))
            rows = [rows[i] for i in fresh]
        if not rows:
            return
        batch = self._cap_evidence(batch)
        now = datetime.now(timezone.utc)
        n = batch.num_rows
        batch = batch.append_column("run_id", pa.array([self.run_id] * n, pa.string()))
        batch = batch.append_column("audited_at", pa.array([now] * n, pa.timestamp("us", tz="UTC")))
        extras = self.extras.take(pa.array(np.searchsorted(self._rows, rows), pa.int64()))
        for f in self.extras.schema:
            if f.name != ROW_INDEX:
                batch = batch.append_column(f, extras.column(f.name))
        table = batch.select(self.schema.names).cast(self.schema)
        if self._writer is None:
            self._open()
        self.seen.update(rows)
        self._tally(table)
        self._pending.append(table)
        self._pending_rows += n
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush()
        self._rows_in_file += n
        self._file_rows.append(table.select([ROW_INDEX, "status", "error", "audited_at",
                                             "evidence"]))
        self._roll_if_due()

    def _cap_evidence(self, batch: pa.Table) -> pa.Table:
        """Rows past the evidence cap lose their evidence URI; their staged files are
        never promoted and go with the staging folder."""
        evidence = batch.column("evidence")
        if self.evidence_cap is None or evidence.null_count == batch.num_rows:
            return batch
        room = self.evidence_cap - self.evidence_written
        has = pc.is_valid(evidence)
        over = pc.and_(has, pc.greater(pc.cumulative_sum(pc.cast(has, pa.int64())), room))
        if not pc.any(over).as_py():
            return batch
        i = batch.schema.get_field_index("evidence")
        return batch.set_column(i, "evidence", pc.if_else(over, pa.scalar(None, pa.string()),
                                                          evidence))

    def _roll_if_due(self) -> None:
        if self._writer is not None and (self._rows_in_file >= self.roll_rows or (
                self.roll_seconds and time.monotonic() - self._opened_at >= self.roll_seconds)):
            self._close_file()

    def roll_if_due(self) -> None:
        with self._lock:
            self._roll_if_due()

    def start_roll_timer(self, every_s: float = 1.0) -> None:
        """Close a due file even while no batch arrives (a slow item, a stalled stage)."""
        if not self.roll_seconds or self._timer is not None:
            return

        def tick() -> None:
            while not self._stop.wait(every_s):
                try:
                    self.roll_if_due()
                except Exception:  # noqa: BLE001 - the main thread's close reports it
                    log.exception("closing a verdict file on time failed")

        self._timer = threading.Thread(target=tick, name="verdict-roll", daemon=True)
        self._timer.start()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._stop.set()
            self._timer.join()
            self._timer = None

    def _tally(self, table: pa.Table) -> None:
        self.status.update(table.column("status").to_pylist())
        self.verdicts.update(v or "none" for v in table.column("verdict").to_pylist())
        statuses, errors = table.column("status").to_pylist(), table.column("error").to_pylist()
        for status, err in zip(statuses, errors):
            if status == STATUS_ERROR and err:
                self.errors[err.split(":", 1)[0]] += 1
        self.evidence_written += table.num_rows - table.column("evidence").null_count
        fakes = table.filter(pc.equal(table.column("verdict"), "fake"))
        for r in fakes.select(["media_id", "p_fake", "evidence"]).to_pylist():
            item = (r["p_fake"] or 0.0, r["media_id"], r["evidence"])
            if len(self._top) < TOP_FLAGGED:
                heapq.heappush(self._top, item)
            else:
                heapq.heappushpop(self._top, item)

    def top_flagged(self, n: int = TOP_FLAGGED) -> list[dict]:
        """The ``n`` (at most :data:`TOP_FLAGGED`) flagged items with the highest p_fake."""
        with self._lock:
            best = sorted(self._top, key=lambda t: (-t[0], t[1]))[:n]
        return [{"media_id": m, "p_fake": p, "evidence": e} for p, m, e in best]

    def _open(self) -> None:
        name = f"verdicts-{len(self.files):05d}.parquet"
        # A file only ever appears complete: on S3 the object exists once the upload
        # completes on close; locally it is written under a hidden name and renamed.
        self._tmp = None if is_s3(self.uri) else f"{self.dir}/.{name}.inprogress"
        self._sink = self.fs.open(self._tmp or f"{self.dir}/{name}", "wb")
        self._writer = pq.ParquetWriter(self._sink, self.schema, compression="zstd")
        self.files.append(join(self.uri, name))
        self._rows_in_file = 0
        self._opened_at = time.monotonic()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.concat_tables(self._pending),
                                     row_group_size=self._pending_rows)
            self._pending, self._pending_rows = [], 0

    def _close_file(self) -> None:
        if self._writer is not None:
            self._flush()
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None
            if self._tmp:
                os.replace(self._tmp, f"{self.dir}/{self.files[-1].rsplit('/', 1)[-1]}")
                self._tmp = None
            rows = pa.concat_tables(self._file_rows) if self._file_rows else None
            self._file_rows = []
            if self.on_file_closed and rows is not None:
                self.on_file_closed(self.files[-1], rows)

    def abort(self) -> None:
        """Drop the open file without publishing it (the run is being torn down)."""
        self._stop_timer()
        with self._lock:
            self._pending, self._pending_rows = [], 0
            if self._writer is not None:
                sink, tmp = self._sink, self._tmp
                self._writer = self._sink = self._tmp = None
                self.files.pop()
                if tmp:
                    sink.close()
                    os.remove(tmp)
                else:  # s3fs: abort the upload, and never let close() commit a partial object
                    sink.discard()
                    sink.closed = True

    def missing(self, manifest: pa.Table) -> pa.Table:
        """The manifest rows the pipeline has not returned yet."""
        todo = [i for i, r in enumerate(manifest.column(ROW_INDEX).to_pylist())
                if r not in self.seen]
        return manifest.take(pa.array(todo, pa.int64()))

    def fill_missing(self, manifest: pa.Table, reason: str) -> int:
        """Write an error row for every manifest row the pipeline did not return."""
        missing = self.missing(manifest)
        for start in range(0, missing.num_rows, 10_000):
            part = missing.slice(start, 10_000)
            n = part.num_rows
            cols = {name: pa.nulls(n, STAGE_VERDICT_SCHEMA.field(name).type)
                    for name in STAGE_VERDICT_SCHEMA.names}
            cols[ROW_INDEX] = part.column(ROW_INDEX).combine_chunks()
            cols["media_id"] = part.column("media_id").combine_chunks()
            cols["uri"] = part.column("uri").combine_chunks()
            cols["status"] = pa.array([STATUS_ERROR] * n, pa.string())
            cols["error"] = pa.array([f"lost: {reason}"] * n, pa.string())
            for name in ("frame_indices", "face_boxes", "frame_p_fake", "dropped_frames"):
                cols[name] = pa.array([[]] * n, STAGE_VERDICT_SCHEMA.field(name).type)
            self.write(pa.table(cols, schema=STAGE_VERDICT_SCHEMA))
        return missing.num_rows

    def close(self) -> None:
        """Publish the open file (also what an interrupted run keeps)."""
        self._stop_timer()
        with self._lock:
            self._close_file()


def read_verdicts(run_dir: str, storage: StorageConfig | None = None) -> pa.Table:
    """All verdict rows of one run directory (``OUT/runs/<run_id>``)."""
    fs, path = filesystem_for(run_dir, storage)
    files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
    tables = []
    for p in files:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f))
    table = pa.concat_tables(tables) if tables else VERDICT_SCHEMA.empty_table()
    return table.sort_by(ROW_INDEX) if table.num_rows else table
