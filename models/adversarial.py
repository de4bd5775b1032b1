"""Projected gradient descent (PGD) on face crops, in pixel units.

Used twice: by adversarial training (the recipe's ``adv_eps`` and ``adv_steps``: the
CLIP probe is refitted on clean crops plus crops attacked against it) and by
``deepaudit evaluate --perturb pgd:EPS``, a white-box evasion test in which every crop is
pushed towards "real" (what a forger would do to a fake) before it is scored.

An attack works on float pixels in [0, 255] (``[N, S, S, 3]``), steps by the sign of
the gradient, stays within ``eps`` of the crop in L-inf, and returns uint8 crops:
what the audit would read back from a file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F


@dataclass(frozen=True)
class PGDConfig:
    eps: float = 2.0  # L-inf radius, in 0-255 pixel levels
    steps: int = 2
    step_size: float | None = None  # per step; default 2.5 * eps / steps
    random_start: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.eps <= 32:
            raise ValueError(f"PGD eps must be in (0, 32] pixel levels, got {self.eps:g}")
        if not 1 <= self.steps <= 50:
            raise ValueError(f"PGD steps must be 1-50, got {self.steps}")

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps


def pgd_attack(logits_fn: Callable[[Tensor], Tensor], crops: np.ndarray | Tensor,
               targets: np.ndarray | Tensor, cfg: PGDConfig, towards: bool = False
               ) -> np.ndarray:
    """Attack uint8 ``crops`` ``[N, S, S, 3]``: maximise the BCE of ``logits_fn`` (float
    pixels -> ``[N]`` fake logits) against ``targets`` (0/1), or with ``towards`` minimise
    it (push each crop to its target). Returns uint8 crops within ``eps`` of the input."""
    x0 = torch.as_tensor(np.ascontiguousarray(crops)).float()
    y = torch.as_tensor(np.asarray(targets), dtype=torch.float32)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = x0.clone()
    if cfg.random_start:
        x = x + (torch.rand(x.shape, generator=gen) * 2 - 1) * cfg.eps
        x = x.clamp(0, 255)
    sign = -1.0 if towards else 1.0
    for _ in range(cfg.steps):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            loss = F.binary_cross_entropy_with_logits(logits_fn(x), y.to(x.device))
            (grad,) = torch.autograd.grad(loss, x)
        x = x.detach() + sign * cfg.alpha * grad.sign()
        x = torch.min(torch.max(x, x0 - cfg.eps), x0 + cfg.eps).clamp(0, 255)
    out = torch.round(x).clamp(0, 255)
    out = torch.min(torch.max(out, torch.ceil(x0 - cfg.eps)), torch.floor(x0 + cfg.eps))
    return out.to(torch.uint8).cpu().numpy()


def clip_probe_logits(tower, probe, normaliser) -> Callable[[Tensor], Tensor]:
    """Float pixels ``[N, S, S, 3]`` -> the probe's fake logits, differentiable through
    the frozen tower (``normaliser``: the CLIP branch's CropNormaliser)."""
    from deepaudit.models.clip_branch import probe_inputs

    def fn(pixels: Tensor) -> Tensor:
        cls = tower(normaliser(pixels), blocks=probe.blocks)[0]
        return probe.linear(probe_inputs(cls, range(1, cls.shape[1] + 1))).squeeze(-1)

    return fn
