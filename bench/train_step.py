"""Cost of ``deepaudit train`` per crop, and the epoch time it implies.

Measures, in this process with ``--threads`` torch threads: the augmentation of one crop,
one phase-1 training step (trunk + frame head, forward + backward + AdamW, channels_last,
uint8 normalised on the fly) and the trunk's inference (phase-1 validation and phase-2
features). With ``--train-crops`` / ``--val-crops`` (a run's card lists them under
``training_data.crops``) it estimates one phase-1 epoch and phase 2's feature pass.

Prints one JSON line. Speed is measured here, never in tests.

    python bench/train_step.py [--model resnext_lstm] [--size 128] [--threads 2]
        [--batch 32] [--steps 3] [--train-crops 1050] [--val-crops 197]
"""

from __future__ import annotations

import json
import time
from typing import Annotated

import numpy as np
import torch
import typer

from deepaudit.models.augment import AugmentConfig, augment
from deepaudit.models.preprocess import CropNormaliser
from deepaudit.models.registry import create_model, get_config
from deepaudit.training.phase1 import FrameNet


def main(
    model: Annotated[str, typer.Option()] = "resnext_lstm",
    size: Annotated[int, typer.Option()] = 128,
    threads: Annotated[int, typer.Option()] = 2,
    batch: Annotated[int, typer.Option()] = 32,
    steps: Annotated[int, typer.Option(min=1)] = 3,
    train_crops: Annotated[int, typer.Option()] = 0,
    val_crops: Annotated[int, typer.Option()] = 0,
    seq_views: Annotated[int, typer.Option()] = 2,
) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = create_model(model).to(memory_format=torch.channels_last)
    frames = FrameNet(net).train()
    optim = torch.optim.AdamW(frames.parameters(), lr=3e-4, weight_decay=0.05)
    normalise = CropNormaliser(get_config(model))
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    labels = torch.tensor(rng.integers(0, 2, batch), dtype=torch.float32)

    t = time.perf_counter()
    augmented = np.stack([augment(c, AugmentConfig(), rng) for c in crops])
    aug_ms = (time.perf_counter() - t) * 1e3 / batch

    def prepare() -> torch.Tensor:
        return normalise(augmented)

    times = []
    for _ in range(steps + 1):  # the first step warms up oneDNN
        t = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(frames(prepare()), labels)
        optim.zero_grad()
        loss.backward()
        optim.step()
        times.append(time.perf_counter() - t)
    train_ms = min(times[1:]) * 1e3 / batch
    net.eval()
    with torch.inference_mode():
        net.backbone(prepare())
        t = time.perf_counter()
        net.backbone(prepare())
        infer_ms = (time.perf_counter() - t) * 1e3 / batch
    out = {
        "model": model, "size": size, "threads": threads, "batch": batch,
        "augment_ms_per_crop": round(aug_ms, 2), "train_ms_per_crop": round(train_ms, 1),
        "infer_ms_per_crop": round(infer_ms, 1),
    }
    if train_crops:
        used = (train_crops // batch) * batch
        epoch = used * (train_ms + aug_ms) / 1e3 + val_crops * infer_ms / 1e3
        out["phase1_epoch_s"] = round(epoch, 1)
        out["phase2_features_s"] = round((train_crops * seq_views + val_crops) * infer_ms / 1e3, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    typer.run(main)
