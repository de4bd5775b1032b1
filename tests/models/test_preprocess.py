"""One crop -> tensor transform (models/preprocess.py), used by audit, evidence, train and
the benches: the audit's classifier stage and the training loader turn the same crop into
bit-identical model inputs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from deepaudit.models.checkpoint import resolve_model
from deepaudit.models.preprocess import CropNormaliser
from deepaudit.pipeline.schema import CROP_SCHEMA, table_from_rows
from deepaudit.pipeline.stages import ClassifyConfig, ClassifyStage
from deepaudit.training.phase1 import CropDataset, collate

REPO = Path(__file__).resolve().parents[2]


def test_normaliser_follows_the_card_and_checks_shapes():
    handle = resolve_model("effnet_lite_lstm_tiny")
    crops = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    x = CropNormaliser(handle.config)(crops)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    mean, std = handle.config.mean, handle.config.std
    want = (crops[1, 3, 5, 2] / 255.0 - mean[2]) / std[2]
    assert float(x[1, 2, 3, 5]) == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match="N, H, W, 3"):
        CropNormaliser(handle.config)(crops[0])


def test_audit_and_training_give_the_model_identical_tensors():
    handle = resolve_model("effnet_lite_lstm_tiny")
    size = handle.config.input_size
    crops = np.random.default_rng(1).integers(0, 256, (3, size, size, 3), dtype=np.uint8)

    # Audit: what ClassifyStage hands the CNN trunk.
    stage = ClassifyStage(handle, ClassifyConfig(device="cpu", crop_batch=8))
    seen: list[torch.Tensor] = []
    features = stage.model.frame_features
    stage.model.frame_features = lambda x: seen.append(x.clone()) or features(x)
    row = {"manifest_row": 0, "media_id": "m", "uri": "u", "status": "ok",
           "n_frames_with_face": 3, "frame_indices": [0, 1, 2], "face_boxes": [],
           "crops": crops.tobytes(), "crop_size": size}
    out = stage(table_from_rows([row], CROP_SCHEMA))
    assert out.column("status").to_pylist() == ["ok"]
    (audit_x,) = seen

    # Training: the loader's batch (no augmentation), normalised as WorkerLoop does.
    data = CropDataset(crops, np.zeros(3, np.int64), aug=None, sbi=0.0, seed=0)
    batch, _ = collate([data[i] for i in range(3)])
    train_x = CropNormaliser(handle.config)(batch)
    assert torch.equal(audit_x, train_x)


def test_no_other_module_normalises_crops():
    """The mean/std arithmetic lives in models/preprocess.py only."""
    pattern = re.compile(r"\.sub_\(\s*self\.mean|\bmean\b.*\*\s*255")
    offenders = []
    for folder in ("pipeline", "models", "jobs", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            if path.name == "preprocess.py":
                continue
            if any(pattern.search(line) for line in path.read_text().splitlines()):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
