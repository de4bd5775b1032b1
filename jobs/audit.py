"""The audit job: manifest in, exactly one verdict row per manifest row out.

Layout of OUT (a local folder or an s3:// prefix)::

    OUT/runs/<run_id>/verdicts-00000.parquet   verdict rows of that run
    OUT/runs/<run_id>/_summary.json            that run's summary
    OUT/_summary.json                          a copy of the latest run's summary
    OUT/evidence/<safe media dir>/<run_id>.png Grad-CAM evidence of flagged items (+ .json)

Each run writes under its own id, so runs never overwrite each other. Verdict rows
are small (crops never reach the driver), so the driver streams them into Parquet as
they arrive, counts them, and at the end writes an error row for any manifest row
the pipeline failed to return: rows out always equal rows in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deepaudit.infra.ledger import LedgerPolicy
from deepaudit.infra.listing import ListingConfig
from deepaudit.infra.storage import StorageConfig, filesystem_for, is_s3, join, redact
from deepaudit.models.checkpoint import ModelHandle, resolve_model
from deepaudit.models.face_detector import FaceDetectorConfig
from deepaudit.pipeline.evidence import EvidenceConfig, per_actor_cap
from deepaudit.pipeline.manifest import FORMATS, ROW_INDEX, ManifestError, read_manifest
from deepaudit.pipeline.media import DecodeConfig
from deepaudit.pipeline.plan import StagePlan, plan_for_cluster
from deepaudit.pipeline.schema import (
    RESERVED_COLUMNS,
    STAGE_VERDICT_SCHEMA,
    STATUS_ERROR,
    STATUSES,
    VERDICT_SCHEMA,
)
from deepaudit.pipeline.stages import (
    ISOLATED_RETRIES,
    TASK_RETRIES,
    ClassifyConfig,
    ClassifyStage,
    CropConfig,
    actor_pool,
    decode_crop_dataset,
    retry_args_accepted,
)

log = logging.getLogger(__name__)


@dataclass
class AuditConfig:
    """Everything one audit run needs. ``None`` means "derive it" (model card, cluster)."""

    manifest: str
    output: str
    model: str | None = None
    frames: int | None = None
    address: str = "local"
    num_cpus: int | None = None  # local Ray only
    s3_endpoint: str | None = None
    decode_actors: int | None = None
    classify_actors: int | None = None
    batch_size: int | None = None
    torch_threads: int | None = None
    crop_batch: int | None = None  # None: from the plan (16 on CPU, from memory on GPU)
    device: str = "auto"
    threshold: float | None = None
    perturb: str | None = None  # evaluate --perturb: a perturbation of every crop
    detector: FaceDetectorConfig = field(default_factory=FaceDetectorConfig)
    max_side: int = 1920
    run_id: str | None = None
    # A verdict file is closed (published, and ledgered) after this many rows or this
    # many seconds after its first row, whichever comes first: what a SIGKILLed driver
    # can lose at most. docs/robustness.md has the measurement behind the defaults.
    roll_rows: int = 1_000
    roll_seconds: float = 60.0
    progress: bool = True
    # Evidence for flagged items (Grad-CAM strips under OUT/evidence/): on/off, the run's
    # cap (split over classifier actors: ceil(cap / actors) each), frames per item.
    evidence: bool = True
    evidence_max: int = 500
    evidence_frames: int = 3
    # Archives and incremental runs (see jobs/incremental.py and infra/ledger.py).
    ledger: str | None = None  # local folder or s3:// prefix; None: audit everything
    ledger_policy: LedgerPolicy = field(default_factory=LedgerPolicy)
    listing: ListingConfig = field(default_factory=ListingConfig)  # when manifest is a prefix
    # Autoscaling clusters: wait for at least this much before planning the actors.
    min_cpus: int = 0
    min_gpus: int = 0
    wait_timeout_s: float = 900.0
    # Items whose tasks failed for good (their worker died on every attempt) run once more,
    # each alone in its worker: an item that kills its worker takes the items queued on
    # that worker down with it, and those deserve a run of their own.
    retry_lost: bool = True


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


def _with_threshold(handle: ModelHandle, threshold: float | None) -> ModelHandle:
    if threshold is None:
        return handle
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"--threshold must be in (0, 1), got {threshold}")
    from dataclasses import replace

    return replace(handle, config=replace(handle.config, threshold=threshold))


def evidence_config(cfg: AuditConfig, plan: StagePlan, run_id: str) -> EvidenceConfig | None:
    """What each classifier actor writes as evidence: OUT/evidence, at most
    ``ceil(evidence_max / classify_actors)`` items per actor process (so at most
    ``evidence_max + actors - 1`` per run), ``evidence_frames`` frames per item."""
    if cfg.evidence_max < 0 or cfg.evidence_frames < 1:
        raise ValueError(f"--evidence-max must be >= 0 and evidence frames >= 1, got "
                         f"{cfg.evidence_max} and {cfg.evidence_frames}")
    if not cfg.evidence or cfg.evidence_max == 0:
        return None
    from deepaudit.pipeline.evidence import staging_root

    root = cfg.output if is_s3(cfg.output) else str(Path(cfg.output).expanduser().absolute())
    return EvidenceConfig(
        root=join(root, "evidence"), run_id=run_id,
        staging=staging_root(join(root, "evidence"), run_id),
        storage=StorageConfig(endpoint_url=cfg.s3_endpoint),
        max_items=per_actor_cap(cfg.evidence_max, plan.classify_actors),
        top_k=cfg.evidence_frames,
    )


def build_dataset(manifest: pa.Table, plan: StagePlan, handle: ModelHandle, cfg: AuditConfig,
                  evidence: EvidenceConfig | None = None, isolate: bool = False):
    """The Ray Data pipeline: manifest rows → DecodeCropStage → ClassifyStage.

    ``isolate``: every item alone in its task and its actor, in both stages (for items
    whose tasks failed for good in the normal run; see ``AuditConfig.retry_lost``)."""
    keys = manifest.select([ROW_INDEX, "media_id", "uri"])
    frames = cfg.frames or handle.config.frames
    storage = StorageConfig(endpoint_url=cfg.s3_endpoint)
    ds = decode_crop_dataset(
        keys, DecodeConfig(frames=frames, max_side=cfg.max_side), cfg.detector,
        CropConfig(size=handle.config.input_size), storage, plan.decode_actors,
        plan.decode_cpus, plan.decode_calls, isolate=isolate)
    with retry_args_accepted():
        return ds.map_batches(
            ClassifyStage,
            fn_constructor_kwargs={
                "handle": handle,
                "config": ClassifyConfig(
                    device=cfg.device, crop_batch=cfg.crop_batch or plan.crop_batch,
                    threads=plan.torch_threads, perturb=cfg.perturb,
                ),
                "evidence": evidence,
            },
            batch_size=1 if isolate else plan.batch_size,
            batch_format="pyarrow",
            compute=actor_pool(plan.classify_actors, plan.classify_calls, manifest.num_rows,
                               isolate),
            num_cpus=plan.classify_cpus,
            num_gpus=plan.classify_gpus or None,
            max_task_retries=ISOLATED_RETRIES if isolate else TASK_RETRIES,
            udf_modifying_row_count=False,
        )


# Why a row came back from no stage, when the pipeline itself ran to the end: every
# stage turns its own failures into rows, so what is left is a task that failed for good,
# as when the worker running it dies on every attempt.
_DIED = f"its task failed for good: the worker processing it died on each of {1 + TASK_RETRIES} "
_CAUSE = ("(a crash in native code, or the out-of-memory killer), or the stage raised; the "
          "log says which")
LOST_REASON = (f"{_DIED}attempts {_CAUSE}. Items processed beside it can be lost with it; "
               "a re-run retries them")
# The same, after the item's own run alone in its worker (``AuditConfig.retry_lost``).
LOST_ALONE_REASON = (f"{_DIED}attempts beside other items and on each of "
                     f"{1 + ISOLATED_RETRIES} attempts alone {_CAUSE}")


# Verdict rows per Parquet row group. The pipeline hands the driver one or two rows at a
# time; writing each as its own row group made files of thousands of tiny groups, which
# bloat the footer and slow every reader down. Rows wait in memory until a group is full
# or the file closes (a file is only ever published complete).
ROW_GROUP_ROWS = 1024
# Roll defaults (AuditConfig.roll_rows / roll_seconds); see docs/robustness.md.
ROLL_ROWS = 1_000
ROLL_SECONDS = 60.0


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
                 roll_seconds: float | None = None) -> None:
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
        self.schema = pa.schema(list(VERDICT_SCHEMA) + extra_fields)
        self.run_id, self.roll_rows = run_id, roll_rows
        self.seen: set[int] = set()
        self.status: Counter[str] = Counter()
        self.verdicts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.evidence_written = 0
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


class AuditInterrupted(BaseException):
    """SIGINT or SIGTERM stopped the audit; what was finished is on disk.

    A BaseException, like KeyboardInterrupt: no ``except Exception`` on the way (Ray's
    included) may swallow it. ``summary`` is the run's summary (state ``interrupted``)."""

    def __init__(self, signum: int, summary: dict | None = None) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum, self.summary = signum, summary

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM


