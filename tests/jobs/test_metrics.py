"""Evaluation metrics against values computed by hand on a small fixed example."""

from __future__ import annotations

import numpy as np
import pytest

from deepaudit.models.metrics import (
    average_precision,
    binary_metrics,
    histogram_png,
    roc_auc,
    roc_curve,
    roc_png,
    threshold_at_fpr,
)

# label 1 = fake. Scores sorted: 0.9 F, 0.8 F, 0.7 R, 0.4 R, 0.35 F, 0.1 R.
LABELS = [0, 0, 1, 1, 0, 1]
SCORES = [0.1, 0.4, 0.35, 0.8, 0.7, 0.9]


def test_confusion_and_rates_by_hand():
    m = binary_metrics(LABELS, SCORES, threshold=0.5)
    # predicted fake: 0.9 (F), 0.8 (F), 0.7 (R) -> tp 2, fp 1; 0.35 (F) missed -> fn 1.
    assert (m.tp, m.fp, m.tn, m.fn) == (2, 1, 2, 1)
    assert m.confusion_matrix() == [[2, 1], [1, 2]]
    assert m.accuracy == pytest.approx(4 / 6)
    assert m.precision == pytest.approx(2 / 3) and m.recall == pytest.approx(2 / 3)
    assert m.f1 == pytest.approx(2 / 3)
    assert m.fpr == pytest.approx(1 / 3)
    assert (m.n, m.n_fake, m.n_real) == (6, 3, 3)


def test_auc_and_average_precision_by_hand():
    # Fakes beat reals in 1 + 3 + 3 of 9 pairs.
    assert roc_auc(LABELS, SCORES) == pytest.approx(7 / 9)
    # Precision at each recall step: 1 (R 1/3), 1 (R 2/3), 3/5 (R 1).
    assert average_precision(LABELS, SCORES) == pytest.approx((1 + 1 + 3 / 5) / 3)
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts one half
    assert roc_auc([1, 1], [0.2, 0.3]) is None  # one class: undefined, not 0.5


def test_roc_curve_points_by_hand():
    fpr, tpr, thr = roc_curve(LABELS, SCORES)
    assert np.allclose(fpr, [0, 0, 0, 1 / 3, 2 / 3, 2 / 3, 1])
    assert np.allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 1, 1])
    assert thr[0] == np.inf and np.allclose(thr[1:], [0.9, 0.8, 0.7, 0.4, 0.35, 0.1])
    # The trapezoid under these points is the rank AUC.
    assert np.trapezoid(tpr, fpr) == pytest.approx(7 / 9)


def test_threshold_at_target_fpr():
    t0 = threshold_at_fpr(LABELS, SCORES, 0.0)
    assert 0.7 < t0 < 0.8 and binary_metrics(LABELS, SCORES, t0).fpr == 0.0
    t1 = threshold_at_fpr(LABELS, SCORES, 0.34)  # one real in three may pass
    m = binary_metrics(LABELS, SCORES, t1)
    assert 0.4 < t1 < 0.7 and m.fpr == pytest.approx(1 / 3) and m.recall == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="real"):
        threshold_at_fpr([1, 1], [0.3, 0.4], 0.1)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        binary_metrics([0, 2], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError):
        roc_auc([0, 1], [0.1, float("nan")])


def test_plots_are_png():
    for png in (roc_png(LABELS, SCORES), histogram_png(SCORES, LABELS, threshold=0.5),
                histogram_png(SCORES)):
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
