"""The audit job: manifest in, exactly one verdict row per manifest row out.

Layout of OUT (a local folder or an s3:// prefix)::

    OUT/runs/<run_id>/verdicts-00000.parquet   verdict rows of that run
    OUT/runs/<run_id>/_summary.json            that run's summary
    OUT/_summary.json                          a copy of the latest run's summary
    OUT/evidence/<safe media dir>/<run_id>.png Grad-CAM evidence of flagged items (+ .json)

This module orchestrates: it reads the manifest, asks the ledger what to do, starts the
pipeline (:mod:`deepaudit.pipeline.dataset`), streams its rows into the verdict writer
(:mod:`deepaudit.pipeline.writer`), and writes the summary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from deepaudit.infra.listing import ListingConfig, ListingStats
from deepaudit.infra.ray_runtime import check_device_here
from deepaudit.infra.storage import (
    StorageConfig,
    check_writable,
    filesystem_for,
    is_s3,
    join,
    redact,
)
from deepaudit.models.checkpoint import ModelHandle, resolve_model
from deepaudit.models.face_detector import FaceDetectorConfig
from deepaudit.models.registry import check_threshold
from deepaudit.pipeline.dataset import (
    LOST_ALONE_REASON,
    LOST_REASON,
    audit_dataset,
    stage_configs,
)
from deepaudit.pipeline.evidence import (
    EvidenceConfig,
    drop_staging,
    per_actor_cap,
    promote,
    staging_root,
)
from deepaudit.pipeline.incremental import prepare_incremental
from deepaudit.pipeline.interrupt import AuditInterrupted, SignalGuard
from deepaudit.pipeline.ledger import LedgerPolicy
from deepaudit.pipeline.manifest import read_input
from deepaudit.pipeline.model_card import CARD_METADATA_KEY, card_summary
from deepaudit.pipeline.plan import StagePlan, plan_for_cluster
from deepaudit.pipeline.schema import STATUS_ERROR, STATUSES
from deepaudit.pipeline.stages import ClassifyConfig
from deepaudit.pipeline.writer import (
    ROLL_ROWS,
    ROLL_SECONDS,
    VerdictWriter,
    check_run_id,
    new_run_id,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditConfig:
    """Everything one audit run needs, built once (by the CLI, ``evaluate`` or a test) and
    validated here. ``None`` means "derive it" (model card, cluster)."""

    manifest: str
    output: str
    model: str | None = None
    frames: int | None = None
    address: str = "local"
    num_cpus: int | None = None  # local Ray only
    storage: StorageConfig = field(default_factory=StorageConfig)
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
    roll_rows: int = ROLL_ROWS
    roll_seconds: float = ROLL_SECONDS
    # Evidence for flagged items (Grad-CAM strips under OUT/evidence/): on/off, the run's
    # cap (split over classifier actors: ceil(cap / actors) each), frames per item.
    evidence: bool = True
    evidence_max: int = 500
    evidence_frames: int = 3
    # Archives and incremental runs (pipeline/incremental.py, pipeline/ledger.py).
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

    def __post_init__(self) -> None:
        if self.roll_rows < 1 or self.roll_seconds <= 0:
            raise ValueError(f"--roll-rows must be >= 1 and --roll-seconds > 0, got "
                             f"{self.roll_rows} and {self.roll_seconds}")
        if self.evidence_max < 0 or self.evidence_frames < 1:
            raise ValueError(f"--evidence-max must be >= 0 and evidence frames >= 1, got "
                             f"{self.evidence_max} and {self.evidence_frames}")
        if self.threshold is not None:
            check_threshold(self.threshold)
        if self.run_id is not None:
            check_run_id(self.run_id)
        ClassifyConfig(device=self.device, perturb=self.perturb)  # validates both

    def resolve_model(self) -> ModelHandle:
        """The model this audit scores with: the card's, with ``threshold`` and ``frames``
        in place of the card's when given."""
        return resolve_model(self.model).with_overrides(self.threshold, self.frames)


def evidence_config(cfg: AuditConfig, plan: StagePlan, run_id: str) -> EvidenceConfig | None:
    """What each classifier actor writes as evidence: OUT/evidence, at most
    ``ceil(evidence_max / classify_actors)`` items per actor process, ``evidence_frames``
    frames per item. The verdict writer holds the run to ``evidence_max`` (actors
    restarted after a crash count afresh)."""
    if not cfg.evidence or cfg.evidence_max == 0:
        return None
    root = cfg.output if is_s3(cfg.output) else str(Path(cfg.output).expanduser().absolute())
    return EvidenceConfig(
        root=join(root, "evidence"), run_id=run_id,
        staging=staging_root(join(root, "evidence"), run_id),
        storage=cfg.storage,
        max_items=per_actor_cap(cfg.evidence_max, plan.classify_actors),
        top_k=cfg.evidence_frames,
    )


