"""Binary losses on logits: BCE or focal loss, with optional label smoothing.

* Label smoothing moves targets from {0, 1} to {eps/2, 1 - eps/2}, which keeps an
  over-confident detector from saturating on a small training set.
* Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017) scales each
  item's cross-entropy by ``(1 - p_t) ** gamma``, so easy items count less; ``alpha``
  weights the fake class (``1 - alpha`` the real one) when given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def smooth_labels(targets: Tensor, eps: float) -> Tensor:
    """``{0, 1}`` targets → ``{eps/2, 1 - eps/2}``."""
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {eps}")
    return targets * (1.0 - eps) + 0.5 * eps


def focal_loss_with_logits(logits: Tensor, targets: Tensor, gamma: float = 2.0,
                           alpha: float | None = None, reduction: str = "mean") -> Tensor:
    """Binary focal loss; ``targets`` may be soft (smoothed). ``gamma=0``, no ``alpha``
    is plain BCE."""
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t).clamp_min(0).pow(gamma)
    if alpha is not None:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")


@dataclass(frozen=True)
class LossConfig:
    kind: str = "bce"  # bce | focal
    gamma: float = 2.0
    alpha: float | None = None
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("bce", "focal"):
            raise ValueError(f"loss must be bce or focal, got {self.kind!r}")
        if self.gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {self.gamma}")
        if self.alpha is not None and not 0.0 < self.alpha < 1.0:
            raise ValueError(f"focal alpha must be in (0, 1), got {self.alpha}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")


class BinaryLoss(nn.Module):
    """``loss(logits, labels)`` with labels in {0, 1} (1 = fake), per :class:`LossConfig`."""

    def __init__(self, config: LossConfig | None = None) -> None:
        super().__init__()
        self.config = config or LossConfig()

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        cfg = self.config
        targets = labels.to(logits.dtype)
        if cfg.label_smoothing:
            targets = smooth_labels(targets, cfg.label_smoothing)
        if cfg.kind == "focal":
            return focal_loss_with_logits(logits, targets, cfg.gamma, cfg.alpha)
        return F.binary_cross_entropy_with_logits(logits, targets)
