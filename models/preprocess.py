"""The one crop -> tensor transform, taken from the model card.

Audit, evidence, training and the benches all turn uint8 face crops (N, H, W, 3, RGB)
into the model's input through :class:`CropNormaliser`, so training and serving can
never drift apart in scaling, channel order or memory layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from deepaudit.models.registry import ModelConfig


class CropNormaliser:
    """``(crops - mean * 255) / (std * 255)`` as float32 NCHW in channels_last layout.

    ``mean`` and ``std`` come from the model's :class:`ModelConfig` (the card). Crops may
    be a numpy array or a uint8 tensor on any device; uint8 crosses to ``device`` first
    (4x less traffic than float32) and is normalised there."""

    def __init__(self, config: ModelConfig, device: str | torch.device = "cpu") -> None:
        import torch

        self.torch = torch
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
        x = x.sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=torch.channels_last)