def run_audit(cfg: AuditConfig, on_rows: Callable[[int, int], None] | None = None) -> dict:
    """Run one audit and return its summary. Raises before any work for bad inputs.

    SIGINT/SIGTERM during the run: the finished rows are published (and ledgered), the
    summary says ``interrupted`` and :class:`AuditInterrupted` is raised with it."""
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    storage = cfg.storage
    if cfg.address == "local":
        check_device_here(cfg.device)  # a cluster's GPUs are checked once it is joined
    check_writable(cfg.output, storage, what="--output")  # before anything is read
    if cfg.ledger:
        check_writable(cfg.ledger, storage, what="--ledger")
    handle = cfg.resolve_model()  # the card with --threshold/--frames, validated
    listed = ListingStats()
    manifest = read_input(cfg.manifest, storage, cfg.listing, listed)
    run_id = cfg.run_id or new_run_id()
    run_dir = join(cfg.output, "runs", run_id)
    inc = prepare_incremental(manifest, cfg.ledger, cfg.ledger_policy, handle.model_id, run_id,
                              run_dir, storage, started_at=started)
    manifest = inc.todo  # the rows this run audits (all of them without a ledger)
    if on_rows:
        on_rows(0, manifest.num_rows)  # the progress bar's total, before Ray starts
    evidence: EvidenceConfig | None = None

    def file_closed(uri: str, rows: pa.Table) -> None:
        # The rows are on disk: their evidence may now appear, then their ledger entries.
        if evidence is not None and evidence.staging:
            uris = [u for u in rows.column("evidence").to_pylist() if u]
            if uris:
                promote(evidence.root, evidence.staging, uris, storage)
        inc.on_file_closed(uri, rows)

    writer = VerdictWriter(run_dir, storage, manifest, run_id, cfg.roll_rows,
                           on_file_closed=file_closed, roll_seconds=cfg.roll_seconds,
                           metadata={CARD_METADATA_KEY: json.dumps(card_summary(handle))},
                           evidence_cap=cfg.evidence_max)

    run_error, plan, retried, lost_reason, lost = None, None, 0, LOST_REASON, 0
    where, cpus, gpus = "not started: nothing to audit", 0.0, 0.0
    signals = SignalGuard()
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
        # Frames decoded per video: those the model's branches read where it ran.
        "frames": handle.config.frames_for(
            "gpu" if plan and classifies_on_gpu(plan, cfg.device) else "cpu"),
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
        "top_flagged": writer.top_flagged(),
        # Input the run did not audit: not media (a folder's .txt), or filtered out.
        "skipped": {"not_media": listed.not_media, "excluded": listed.excluded},
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


def classifies_on_gpu(plan: StagePlan, device: str) -> bool:
    """Whether the plan's classifier actors run on GPUs (``--device cpu`` keeps them off)."""
    return plan.classify_gpus > 0 and device != "cpu"


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
    if cfg.device == "cuda" and gpus < 1:
        raise ValueError(f"--device cuda: {where} has no GPU; use --device auto (a GPU when "
                         "there is one) or --device cpu")
    plan = plan_for_cluster(nodes(), cfg.decode_actors, cfg.classify_actors, cfg.batch_size,
                            cfg.torch_threads, gpu_memory_gb() if gpus >= 1 else None,
                            input_size=handle.config.input_size,
                            classify_ms_per_frame=handle.cpu_ms_per_frame)
    return where, cpus, gpus, plan


def _stream_verdicts(manifest: pa.Table, plan: StagePlan, handle: ModelHandle,
                     cfg: AuditConfig, writer: VerdictWriter,
                     on_rows: Callable[[int, int], None] | None,
                     evidence: EvidenceConfig | None = None, isolate: bool = False,
                     total: int | None = None, signals: SignalGuard | None = None) -> str | None:
    """Run the pipeline over ``manifest`` into ``writer``; return the run error, if the
    pipeline broke. ``total``: the run's row count, for progress (default: this manifest's).
    """
    from deepaudit.infra.ray_runtime import configure_ray_data

    configure_ray_data()
    total = manifest.num_rows if total is None else total
    try:
        stages = stage_configs(handle, max_side=cfg.max_side,
                               detector=cfg.detector, device=cfg.device,
                               crop_batch=cfg.crop_batch or plan.crop_batch or 64,
                               threads=plan.torch_threads, perturb=cfg.perturb,
                               storage=cfg.storage, evidence=evidence,
                               gpu=classifies_on_gpu(plan, cfg.device))
        ds = audit_dataset(manifest, plan, stages, isolate=isolate)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            with signals.deferred() if signals else contextlib.nullcontext():
                writer.write(batch)
                if on_rows:
                    on_rows(len(writer.seen), total)
    except Exception as exc:  # the pipeline itself broke: still account for every row
        run_error = root_cause(exc)
        log.error("pipeline failed: %s", run_error)
        return run_error
    return None


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*")


def root_cause(exc: BaseException) -> str:
    """A run error for the summary: plain text (no terminal colour codes), one line, naming
    the innermost cause (a Ray task error wraps the worker's exception and traceback)."""
    seen, e = {id(exc)}, exc
    while True:
        inner = getattr(e, "cause", None)
        inner = inner if isinstance(inner, BaseException) else e.__cause__
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        e = inner
    lines = [ln.strip() for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()]
    # A remote traceback's last "SomeError: message" line is the cause it carries.
    named = [ln for ln in lines if _EXC_LINE.match(ln)]
    text = named[-1] if named else f"{type(e).__name__}: {lines[-1] if lines else ''}"
    return redact(text)[:500]


def _write_json(fs, path: str, payload: dict) -> None:
    with fs.open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
