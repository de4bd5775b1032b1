"""Frames per video has one home: the model card, with --frames applied in one place
(ModelHandle.with_overrides) and validated once, by ModelConfig; the stages' configs
(pipeline.dataset.stage_configs) take it from the handle."""

from __future__ import annotations

import pytest

from deepaudit.models.checkpoint import resolve_model
from deepaudit.pipeline.audit import AuditConfig
from deepaudit.pipeline.dataset import stage_configs


def test_frames_and_crop_size_come_from_the_card():
    card = resolve_model("resnext_lstm_tiny")
    stages = stage_configs(card)
    assert stages.decode.frames == card.config.frames == 8
    assert stages.crop.size == card.config.input_size


def test_the_override_is_applied_once_and_validated_there():
    card = resolve_model("resnext_lstm_tiny")
    over = card.with_overrides(threshold=0.3, frames=3)
    assert (over.config.frames, over.config.threshold) == (3, 0.3)
    assert card.with_overrides() is card
    assert stage_configs(over).decode.frames == 3
    audit = AuditConfig(manifest="m.csv", output="out", model="resnext_lstm_tiny", frames=5)
    assert audit.resolve_model().config.frames == 5
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="frames per video"):
            card.with_overrides(frames=bad)
    with pytest.raises(ValueError, match="frames per video"):
        AuditConfig(manifest="m.csv", output="out", frames=0).resolve_model()


def test_the_default_decodes_only_the_frames_its_branches_read():
    """The card says what each branch reads; the decode samples exactly that: on CPU the
    shipped default's CLIP branch reads 4 frames and its CNN (weight 0) none."""
    card = resolve_model(None)
    reads = card.config.branch_frames
    assert reads is not None and reads["clip"]["cpu"] < card.config.frames
    assert stage_configs(card).decode.frames == card.config.frames_for("cpu") == max(
        r["cpu"] for r in reads.values())
    assert stage_configs(card, gpu=True).decode.frames == card.config.frames
    # --frames N: N frames sampled and scored, by every branch, on CPU too.
    over = card.with_overrides(frames=7)
    assert stage_configs(over).decode.frames == 7
    assert over.config.branch_frames is None and over.config.arch_kwargs["clip_frames"] == 7
    # A model whose card says nothing reads every frame.
    assert stage_configs(resolve_model("resnext_lstm_tiny")).decode.frames == 8


def test_branch_frames_are_validated():
    from dataclasses import replace

    config = resolve_model(None).config
    for bad in ({"clip": {"cpu": 4}}, {"clip": {"cpu": -1, "gpu": 4}},
                {"clip": {"cpu": 0, "gpu": 4}}, {"clip": {"cpu": 2.5, "gpu": 4}}):
        with pytest.raises(ValueError, match="branch_frames"):
            replace(config, branch_frames=bad)
    with pytest.raises(ValueError, match="device"):
        config.frames_for("tpu")
