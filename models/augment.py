"""Training augmentations for uint8 RGB face crops (NumPy + OpenCV), deterministic under a
``numpy.random.Generator``: the same generator state gives the same output.

Order follows how media is made: geometry (flip, small rotation), photometry
(brightness/contrast), resolution loss (downscale and back up), blur, sensor noise, and
JPEG recompression last. Recompressing every crop, reals and fakes alike, with a random
quality stops a model from learning the file format (e.g. "PNG means fake"), and the
random downscale hides the source's native resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of each augmentation; ``p=0`` switches one off."""

    flip_p: float = 0.5
    rotate_p: float = 0.5
    rotate_deg: float = 8.0  # uniform in [-rotate_deg, rotate_deg]
    color_p: float = 0.8
    brightness: float = 0.15  # additive shift, as a fraction of 255
    contrast: float = 0.2  # gain in [1 - contrast, 1 + contrast]
    downscale_p: float = 0.35
    downscale: tuple[float, float] = (0.35, 0.9)  # scale before resizing back up
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.3, 1.4)
    noise_p: float = 0.2
    noise_std: tuple[float, float] = (2.0, 8.0)  # in uint8 units
    jpeg_p: float = 1.0
    jpeg_quality: tuple[int, int] = (40, 95)

    def __post_init__(self) -> None:
        for name in ("flip_p", "rotate_p", "color_p", "downscale_p", "blur_p", "noise_p",
                     "jpeg_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        lo, hi = self.jpeg_quality
        if not 1 <= lo <= hi <= 100:
            raise ValueError(f"jpeg_quality must be 1 <= lo <= hi <= 100, got {self.jpeg_quality}")
        lo, hi = self.downscale
        if not 0.05 <= lo <= hi <= 1.0:
            raise ValueError(f"downscale must be 0.05 <= lo <= hi <= 1, got {self.downscale}")
        if not 0.0 <= self.rotate_deg <= 45.0:
            raise ValueError(f"rotate_deg must be in [0, 45], got {self.rotate_deg}")

    @classmethod
    def off(cls) -> AugmentConfig:
        """No augmentation at all."""
        return cls(flip_p=0, rotate_p=0, color_p=0, downscale_p=0, blur_p=0, noise_p=0, jpeg_p=0)

    def confounds_only(self) -> AugmentConfig:
        """Only what neutralises format and resolution (JPEG, downscale): for the views
        the sequence phase computes features from."""
        return replace(self, flip_p=0, rotate_p=0, color_p=0, blur_p=0, noise_p=0)


def jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    """Encode to JPEG at ``quality`` and decode again (channel order is preserved)."""
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)


def augment(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """One augmented copy of an ``[H, W, 3]`` uint8 crop (the input is not modified)."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] crop, got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    out = img
    if rng.random() < cfg.flip_p:
        out = out[:, ::-1]
    if rng.random() < cfg.rotate_p and cfg.rotate_deg > 0:
        angle = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg)
        m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, 1.0)
        out = cv2.warpAffine(np.ascontiguousarray(out), m, (w, h), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT_101)
    if rng.random() < cfg.color_p:
        gain = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
        shift = rng.uniform(-cfg.brightness, cfg.brightness) * 255.0
        mean = float(out.mean())
        out = np.clip((out.astype(np.float32) - mean) * gain + mean + shift, 0, 255)
        out = out.astype(np.uint8)
    if rng.random() < cfg.downscale_p:
        s = rng.uniform(*cfg.downscale)
        small = (max(8, round(w * s)), max(8, round(h * s)))
        out = cv2.resize(np.ascontiguousarray(out), small, interpolation=cv2.INTER_AREA)
        interp = (cv2.INTER_LINEAR, cv2.INTER_CUBIC)[int(rng.integers(2))]
        out = cv2.resize(out, (w, h), interpolation=interp)
    if rng.random() < cfg.blur_p:
        sigma = rng.uniform(*cfg.blur_sigma)
        k = 2 * math.ceil(2.5 * sigma) + 1
        out = cv2.GaussianBlur(np.ascontiguousarray(out), (k, k), sigma)
    if rng.random() < cfg.noise_p:
        std = rng.uniform(*cfg.noise_std)
        noise = rng.normal(0.0, std, out.shape).astype(np.float32)
        out = np.clip(out.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    if rng.random() < cfg.jpeg_p:
        lo, hi = cfg.jpeg_quality
        out = jpeg_roundtrip(np.ascontiguousarray(out), int(rng.integers(lo, hi + 1)))
    return np.ascontiguousarray(out)
