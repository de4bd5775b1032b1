"""Binary detection metrics and their plots, shared by ``evaluate`` and ``report``.

Convention: label 1 = fake (the positive class), 0 = real; a score is p_fake and an
item is predicted fake when ``score >= threshold``. Plain NumPy, so the figures can be
checked by hand (``tests/jobs/test_metrics.py``) and no scikit-learn is needed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class BinaryMetrics:
    n: int
    n_fake: int
    n_real: int
    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    accuracy: float | None
    precision: float | None
    recall: float | None  # true positive rate
    f1: float | None
    fpr: float | None
    roc_auc: float | None  # None when only one class is present
    average_precision: float | None

    def confusion_matrix(self) -> list[list[int]]:
        """``[[tn, fp], [fn, tp]]``: rows are the true class (real, fake), columns the
        predicted class, as scikit-learn orders it."""
        return [[self.tn, self.fp], [self.fn, self.tp]]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["confusion_matrix"] = self.confusion_matrix()
        return out


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def _as_arrays(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(
            f"labels and scores must be 1-D and equally long, got {y.shape}, {s.shape}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (real) or 1 (fake)")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return y, s


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve: the probability that a random fake outscores a random
    real, ties counting one half (Mann-Whitney U). None with only one class."""
    y, s = _as_arrays(labels, scores)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(
    labels: Sequence[int], scores: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``, from (0, 0) to (1, 1); one point per distinct score,
    thresholds descending (the first is +inf)."""
    y, s = _as_arrays(labels, scores)
    n_pos, n_neg = max(int(y.sum()), 1), max(int((1 - y).sum()), 1)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1] if len(s) else np.array([], int)
    tps = np.cumsum(y)[last]
    fps = np.cumsum(1 - y)[last]
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return fpr, tpr, np.r_[np.inf, s[last]]


def average_precision(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Area under the precision-recall curve as a step sum: sum over distinct thresholds of
    (recall step) x precision. None without fakes."""
    y, s = _as_arrays(labels, scores)
    n_pos = int(y.sum())
    if n_pos == 0:
        return None
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[last]
    predicted = last + 1
    precision = tps / predicted
    recall = tps / n_pos
    steps = np.diff(np.r_[0.0, recall])
    return float((steps * precision).sum())


def threshold_at_fpr(labels: Sequence[int], scores: Sequence[float], target_fpr: float) -> float:
    """The lowest threshold whose false-positive rate on these reals is <= ``target_fpr``
    (the most fakes caught for that FPR). Needs at least one real."""
    y, s = _as_arrays(labels, scores)
    reals = np.sort(s[y == 0])[::-1]
    if reals.size == 0:
        raise ValueError("calibration needs real items (label 0) to measure the FPR")
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target FPR must be in [0, 1), got {target_fpr}")
    allowed = int(math.floor(target_fpr * reals.size + 1e-9))  # reals allowed above threshold
    if allowed >= reals.size:
        return float(reals[-1])
    # Strictly above the (allowed+1)-th highest real score; nextafter keeps ">=" exact.
    return float(np.nextafter(reals[allowed], np.inf))


def threshold_max_youden(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """The score threshold that maximises Youden's J = TPR - FPR (the ROC point farthest
    above the diagonal); the lowest such threshold on ties. None with only one class."""
    y, s = _as_arrays(labels, scores)
    if y.sum() == 0 or (1 - y).sum() == 0:
        return None
    fpr, tpr, thresholds = roc_curve(y, s)
    j = (tpr - fpr)[1:]  # skip the +inf point
    best = np.flatnonzero(j == j.max())[-1]
    return float(thresholds[1:][best])


def binary_metrics(
    labels: Sequence[int], scores: Sequence[float], threshold: float
) -> BinaryMetrics:
    y, s = _as_arrays(labels, scores)
    pred = s >= threshold
    tp = int((pred & (y == 1)).sum())
    fp = int((pred & (y == 0)).sum())
    tn = int((~pred & (y == 0)).sum())
    fn = int((~pred & (y == 1)).sum())
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = (2 * precision * recall / (precision + recall)
          if precision is not None and recall is not None and precision + recall > 0 else
          (0.0 if precision is not None and recall is not None else None))
    return BinaryMetrics(
        n=int(y.size), n_fake=int(y.sum()), n_real=int((1 - y).sum()), threshold=float(threshold),
        tp=tp, fp=fp, tn=tn, fn=fn,
        accuracy=_ratio(tp + tn, y.size), precision=precision, recall=recall, f1=f1,
        fpr=_ratio(fp, fp + tn), roc_auc=roc_auc(y, s), average_precision=average_precision(y, s),
    )


def slice_metrics(preds: list[dict], threshold: float) -> dict:
    """Item metrics at ``threshold`` (rows with ``label``, ``p_fake``, ``media_type`` and
    ``source``): overall, per media type and per source; a slice with no rows is None."""

    def block(rows: list[dict]) -> dict | None:
        if not rows:
            return None
        return binary_metrics([r["label"] for r in rows], [r["p_fake"] for r in rows],
                              threshold).to_dict()

    out = {"overall": block(preds), "by_media_type": {}, "by_source": {}}
    for key, name in (("media_type", "by_media_type"), ("source", "by_source")):
        for value in sorted({r[key] for r in preds}):
            out[name][value] = block([r for r in preds if r[key] == value])
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def roc_png(labels: Sequence[int], scores: Sequence[float], title: str = "ROC") -> bytes:
    """A ROC curve as PNG bytes (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr, _ = roc_curve(labels, scores)
    auc = roc_auc(labels, scores)
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot(fpr, tpr, lw=2, label=f"AUC = {auc:.3f}" if auc is not None else "AUC n/a")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title,
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    return _png(fig)


def histogram_png(scores: Sequence[float], labels: Sequence[int | None] | None = None,
                  threshold: float | None = None, title: str = "p_fake") -> bytes:
    """A score histogram as PNG bytes; split by label when labels are given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = np.asarray(scores, dtype=np.float64)
    bins = np.linspace(0, 1, 21)
    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    if labels is not None:
        lab = np.asarray([-1 if v is None else v for v in labels])
        for value, name, colour in ((0, "real", "tab:blue"), (1, "fake", "tab:red"),
                                    (-1, "unlabelled", "tab:grey")):
            if (lab == value).any():
                ax.hist(s[lab == value], bins=bins, alpha=0.6, label=name, color=colour)
        ax.legend()
    else:
        ax.hist(s, bins=bins, color="tab:purple")
    if threshold is not None:
        ax.axvline(threshold, c="k", ls="--", lw=1)
    ax.set(xlabel="p_fake", ylabel="items", title=title, xlim=(0, 1))
    return _png(fig)
