"""The seeds' heads (issue 26): the BiLSTM with temporal attention and PGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deepaudit.models.adversarial import PGDConfig, pgd_attack
from deepaudit.models.metrics import roc_auc
from deepaudit.models.temporal_attention import (
    AttentionHead,
    attention_scores,
    fit_attention_head,
    pad,
)

D = 768  # one CLIP block's width: the head reads probe inputs of its blocks


def test_attention_ignores_padding_and_the_item_logit_weighs_the_frames():
    torch.manual_seed(0)
    head = AttentionHead((12,)).eval()
    seqs = [torch.randn(5, D), torch.randn(2, D), torch.randn(1, D)]
    x, lengths = pad(seqs)
    with torch.no_grad():
        item, frame, w = head(x, lengths)
        alone, _, _ = head(seqs[1][None], [2])
    assert w.shape == (3, 5)
    assert torch.allclose(w.sum(1), torch.ones(3))
    assert (w[1, 2:] == 0).all() and (w[2, 1:] == 0).all() and w[2, 0] == 1
    assert torch.allclose(item, (w * frame.masked_fill(w == 0, 0)).sum(1), atol=1e-6)
    # An item's score never depends on the other items of the batch (or their padding).
    assert torch.allclose(item[1], alone[0], atol=1e-5)


def test_attention_finds_the_one_frame_that_carries_the_signal():
    """Fakes differ from reals in one frame of eight; the trained head scores them apart
    and puts its weight on that frame."""
    rng = np.random.default_rng(0)
    direction = rng.normal(size=D).astype(np.float32)
    direction /= np.linalg.norm(direction)

    def make(n: int):
        seqs, labels, where = [], [], []
        for i in range(n):
            s = rng.normal(size=(8, D)).astype(np.float32) * 0.05
            k = int(rng.integers(0, 8))
            if i % 2:
                s[k] += direction * 0.6
            seqs.append(s)
            labels.append(i % 2)
            where.append(k)
        return seqs, labels, where

    train, y, _ = make(240)
    head = fit_attention_head(AttentionHead((12,), dropout=0.0), train, y, epochs=25,
                              seed=0, min_frames=8)
    test, yt, where = make(80)
    logits, _, weights = attention_scores(head, test)
    assert roc_auc(yt, logits) > 0.95
    on_signal = np.mean([w[k] for w, k, lab in zip(weights, where, yt) if lab == 1])
    assert on_signal > 2 / 8  # uniform attention would give 1/8


def test_fit_attention_head_is_deterministic():
    rng = np.random.default_rng(1)
    seqs = [rng.normal(size=(int(rng.integers(1, 6)), D)).astype(np.float32) for _ in range(40)]
    y = [i % 2 for i in range(40)]
    a = fit_attention_head(AttentionHead((12,)), seqs, y, epochs=2, seed=3)
    b = fit_attention_head(AttentionHead((12,)), seqs, y, epochs=2, seed=3)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)


class _Brightness(nn.Module):
    """A differentiable toy detector: fake logit = mean pixel value, centred."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.mean(dim=(1, 2, 3)) - 128.0) / 8.0


def test_pgd_stays_in_the_ball_and_moves_the_score_its_way():
    rng = np.random.default_rng(0)
    crops = rng.integers(60, 200, size=(4, 16, 16, 3), dtype=np.uint8)
    model = _Brightness()
    cfg = PGDConfig(eps=4.0, steps=3)
    y = np.array([1, 1, 0, 0])
    away = pgd_attack(model, crops, y, cfg)
    towards_real = pgd_attack(model, crops, np.zeros(4), cfg, towards=True)
    for adv in (away, towards_real):
        assert adv.dtype == np.uint8 and adv.shape == crops.shape
        assert np.abs(adv.astype(int) - crops.astype(int)).max() <= 4
    score = lambda c: model(torch.from_numpy(c).float()).numpy()  # noqa: E731
    before = score(crops)
    assert (score(away)[:2] < before[:2]).all() and (score(away)[2:] > before[2:]).all()
    assert (score(towards_real) < before).all()
    assert np.array_equal(pgd_attack(model, crops, y, cfg), away)  # seeded


@pytest.mark.parametrize("eps,steps", [(0, 2), (40, 2), (2, 0)])
def test_pgd_config_rejects_bad_values(eps, steps):
    with pytest.raises(ValueError, match="PGD"):
        PGDConfig(eps=eps, steps=steps)


def test_pgd_is_a_perturbation_the_stage_applies_with_the_model():
    from deepaudit.models.perturb import Perturbation, apply_perturbation

    p = Perturbation.parse("pgd:2")
    assert p.name == "pgd:2"
    with pytest.raises(ValueError, match="needs the model"):
        apply_perturbation(np.zeros((8, 8, 3), np.uint8), p)
    with pytest.raises(ValueError, match="pixel levels"):
        Perturbation.parse("pgd:40")


@pytest.mark.skipif(not __import__("deepaudit.models.clip_vit", fromlist=["x"]).wheel_path()
                    .is_file(), reason="the pinned CLIP wheel is not fetched (make setup)")
@pytest.mark.parametrize("name", ["clip_fused_tiny", "clip_heads_tiny"])
def test_a_clip_items_score_is_the_same_to_the_bit_in_any_batch(name):
    """On CPU the CLIP branch embeds one crop at a time, so an item's p_fake is identical
    (not merely close) whatever else shares its batch: re-runs of an archive in other
    batches give byte-identical verdict columns."""
    from deepaudit.models.registry import create_model

    torch.manual_seed(0)
    model = create_model(name).eval()
    model.cnn_weight.fill_(0.0)
    rng = np.random.default_rng(0)
    item = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    others = rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    alone = np.float32(model.score(item, [3]).video_p[0])
    for k in (1, 2, 6):
        mixed = model.score(np.concatenate([others[:k], item]), [1] * k + [3]).video_p[-1]
        assert np.float32(mixed) == alone
