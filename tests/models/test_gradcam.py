"""Grad-CAM on the ResNeXt-LSTM: exact against hook-based autograd through the whole
model, per frame and per video, independent of batching, and it points at evidence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from deepaudit.models.gradcam import explain, explain_from_features, score_gradients
from deepaudit.models.registry import create_model


def _model(seed: int = 3):
    """The tiny architecture with every BatchNorm randomised, so no block is the identity
    (zero-init residuals would make the maps nearly trivial). Seeded: with seed 3 no map
    of these tests is all zero, so every comparison below compares real maps."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model("resnext_lstm_tiny")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
            elif isinstance(m, (torch.nn.Linear, torch.nn.LSTM)):
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _crops(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def _reference(model, crops, lengths):
    """Textbook Grad-CAM: a forward hook keeps layer4's output, and one backward per score
    through the whole model (trunk, pooling, heads, LSTM)."""
    kept = {}
    hook = model.backbone.layer4.register_forward_hook(lambda m, i, o: kept.update(a=o))
    try:
        with torch.enable_grad():
            feats = model.frame_features(crops)
            acts = kept["a"]
            frame_logits = model.frame_logits(feats)
            padded = pad_sequence(list(feats.split(lengths)), batch_first=True)
            video_logits = model.sequence_logits(padded, torch.tensor(lengths))
            offsets = np.cumsum([0, *lengths])

            def cam(score, i):
                (g,) = torch.autograd.grad(score, acts, retain_graph=True)
                alpha = g[i].mean(dim=(1, 2))
                m = torch.relu((alpha[:, None, None] * acts[i]).sum(0))
                m = F.interpolate(m[None, None], size=crops.shape[-2:], mode="bilinear",
                                  align_corners=False)[0, 0]
                return (m / m.max() if m.max() > 0 else m).detach().numpy()

            frame = [cam(frame_logits[i], i) for i in range(len(crops))]
            video = [cam(video_logits[b], i) for b in range(len(lengths))
                     for i in range(offsets[b], offsets[b + 1])]
    finally:
        hook.remove()
    return np.stack(frame), np.stack(video)


def test_matches_hook_based_gradcam_through_the_full_model():
    model, lengths = _model(), [4, 3]
    crops = _crops(sum(lengths))
    ref_frame, ref_video = _reference(model, crops, lengths)
    got = explain(model, crops, lengths)
    frame = np.concatenate([e.frame_cam for e in got])
    video = np.concatenate([e.video_cam for e in got])
    assert frame.shape == video.shape == (7, 64, 64)  # crop resolution
    assert (ref_video.max(axis=(1, 2)) == 1.0).all()  # the maps are not trivial
    assert (ref_frame.max(axis=(1, 2)) == 1.0).all()
    np.testing.assert_allclose(frame, ref_frame, atol=2e-5)
    np.testing.assert_allclose(video, ref_video, atol=2e-5)
    for m in (frame, video):
        assert m.min() >= 0.0 and m.max() <= 1.0
    # The recomputed scores are the model's own.
    with torch.no_grad():
        feats = model.frame_features(crops)
        p = torch.sigmoid(model.sequence_logits(
            pad_sequence(list(feats.split(lengths)), batch_first=True), torch.tensor(lengths)))
    assert [e.video_p for e in got] == pytest.approx(p.tolist(), abs=1e-6)


def test_video_gradient_reaches_every_frame_and_frame_gradients_stay_local():
    model, lengths = _model(), [5]
    crops = _crops(5, seed=3)
    feats = model.frame_features(crops).detach()
    frame_grad, video_grad, _, _ = score_gradients(model, feats, lengths)
    assert (video_grad.abs().sum(1) > 0).all()  # the LSTM passes gradient to all 5 frames
    # The frame head is linear: each frame's gradient is the head's weight, whatever the frame.
    w = model.frame_head.weight[0].detach()
    torch.testing.assert_close(frame_grad, w.expand(5, -1))
    # Video gradients differ per frame (the sequence model weighs frames differently).
    assert not torch.allclose(video_grad[0], video_grad[-1])


def test_batching_and_padding_do_not_change_a_videos_maps():
    model = _model()
    a, b = _crops(3, seed=1), _crops(6, seed=2)
    alone = explain(model, a, [3])[0]
    batched = explain(model, torch.cat([b, a]), [6, 3])[1]  # a padded behind a longer video
    assert alone.video_cam.max() == alone.frame_cam.max() == 1.0
    np.testing.assert_allclose(batched.video_cam, alone.video_cam, atol=2e-5)
    np.testing.assert_allclose(batched.frame_cam, alone.frame_cam, atol=2e-5)
    assert batched.video_p == pytest.approx(alone.video_p, abs=1e-6)


def test_reusing_the_classifiers_features_gives_the_same_maps():
    """The stage's path: pooled features from its inference-mode pass, trunk re-run only on
    the picked frames."""
    model, lengths = _model(), [4, 2]
    crops = _crops(6, seed=5)
    with torch.inference_mode():
        feats = model.frame_features(crops)
    positions = [[3, 0], [1]]
    picked = crops[[3, 0, 5]]
    fast = explain_from_features(model, feats, lengths, positions, picked)
    full = explain(model, crops, lengths, positions)
    for f, e in zip(fast, full):
        assert f.positions == e.positions and f.video_cam.max() == f.frame_cam.max() == 1.0
        np.testing.assert_allclose(f.video_cam, e.video_cam, atol=2e-5)
        np.testing.assert_allclose(f.frame_cam, e.frame_cam, atol=2e-5)
    assert fast[0].video_cam.shape == (2, 64, 64) and fast[1].frame_p.shape == (2,)
    with pytest.raises(ValueError, match="selected crops"):
        explain_from_features(model, feats, lengths, positions, picked[:2])
    with pytest.raises(ValueError, match="out of range"):
        explain(model, crops, lengths, [[4], [0]])


def test_frame_map_points_at_the_region_that_raises_the_score():
    """Plant a bright square in one corner and point the frame head at what the square
    changes in the features: the frame map must be hottest on the square."""
    model = _model(seed=11)
    size = 128  # a 4x4 layer4 grid
    plain = torch.zeros(1, 3, size, size)
    patched = plain.clone()
    patched[:, :, 8:56, 72:120] = 2.5  # top right
    with torch.no_grad():
        direction = model.frame_features(patched) - model.frame_features(plain)
        model.frame_head.weight.copy_(direction)
        model.frame_head.bias.zero_()
    (ex,) = explain(model, patched, [1])
    heat = ex.frame_cam[0]
    inside = heat[8:56, 72:120].mean()
    outside = np.concatenate([heat[64:, :].ravel(), heat[:, :56].ravel()]).mean()
    assert inside > 2 * outside, (inside, outside)
    assert ex.frame_p[0] > 0.5


def test_needs_eval_mode():
    model = _model().train()
    with pytest.raises(ValueError, match="eval"):
        score_gradients(model, torch.zeros(2, model.backbone.feat_dim), [2])