class _Signals:
    """SIGINT/SIGTERM handlers for the run: the first raises :class:`AuditInterrupted`
    (deferred while the writer is in the middle of a batch), the second exits at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._depth = 0
        self._raised = False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            prev = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, prev)

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # a second signal: no flush, leave now
            os._exit(128 + signum)
        self.signum = signum
        if self._depth == 0:
            self._raise()

    def _raise(self) -> None:
        if self.signum is not None and not self._raised:
            self._raised = True
            raise AuditInterrupted(self.signum)

    @contextlib.contextmanager
    def deferred(self):
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0:
            self._raise()


def _write_json(fs, path: str, payload: dict) -> None:
    with fs.open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)


def run_audit(cfg: AuditConfig, on_rows: Callable[[int, int], None] | None = None) -> dict:
    """Run one audit and return its summary. Raises before any work for bad inputs.

    SIGINT/SIGTERM during the run: the finished rows are published (and ledgered), the
    summary says ``interrupted`` and :class:`AuditInterrupted` is raised with it."""
    from deepaudit.infra.storage import check_writable
    from deepaudit.jobs.incremental import prepare_incremental
    from deepaudit.pipeline.evidence import drop_staging, promote

    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    storage = StorageConfig(endpoint_url=cfg.s3_endpoint)
    manifest = read_input(cfg.manifest, storage, cfg.listing)
    handle = _with_threshold(resolve_model(cfg.model), cfg.threshold)
    if cfg.frames is not None and cfg.frames < 1:
        raise ValueError(f"--frames must be >= 1, got {cfg.frames}")
    if cfg.roll_rows < 1 or cfg.roll_seconds <= 0:
        raise ValueError(f"--roll-rows must be >= 1 and --roll-seconds > 0, got "
                         f"{cfg.roll_rows} and {cfg.roll_seconds}")
    check_writable(cfg.output, storage, what="--output")
    if cfg.ledger:
        check_writable(cfg.ledger, storage, what="--ledger")
    run_id = check_run_id(cfg.run_id) if cfg.run_id else new_run_id()
    run_dir = join(cfg.output, "runs", run_id)
    inc = prepare_incremental(manifest, cfg.ledger, cfg.ledger_policy, handle.model_id, run_id,
                              run_dir, storage, started_at=started)
    manifest = inc.todo  # the rows this run audits (all of them without a ledger)
    evidence: EvidenceConfig | None = None

    def file_closed(uri: str, rows: pa.Table) -> None:
        # The rows are on disk: their evidence may now appear, then their ledger entries.
        if evidence is not None and evidence.staging:
            uris = [u for u in rows.column("evidence").to_pylist() if u]
            if uris:
                promote(evidence.root, evidence.staging, uris, storage)
        inc.on_file_closed(uri, rows)

    writer = VerdictWriter(run_dir, storage, manifest, run_id, cfg.roll_rows,
                           on_file_closed=file_closed, roll_seconds=cfg.roll_seconds)

    run_error, plan, retried, lost_reason, lost = None, None, 0, LOST_REASON, 0
    where, cpus, gpus = "not started: nothing to audit", 0.0, 0.0
    signals = _Signals()
    signals.install()
    interrupted: AuditInterrupted | None = None
    try:
        try:
            if manifest.num_rows:
                where, cpus, gpus, plan = _start_cluster(cfg, handle)
                signals.install()  # ray.init sets its own SIGTERM handler
                log.info("run %s on %s: %s", run_id, where, plan)
                evidence = evidence_config(cfg, plan, run_id)
                writer.start_roll_timer()
                run_error = _stream_verdicts(manifest, plan, handle, cfg, writer, on_rows,
                                             evidence, signals=signals)
            if not run_error and manifest.num_rows and not writer.seen:
                # Tasks that fail for good drop their rows and the run goes on; when that
                # is every row, the stages themselves are broken: call the run failed.
                run_error = "no item came back from the pipeline; the log says why"
            if not run_error and cfg.retry_lost:
                lost_items = writer.missing(manifest)
                retried = lost_items.num_rows
                if retried:
                    log.warning("%d item(s) came back from no stage (their workers died on "
                                "every attempt); running them again, each alone in its worker",
                                retried)
                    retry_error = _stream_verdicts(lost_items, plan, handle, cfg, writer,
                                                   on_rows, evidence, isolate=True,
                                                   total=manifest.num_rows, signals=signals)
                    # The run itself went through: a failed second pass only explains its
                    # rows.
                    lost_reason = LOST_ALONE_REASON if retry_error is None else (
                        f"{LOST_REASON}; running it again alone failed too: {retry_error}")
            with signals.deferred():
                lost = writer.fill_missing(manifest, run_error or lost_reason)
        except AuditInterrupted as exc:
            interrupted = exc  # keep what is finished; the missing rows stay not done
            log.warning("%s: writing the %d finished rows, then stopping",
                        exc, len(writer.seen))
        writer.close()
        if evidence is not None and evidence.staging:
            drop_staging(evidence.staging, storage)  # evidence of rows never written
    except BaseException:  # a failure while publishing: publish nothing half-written
        writer.abort()
        signals.restore()
        raise
    finally:
        if (cfg.min_cpus or cfg.min_gpus) and manifest.num_rows:
            from deepaudit.infra.ray_runtime import release_resource_request

            release_resource_request()
    if on_rows and not interrupted:
        on_rows(len(writer.seen), manifest.num_rows)

    wall = time.perf_counter() - t0
    state = "interrupted" if interrupted else "failed" if run_error else "completed"
    summary = {
        "run_id": run_id,
        "state": state,
        "run_error": run_error,
        "started_at": started.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "wall_s": round(wall, 3),
        "manifest": cfg.manifest,
        "output": run_dir,
        "files": writer.files,
        "model": handle.model_id,
        "model_sha256": handle.sha256,
        "model_trained": handle.trained,
        "model_quality": handle.quality,
        "threshold": handle.config.threshold,
        "frames": cfg.frames or handle.config.frames,
        "rows_in": manifest.num_rows,
        "rows_out": len(writer.seen),
        "items": inc.items(audited=len(writer.seen), failed=writer.status.get(STATUS_ERROR, 0)),
        "status": {s: writer.status.get(s, 0) for s in STATUSES},
        "verdicts": {k: writer.verdicts.get(k, 0) for k in ("fake", "real", "none")},
        "fakes": writer.verdicts.get("fake", 0),
        "errors": writer.status.get(STATUS_ERROR, 0),
        "error_codes": dict(writer.errors.most_common()),
        "lost_rows": lost,
        "retried_alone": retried,
        "throughput_items_per_s": round(len(writer.seen) / wall, 4) if wall > 0 else None,
        "cluster": {"where": where, "cpus": cpus, "gpus": gpus},
        "plan": asdict(plan) if plan else None,
        "roll": {"rows": cfg.roll_rows, "seconds": cfg.roll_seconds},
        "evidence": _evidence_summary(evidence, cfg, writer),
    }
    if interrupted:
        summary["interrupted"] = {
            "signal": signal.Signals(interrupted.signum).name,
            "done": len(writer.seen),
            "not_done": manifest.num_rows - len(writer.seen),
        }
    fs, base = filesystem_for(cfg.output, storage)
    _write_json(fs, f"{writer.dir}/_summary.json", summary)
    _write_json(fs, f"{base}/_summary.json", summary)
    inc.finish(state)
    signals.restore()
    if interrupted:
        interrupted.summary = summary
        raise interrupted
    return summary


def _evidence_summary(evidence: EvidenceConfig | None, cfg: AuditConfig,
                      writer: VerdictWriter) -> dict:
    fakes = writer.verdicts.get("fake", 0)
    return {
        "enabled": evidence is not None,
        "dir": evidence.root if evidence else None,
        "max": cfg.evidence_max if evidence else 0,
        "per_actor_max": evidence.max_items if evidence else 0,
        "frames": cfg.evidence_frames,
        "written": writer.evidence_written,
        "flagged_without_evidence": fakes - writer.evidence_written,
    }


def is_manifest_file(uri: str) -> bool:
    """A manifest is named *.csv, *.tsv, *.jsonl or *.parquet; anything else is a prefix."""
    return uri.lower().endswith(tuple(FORMATS))


def read_input(uri: str, storage: StorageConfig, listing: ListingConfig) -> pa.Table:
    """The validated manifest: read from a manifest file, or listed from a folder or an
    s3:// prefix (its listing columns ``size``, ``etag``, ``mtime`` give the change keys)."""
    if is_manifest_file(uri):
        return read_manifest(uri, RESERVED_COLUMNS, storage)
    from deepaudit.infra.listing import ListingStats, listing_table
    from deepaudit.pipeline.manifest import validate_manifest

    stats = ListingStats()
    try:
        table = listing_table(uri, storage, listing, stats)
    except FileNotFoundError:
        raise ManifestError(f"{uri} is neither a manifest (*.csv, *.tsv, *.jsonl, *.parquet) "
                            "nor a folder") from None
    if table.num_rows == 0:
        raise ManifestError(
            f"no media found under {uri}: {stats.listed} objects listed, {stats.excluded} "
            f"excluded by --include/--exclude, {stats.not_media} not media. Check the prefix "
            "and the globs.")
    return validate_manifest(table, RESERVED_COLUMNS, source=uri)


