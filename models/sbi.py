"""Self-blended images (SBI): synthetic fakes made from one real face.

After Shiohara & Yamasaki, "Detecting Deepfakes with Self-Blended Images", CVPR 2022:
a real face is copied, the copy (the *source*) is slightly transformed (colour and
frequency statistics, a small scale and shift), and it is blended back into the
original (the *target*) through a soft, randomly deformed face mask. The result carries
the generic traces of face swapping (a blending boundary, colour and sharpness
mismatch, slight misalignment) without any identity change, so a detector trained on
it learns those traces rather than one generator's fingerprints.

The paper builds its mask from 81 facial landmarks. Our crops carry only RetinaFace's
box (the audit aligns the face upright and centres it, with the box's longer side
covering ``1/margin`` of the crop), so the mask here is an ellipse over the face region,
deformed by a random low-frequency radial warp, eroded or dilated, blurred, and scaled
by a random blend ratio, as the paper does with its convex-hull masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class SBIConfig:
    margin: float = 1.3  # the audit's crop margin (CropConfig.margin)
    scale: tuple[float, float] = (0.95, 1.05)  # source resize
    shift: float = 0.03  # source translation, fraction of the crop side
    colour_shift: float = 20.0  # per-channel additive shift, uint8 units
    blend_ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)  # as in the paper

    def __post_init__(self) -> None:
        if not 1.0 <= self.margin <= 3.0:
            raise ValueError(f"margin must be in [1, 3], got {self.margin}")
        if not self.blend_ratios or not all(0 < r <= 1 for r in self.blend_ratios):
            raise ValueError("blend_ratios must be non-empty values in (0, 1]")


def face_mask(size: int, cfg: SBIConfig, rng: np.random.Generator) -> np.ndarray:
    """A soft ``[size, size]`` float32 mask in [0, 1] over the crop's face region."""
    face = size / cfg.margin  # the detector box's longer side, in crop pixels
    cx = size / 2 + rng.uniform(-0.04, 0.04) * face
    cy = size / 2 + rng.uniform(0.0, 0.08) * face  # boxes include the forehead: sit lower
    ax = face / 2 * rng.uniform(0.62, 0.85)
    ay = face / 2 * rng.uniform(0.78, 0.98)
    tilt = math.radians(rng.uniform(-8, 8))
    t = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    radial = np.ones_like(t)
    for k in (2, 3, 4):  # low-frequency deformation of the outline
        radial += rng.uniform(-0.06, 0.06) * np.cos(k * t + rng.uniform(0, 2 * math.pi))
    x, y = ax * radial * np.cos(t), ay * radial * np.sin(t)
    px = cx + x * math.cos(tilt) - y * math.sin(tilt)
    py = cy + x * math.sin(tilt) + y * math.cos(tilt)
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.stack([px, py], 1).round().astype(np.int32)], 255)
    k = int(rng.integers(1, max(2, size // 16) + 1))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))
    mask = cv2.erode(mask, kernel) if rng.random() < 0.5 else cv2.dilate(mask, kernel)
    sigma = rng.uniform(0.02, 0.08) * size
    ksize = 2 * math.ceil(3 * sigma) + 1
    soft = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (ksize, ksize), sigma)
    peak = float(soft.max())
    if peak > 0:
        soft /= peak
    return soft * float(rng.choice(cfg.blend_ratios))


def _source_transform(img: np.ndarray, cfg: SBIConfig, rng: np.random.Generator) -> np.ndarray:
    """The transformed copy: colour statistics, sharpness, and a small geometric shift."""
    h, w = img.shape[:2]
    out = img.astype(np.float32)
    out += rng.uniform(-cfg.colour_shift, cfg.colour_shift, size=3).astype(np.float32)
    out = (out - out.mean()) * rng.uniform(0.9, 1.1) + out.mean()
    out = np.clip(out, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:  # frequency: blur or sharpen
        sigma = rng.uniform(0.5, 1.5)
        blurred = cv2.GaussianBlur(out, (0, 0), sigma)
        if rng.random() < 0.5:
            out = blurred
        else:
            out = cv2.addWeighted(out, 1.6, blurred, -0.6, 0)
    s = rng.uniform(*cfg.scale)
    m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), 0.0, s)
    m[:, 2] += rng.uniform(-cfg.shift, cfg.shift, size=2) * np.array([w, h])
    return cv2.warpAffine(out, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def self_blend(img: np.ndarray, rng: np.random.Generator, cfg: SBIConfig | None = None,
               return_mask: bool = False):
    """A self-blended fake from a real ``[S, S, 3]`` uint8 crop (label it 1, fake).

    With ``return_mask`` also returns the blending mask (float32, [0, 1])."""
    cfg = cfg or SBIConfig()
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[0] != img.shape[1]:
        raise ValueError(f"expected a square uint8 [S, S, 3] crop, got {img.dtype} {img.shape}")
    img = np.ascontiguousarray(img)
    source = _source_transform(img, cfg, rng)
    mask = face_mask(img.shape[0], cfg, rng)[..., None]
    blended = source.astype(np.float32) * mask + img.astype(np.float32) * (1.0 - mask)
    out = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    return (out, mask[..., 0]) if return_mask else out
