"""The CLIP branch: the frozen float CLIP ViT-B/16 tower and a probe on its CLS tokens.

The probe reads the CLS token after each of a few blocks, standardises each (LayerNorm
without affine), L2-normalises it, concatenates them and applies one linear layer. Only
the probe is trained here (a few thousand parameters), so the branch keeps what CLIP
learnt from 400M images instead of fitting our handful of sources.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from deepaudit.models.clip_vit import CLIP_MEAN, CLIP_STD, IMAGE, LAYERS, WIDTH, load_tower
from deepaudit.models.preprocess import BranchPreprocess


def probe_inputs(cls: Tensor, blocks: Sequence[int]) -> Tensor:
    """``[N, 12, 768]`` CLS tokens (every block) -> the probe's input ``[N, len(blocks)*768]``."""
    picked = cls[:, [b - 1 for b in blocks]].float()
    picked = F.layer_norm(picked, (WIDTH,))
    return F.normalize(picked, dim=-1).flatten(1)


class ClipProbe(nn.Module):
    """A linear probe on standardised, L2-normalised CLS tokens of ``blocks``."""

    def __init__(self, blocks: Sequence[int] = (LAYERS,)) -> None:
        super().__init__()
        self.blocks = tuple(int(b) for b in blocks)
        if not self.blocks or any(not 1 <= b <= LAYERS for b in self.blocks):
            raise ValueError(f"probe blocks must be in 1..{LAYERS}, got {blocks}")
        self.linear = nn.Linear(len(self.blocks) * WIDTH, 1)

    def forward(self, cls: Tensor) -> Tensor:
        """``[N, 12, 768]`` CLS tokens -> ``[N]`` fake logits."""
        return self.linear(probe_inputs(cls, self.blocks)).squeeze(-1)


CLIP_PREPROCESS = BranchPreprocess(size=IMAGE, resize="bicubic", mean=CLIP_MEAN, std=CLIP_STD)


class ClipEmbedder:
    """Uint8 crops -> CLS tokens of every block, through the frozen float tower."""

    def __init__(self, device: str | torch.device = "cpu", chunk: int = 16) -> None:
        self.device = torch.device(device)
        self.tower = load_tower(self.device)
        self.preprocess = CLIP_PREPROCESS.normaliser(self.device)
        self.chunk = chunk

    def cls_tokens(self, crops: np.ndarray | Tensor) -> np.ndarray:
        with torch.inference_mode():
            x = self.preprocess(crops)
            out = [self.tower(c, blocks=tuple(range(1, LAYERS + 1)))[0]
                   for c in x.split(self.chunk)]
            return torch.cat(out).float().cpu().numpy()

    def cls_and_tokens(self, crops: np.ndarray | Tensor, after: int
                       ) -> tuple[np.ndarray, np.ndarray]:
        """CLS tokens of every block, and the whole token sequence after block ``after``
        (``[N, 197, 768]``, float16): the frozen input of the blocks after it."""
        with torch.inference_mode():
            x = self.preprocess(crops)
            cls, toks = [], []
            for c in x.split(self.chunk):
                h = self.tower.tokens(c)
                taken = []
                for k, block in enumerate(self.tower.encoder.layers, start=1):
                    h = block(h)
                    taken.append(h[:, 0])
                    if k == after:
                        toks.append(h.half())
                cls.append(torch.stack(taken, 1))
            return (torch.cat(cls).float().cpu().numpy(),
                    torch.cat(toks).cpu().numpy())


def balanced_weights(labels: Sequence[int], sources: Sequence[str]) -> np.ndarray:
    """Sample weights: half the mass on each label; within a label, each source's share
    grows with the square root of its count, so no single source decides what "real" or
    "fake" looks like."""
    labels, sources = np.asarray(labels), np.asarray(sources)
    w = np.zeros(len(labels), np.float64)
    for lab in (0, 1):
        idx = labels == lab
        if not idx.any():
            continue
        names, counts = np.unique(sources[idx], return_counts=True)
        share = np.sqrt(counts) / np.sqrt(counts).sum()
        for name, n, s in zip(names, counts, share):
            w[idx & (sources == name)] = 0.5 * s / n
    return w / w.sum() * len(w)


def fit_probe(probe: ClipProbe, cls: np.ndarray, labels: Sequence[int],
              weights: np.ndarray | None = None, l2: float = 1e-3, steps: int = 200) -> ClipProbe:
    """Weighted logistic regression of the probe on ``cls`` tokens ``[N, 12, 768]`` (full
    batch, L-BFGS, L2 penalty ``l2`` on the weights). Deterministic."""
    x = probe_inputs(torch.from_numpy(np.asarray(cls, np.float32)), probe.blocks)
    fit_linear(probe.linear, x, labels, weights, l2, steps)
    return probe


def fit_linear(lin: nn.Linear, x: Tensor, labels: Sequence[int],
               weights: np.ndarray | None = None, l2: float = 1e-3, steps: int = 200
               ) -> nn.Linear:
    """Weighted logistic regression of ``lin`` (one output) on features ``x`` ``[N, D]``,
    from zero, with an L2 penalty on its weights (L-BFGS, full batch). Deterministic."""
    y = torch.as_tensor(np.asarray(labels), dtype=torch.float32)
    w = torch.as_tensor(np.ones(len(y)) if weights is None else weights, dtype=torch.float32)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=steps,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        logits = lin(x).squeeze(-1)
        loss = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).mean()
        loss = loss + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return lin