def _start_cluster(cfg: AuditConfig, handle: ModelHandle) -> tuple[str, float, float, StagePlan]:
    """Join or start Ray and derive the actor plan from its nodes."""
    from deepaudit.infra.ray_runtime import (
        connect,
        gpu_memory_gb,
        nodes,
        wait_for_resources,
    )

    where = connect(cfg.address, num_cpus=cfg.num_cpus)
    cpus, gpus = wait_for_resources(cfg.min_cpus, cfg.min_gpus, cfg.wait_timeout_s)
    plan = plan_for_cluster(nodes(), cfg.decode_actors, cfg.classify_actors, cfg.batch_size,
                            cfg.torch_threads, gpu_memory_gb() if gpus >= 1 else None,
                            input_size=handle.config.input_size)
    return where, cpus, gpus, plan


def _stream_verdicts(manifest: pa.Table, plan: StagePlan, handle: ModelHandle,
                     cfg: AuditConfig, writer: VerdictWriter,
                     on_rows: Callable[[int, int], None] | None,
                     evidence: EvidenceConfig | None = None, isolate: bool = False,
                     total: int | None = None, signals: _Signals | None = None) -> str | None:
    """Run the pipeline over ``manifest`` into ``writer``; return the run error, if the
    pipeline broke. ``total``: the run's row count, for progress (default: this manifest's).
    """
    from deepaudit.infra.ray_runtime import configure_ray_data

    configure_ray_data()
    total = manifest.num_rows if total is None else total
    try:
        ds = build_dataset(manifest, plan, handle, cfg, evidence, isolate=isolate)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            with signals.deferred() if signals else contextlib.nullcontext():
                writer.write(batch)
                if on_rows:
                    on_rows(len(writer.seen), total)
    except Exception as exc:  # the pipeline itself broke: still account for every row
        run_error = f"{type(exc).__name__}: {redact(str(exc))[:500]}"
        log.error("pipeline failed: %s", run_error)
        return run_error
    return None


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


def status_counts(table: pa.Table) -> dict[str, int]:
    counts = pc.value_counts(table.column("status")).to_pylist()
    return {c["values"]: c["counts"] for c in counts}
