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

from deepaudit.training.config import FREEZE_HELP, TrainConfig, model_config_for

# Heavy modules (torch, Ray, OpenCV, pyarrow) are imported where they are used, so that
# ``deepaudit --help`` stays fast.

log = logging.getLogger(__name__)

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

    from deepaudit.training.datasets import DatasetError
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
    from deepaudit.training.datasets import DatasetError

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
    from deepaudit.training.fused import is_fused, run_fused

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
    from deepaudit.models.face_detector import FaceDetectorConfig
    from deepaudit.training.crop_cache import (
        CropCacheConfig,
        build_crop_cache,
        default_cache_root,
    )
    from deepaudit.training.datasets import drop_from_training, load_inputs, split_table
    from deepaudit.training.worker import FINAL_FILE, WorkerInputs, train_loop_per_worker

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
