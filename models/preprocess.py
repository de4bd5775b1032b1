"""The one crop -> tensor transform, taken from the model card.

Audit, evidence, training and the benches all turn uint8 face crops (N, H, W, 3, RGB)
into the model's input through :class:`CropNormaliser`, so training and serving can
never drift apart in scaling, channel order or memory layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from deepaudit.models.registry import ModelConfig


RESIZE_MODES = ("bilinear", "bicubic")


@dataclass(frozen=True)
class BranchPreprocess:
    """What one branch of a detector does to a uint8 crop: resize to ``size`` (when the
    crop has another size; antialiased ``resize`` interpolation), then normalise by
    ``mean`` and ``std``. Recorded in the model card."""

    size: int
    resize: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.size < 16:
            raise ValueError(f"branch input size must be >= 16, got {self.size}")

    def normaliser(self, device: str | torch.device = "cpu") -> CropNormaliser:
        return CropNormaliser(self, device)

    def to_dict(self) -> dict:
        return {"size": self.size, "resize": self.resize, "mean": list(self.mean),
                "std": list(self.std)}


class CropNormaliser:
    """``(crops - mean * 255) / (std * 255)`` as float32 NCHW in channels_last layout.

    ``mean`` and ``std`` come from the model's :class:`ModelConfig` (the card) or from a
    branch's :class:`BranchPreprocess`, which may also resize the crops first. Crops may
    be a numpy array or a uint8 tensor on any device; uint8 crosses to ``device`` first
    (4x less traffic than float32) and is normalised there. Float pixels (0-255) work too,
    differentiably (models/adversarial.py attacks through it)."""

    def __init__(self, config: ModelConfig | BranchPreprocess,
                 device: str | torch.device = "cpu") -> None:
        import torch

        self.torch = torch
        self.size = getattr(config, "size", None)
        self.resize = getattr(config, "resize", None)
        self.device = torch.device(device)
        self.mean = torch.tensor(config.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(config.std, device=self.device).view(1, 3, 1, 1) * 255.0

    def __call__(self, crops: np.ndarray | torch.Tensor) -> torch.Tensor:
        torch = self.torch
        if isinstance(crops, np.ndarray):
            crops = torch.from_numpy(np.ascontiguousarray(crops))
        if crops.ndim != 4 or crops.shape[-1] != 3:
            raise ValueError(f"crops must be (N, H, W, 3), got {tuple(crops.shape)}")
        x = crops.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        if self.size is not None and x.shape[-1] != self.size:
            x = torch.nn.functional.interpolate(
                x, size=(self.size, self.size), mode=self.resize, align_corners=False,
                antialias=True).clamp(0.0, 255.0)
        x = (x - self.mean) / self.std  # not in place: float pixels may carry gradients (PGD)
        return x.contiguous(memory_format=torch.channels_last)
