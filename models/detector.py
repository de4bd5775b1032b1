"""The detector contract: what the audit, evidence, training and the benches may call.

A detector is an ``nn.Module`` built by the registry that also provides:

* ``preprocessing()``: ``{branch: BranchPreprocess}``, each branch's size, resize and
  mean/std (recorded in the card);
* ``score(crops, lengths)``: uint8 crops ``[N, S, S, 3]`` of consecutive items (``lengths``
  frames each) -> :class:`Scores`, per-item and per-frame p_fake. One call, whatever
  the branches; the result of an item never depends on the other items of the batch;
* ``param_groups()``: ``{group: [parameters]}``, what training may unfreeze;
* ``explain(scores, lengths, positions, crops)``: Grad-CAM maps of picked frames
  (:mod:`deepaudit.models.gradcam`), reusing the features ``score`` computed;
* ``cam_method``: one line saying which layer the maps come from.

:class:`DetectorMixin` implements ``score`` on top of a model's ``raw_scores`` and
applies the card's calibration (``ModelConfig.calibration``) and the one-frame rule: an
image's (one-frame item's) frame score is its item score, so the two never disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


@dataclass
class Scores:
    """What :meth:`DetectorMixin.score` returns."""

    video_p: np.ndarray  # [B] each item's p_fake (calibrated when the card has a map)
    frame_p: np.ndarray  # [N] each frame's p_fake, same scale; NaN: no branch scored it
    head: list[str]  # [B] which head gave the item's score
    branch_p: dict[str, np.ndarray] = field(default_factory=dict)  # [B] per branch, raw
    cam_features: Tensor | None = None  # [N, F] what explain() reuses
    # [N] the temporal attention's weight of each frame (0 for frames the head did not
    # read; each item's weights sum to 1), or None for heads without attention
    frame_weights: np.ndarray | None = None


def calibrate(p: np.ndarray, knots: Sequence[Sequence[float]] | None) -> np.ndarray:
    """Map raw scores through a monotone piecewise-linear calibration ``(x, y)`` (fitted
    on validation data, see :func:`fit_calibration`); identity without one."""
    p = np.asarray(p, np.float64)
    if not knots:
        return p
    x, y = (np.asarray(k, np.float64) for k in knots)
    return np.interp(p, x, y)


def fit_calibration(scores: Sequence[float], labels: Sequence[int], bins: int = 12
                    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Isotonic regression of the label on the score (pool adjacent violators) over
    equal-count bins, returned as interpolation knots ``(x, y)``, with y strictly
    increasing (a tiny slope breaks ties, so the ranking and hence AUC are kept)."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels, np.float64)
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    groups = [g for g in np.array_split(np.arange(len(s)), min(bins, len(s))) if len(g)]
    xs = [float(s[g].mean()) for g in groups]
    blocks = [[float(y[g].mean()), len(g), [i]] for i, g in enumerate(groups)]
    merged: list[list] = []
    for b in blocks:  # pool adjacent violators
        merged.append(b)
        while len(merged) > 1 and merged[-2][0] >= merged[-1][0]:
            v2, n2, i2 = merged.pop()
            v1, n1, i1 = merged.pop()
            merged.append([(v1 * n1 + v2 * n2) / (n1 + n2), n1 + n2, i1 + i2])
    ys = np.zeros(len(groups))
    for v, _, idx in merged:
        ys[idx] = v
    ys = np.clip(ys, 0.005, 0.995) + np.arange(len(ys)) * 1e-4  # strictly increasing
    knots_x = [0.0, *xs, 1.0]
    knots_y = [min(float(ys[0]), 0.005) - 1e-4, *[float(v) for v in ys],
               max(float(ys[-1]), 0.995) + 1e-4]
    return tuple(knots_x), tuple(knots_y)


def reliability_table(p: Sequence[float], labels: Sequence[int], bins: int = 5) -> list[dict]:
    """Predicted against observed fake rate in equal-width bins of ``p``."""
    p, y = np.asarray(p, np.float64), np.asarray(labels, np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (p >= lo) & ((p < hi) if hi < 1.0 else (p <= hi))
        out.append({"bin": f"{lo:.1f}-{hi:.1f}", "n": int(m.sum()),
                    "mean_p": float(p[m].mean()) if m.any() else None,
                    "fake_rate": float(y[m].mean()) if m.any() else None})
    return out


class DetectorMixin:
    """``score`` for any model with ``raw_scores(crops, lengths, chunk) -> Scores``."""

    def score(self, crops: np.ndarray | Tensor, lengths: Sequence[int], chunk: int = 64
              ) -> Scores:
        lengths = [int(n) for n in lengths]
        if sum(lengths) != len(crops) or min(lengths, default=1) < 1:
            raise ValueError(f"lengths {lengths} do not split {len(crops)} crops")
        if isinstance(crops, np.ndarray):
            crops = torch.from_numpy(np.ascontiguousarray(crops))
        raw = self.raw_scores(crops, lengths, chunk)
        knots = getattr(getattr(self, "config", None), "calibration", None)
        raw.video_p = calibrate(raw.video_p, knots)
        raw.frame_p = calibrate(raw.frame_p, knots)
        offsets = np.cumsum([0, *lengths])
        for b, n in enumerate(lengths):
            if n == 1:  # an image: one number, the item's
                raw.frame_p[offsets[b]] = raw.video_p[b]
        return raw

    def param_groups(self) -> dict[str, list]:
        raise NotImplementedError
