"""Fitting the CLIP tower's last LayerNorms with the probe (models/ln_tune.py).

Training runs on cached inputs: the token stream after block 10 of every view in the
feature bank (``build_bank(..., tokens_after=10)``), so an epoch runs only the tuned
blocks (and, once, any frozen block between block 10 and the first tuned one). It starts
from the frozen solution: the tower's own norms and the probe fitted on frozen features
(:func:`deepaudit.models.clip_branch.fit_probe`), then trains norms and probe together
with Adam on the weighted BCE, an L2 penalty on the probe's weights and, optionally, one
that pulls the norms back towards the tower's. Deterministic for a seed on one machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from deepaudit.models.clip_branch import ClipProbe, fit_probe, probe_inputs
from deepaudit.models.ln_tune import TunedTail

TOKENS_AFTER = 10  # the bank caches the token stream after this block


@dataclass(frozen=True)
class LnTuneConfig:
    tuned: tuple[int, ...] = (12,)  # blocks whose LayerNorms train
    epochs: int = 3
    batch: int = 32
    lr: float = 1e-3
    l2: float = 1e-4  # on the probe's weights, as the frozen fit
    anchor: float = 0.0  # pull of the norms towards the tower's own
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.tuned, default=0) <= TOKENS_AFTER:
            raise ValueError(f"tuned blocks must come after block {TOKENS_AFTER} (the cached "
                             f"tokens), got {self.tuned}")
        if self.epochs < 0 or self.batch < 1 or self.lr <= 0:
            raise ValueError("epochs >= 0, batch >= 1 and lr > 0 are needed")


def tail_inputs(tower, tokens: np.ndarray, first: int, chunk: int = 64) -> np.ndarray:
    """The token stream entering block ``first`` from the cached one after block
    TOKENS_AFTER (the frozen blocks in between run once, here)."""
    if first == TOKENS_AFTER + 1:
        return tokens
    out = np.empty_like(tokens)
    with torch.inference_mode():
        for s in range(0, len(tokens), chunk):
            h = torch.from_numpy(tokens[s:s + chunk].astype(np.float32))
            for k in range(TOKENS_AFTER + 1, first):
                h = tower.encoder.layers[k - 1](h)
            out[s:s + chunk] = h.half().numpy()
    return out


def features(tower, tail: TunedTail, blocks: Sequence[int], inputs: Tensor,
             cls: Tensor) -> Tensor:
    """The probe's input: frozen CLS tokens (``cls`` ``[N, 12, 768]``) for blocks before
    the tail, the tail's for the rest."""
    tuned = tail(tower, inputs, blocks)
    parts, j = [], 0
    for k in blocks:
        if k < tail.first:
            parts.append(cls[:, k - 1])
        else:
            parts.append(tuned[:, j])
            j += 1
    return probe_inputs(torch.stack(parts, 1), tuple(range(1, len(blocks) + 1)))


def fit_tuned(tower, inputs: np.ndarray, cls: np.ndarray, labels: Sequence[int],
              weights: np.ndarray, blocks: Sequence[int], cfg: LnTuneConfig,
              on_progress: Callable[[dict], None] | None = None
              ) -> tuple[TunedTail, ClipProbe]:
    """Tune the norms of ``cfg.tuned`` and the probe on ``blocks`` from the frozen start.
    ``inputs``: the token stream entering the first tuned block (:func:`tail_inputs`)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    probe = fit_probe(ClipProbe(blocks), cls, labels, weights, l2=cfg.l2)
    tail = TunedTail(cfg.tuned).reset_from(tower)
    start = [p.detach().clone() for p in tail.parameters()]
    y = torch.as_tensor(np.asarray(labels), dtype=torch.float32)
    w = torch.as_tensor(np.asarray(weights, np.float64) / np.mean(weights), dtype=torch.float32)
    params = list(tail.parameters()) + list(probe.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    n = len(y)
    t0 = time.perf_counter()
    with torch.enable_grad():
        for epoch in range(cfg.epochs):
            order = rng.permutation(n)
            total = 0.0
            for s in range(0, n, cfg.batch):
                idx = np.sort(order[s:s + cfg.batch])
                x = torch.from_numpy(inputs[idx].astype(np.float32))
                c = torch.from_numpy(cls[idx].astype(np.float32))
                logits = probe.linear(features(tower, tail, blocks, x, c)).squeeze(-1)
                loss = (F.binary_cross_entropy_with_logits(logits, y[idx], reduction="none")
                        * w[idx]).mean()
                loss = loss + cfg.l2 * probe.linear.weight.pow(2).sum()
                if cfg.anchor:
                    loss = loss + cfg.anchor * sum((p - p0).pow(2).sum()
                                                   for p, p0 in zip(tail.parameters(), start))
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            if on_progress:
                on_progress({"epoch": epoch + 1, "loss": total / n,
                             "seconds": round(time.perf_counter() - t0, 1)})
    for p in params:
        p.requires_grad_(False)
    return tail.eval(), probe.eval()


def tuned_logits(tower, tail: TunedTail, probe: ClipProbe, inputs: np.ndarray,
                 cls: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Probe logits of cached views through the tuned tail."""
    out = []
    with torch.inference_mode():
        for s in range(0, len(inputs), chunk):
            x = torch.from_numpy(inputs[s:s + chunk].astype(np.float32))
            c = torch.from_numpy(cls[s:s + chunk].astype(np.float32))
            out.append(probe.linear(features(tower, tail, probe.blocks, x, c)).squeeze(-1))
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)
