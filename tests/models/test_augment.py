"""Augmentations, self-blended images and losses: determinism and hand-checked values."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from deepaudit.models.augment import AugmentConfig, augment, jpeg_roundtrip
from deepaudit.models.losses import BinaryLoss, LossConfig, focal_loss_with_logits, smooth_labels
from deepaudit.models.sbi import SBIConfig, face_mask, self_blend


@pytest.fixture(scope="module")
def crop() -> np.ndarray:
    """A 96 px face crop of a bundled photo (as the audit would cut it, roughly)."""
    from deepaudit.pipeline.demo_media import face_photos

    photo = face_photos()["astronaut"]  # 512x512, face near the top centre
    return cv2.resize(np.ascontiguousarray(photo[20:280, 120:380]), (96, 96),
                      interpolation=cv2.INTER_AREA)


def test_augment_is_deterministic_under_a_seed(crop):
    cfg = AugmentConfig()
    a = augment(crop, cfg, np.random.default_rng(7))
    b = augment(crop, cfg, np.random.default_rng(7))
    c = augment(crop, cfg, np.random.default_rng(8))
    assert a.dtype == np.uint8 and a.shape == crop.shape and a.flags.c_contiguous
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.shares_memory(a, crop)


def test_every_crop_is_recompressed(crop):
    # JPEG-only: the output is exactly what a JPEG round trip at some quality gives, so
    # a lossless (PNG) source no longer looks lossless.
    cfg = AugmentConfig(flip_p=0, rotate_p=0, color_p=0, downscale_p=0, blur_p=0, noise_p=0,
                        jpeg_quality=(50, 50))
    out = augment(crop, cfg, np.random.default_rng(0))
    assert np.array_equal(out, jpeg_roundtrip(crop, 50)) and not np.array_equal(out, crop)
    assert np.array_equal(augment(crop, AugmentConfig.off(), np.random.default_rng(0)), crop)
    only = AugmentConfig().confounds_only()
    assert only.jpeg_p == 1.0 and only.flip_p == only.color_p == only.noise_p == 0


def test_flip_and_downscale_do_what_they_say(crop):
    flip = AugmentConfig.off().__class__(flip_p=1, rotate_p=0, color_p=0, downscale_p=0,
                                         blur_p=0, noise_p=0, jpeg_p=0)
    assert np.array_equal(augment(crop, flip, np.random.default_rng(0)), crop[:, ::-1])
    down = AugmentConfig(flip_p=0, rotate_p=0, color_p=0, downscale_p=1, downscale=(0.25, 0.25),
                         blur_p=0, noise_p=0, jpeg_p=0)
    out = augment(crop, down, np.random.default_rng(0))
    # Detail is lost: the high-frequency energy drops.

    def lap(im: np.ndarray) -> float:
        return cv2.Laplacian(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY), cv2.CV_32F).var()

    assert lap(out) < 0.5 * lap(crop)


def test_augment_config_is_validated():
    for bad in (dict(flip_p=1.5), dict(jpeg_quality=(90, 40)), dict(downscale=(0.0, 0.5)),
                dict(rotate_deg=90)):
        with pytest.raises(ValueError):
            AugmentConfig(**bad)
    with pytest.raises(ValueError):
        augment(np.zeros((8, 8), np.uint8), AugmentConfig(), np.random.default_rng(0))


def test_self_blend_changes_the_face_not_the_border(crop):
    out, mask = self_blend(crop, np.random.default_rng(3), return_mask=True)
    again = self_blend(crop, np.random.default_rng(3))
    assert np.array_equal(out, again) and out.dtype == np.uint8 and out.shape == crop.shape
    assert mask.shape == crop.shape[:2] and 0.0 <= mask.min() and mask.max() <= 1.0
    diff = np.abs(out.astype(int) - crop.astype(int)).sum(axis=2)
    s = crop.shape[0]
    centre = diff[s // 3: 2 * s // 3, s // 3: 2 * s // 3].mean()
    corners = np.concatenate([diff[:8, :8].ravel(), diff[:8, -8:].ravel(),
                              diff[-8:, :8].ravel(), diff[-8:, -8:].ravel()]).mean()
    assert centre > 5 * max(corners, 0.5) and corners < 1.0
    assert mask[s // 2, s // 2] > 0.2 and mask[0, 0] < 0.01
    with pytest.raises(ValueError):
        self_blend(crop[:, :50], np.random.default_rng(0))


def test_face_mask_follows_the_crop_margin():
    rng = np.random.default_rng(0)

    def area(margin: float) -> float:  # share of the crop where the mask is over half-on
        masks = [face_mask(128, SBIConfig(margin=margin), rng) for _ in range(20)]
        return float(np.mean([(m > 0.5 * m.max()).mean() for m in masks]))

    tight, loose = area(1.0), area(2.0)
    assert tight > 2.5 * loose  # the face covers 1/margin of the side, ~1/margin^2 of the area


def test_focal_loss_and_smoothing_by_hand():
    logits = torch.tensor([2.0, -1.0, 0.0])
    y = torch.tensor([1.0, 1.0, 0.0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    assert torch.allclose(focal_loss_with_logits(logits, y, gamma=0.0), bce)
    # Item 1: p = sigmoid(2), p_t = p; loss = -(1 - p)^2 log p.
    p = 1 / (1 + math.exp(-2.0))
    per = focal_loss_with_logits(logits, y, gamma=2.0, reduction="none")
    assert per[0].item() == pytest.approx(-((1 - p) ** 2) * math.log(p), rel=1e-5)
    assert per[0] < per[1]  # the confident, correct item weighs less than the wrong one
    alpha = focal_loss_with_logits(logits, y, gamma=2.0, alpha=0.25, reduction="none")
    assert torch.allclose(alpha, per * torch.tensor([0.25, 0.25, 0.75]))
    assert torch.equal(smooth_labels(torch.tensor([0.0, 1.0]), 0.1), torch.tensor([0.05, 0.95]))
    smooth = BinaryLoss(LossConfig("bce", label_smoothing=0.1))(logits, y)
    want = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.tensor([0.95, 0.95, 0.05]))
    assert torch.allclose(smooth, want)
    with pytest.raises(ValueError):
        LossConfig("hinge")
