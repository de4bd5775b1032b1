"""Robustness checks: the perturbations themselves, AUC per perturbation by hand, and
``deepaudit evaluate --perturb`` end to end on a real (tiny) audit."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from deepaudit.jobs.cli import app
from deepaudit.models.perturb import Perturbation, apply_perturbation, parse_perturbations
from deepaudit.pipeline.evaluation import robustness

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_parse_perturbations_and_refusals():
    got = parse_perturbations("jpeg:50, resize:0.5,blur:1.5,jpeg:50,noise:8")
    assert [p.name for p in got] == ["none", "jpeg:50", "resize:0.5", "blur:1.5", "noise:8"]
    assert parse_perturbations(None) == [Perturbation("none")]
    for bad, msg in (("jpeg:0", "1-100"), ("resize:1.5", "between 0 and 1"),
                     ("sharpen:2", "unknown perturbation"), ("jpeg", "needs a value"),
                     ("blur:x", "not a number")):
        with pytest.raises(ValueError, match=msg):
            parse_perturbations(bad)


def test_perturbations_change_the_crop_as_named():
    import cv2
    from skimage import data

    img = cv2.resize(data.astronaut(), (128, 128), interpolation=cv2.INTER_AREA)
    assert apply_perturbation(img, Perturbation("none")) is img
    q10 = apply_perturbation(img, Perturbation("jpeg", 10))
    q95 = apply_perturbation(img, Perturbation("jpeg", 95))
    assert q10.shape == img.shape and q10.dtype == np.uint8
    assert _psnr(img, q10) < _psnr(img, q95) and _psnr(img, q95) > 30
    # Colour survives a re-encode in RGB order (a BGR/RGB mix-up turns the red suit blue).
    assert abs(float(q95[..., 0].mean()) - float(img[..., 0].mean())) < 3
    half = apply_perturbation(img, Perturbation("resize", 0.5))
    assert half.shape == img.shape and 20 < _psnr(img, half) < 40
    blurred = apply_perturbation(img, Perturbation("blur", 1.5))
    assert np.abs(np.diff(blurred.astype(float), axis=1)).mean() < \
        np.abs(np.diff(img.astype(float), axis=1)).mean()
    n1, n2 = (apply_perturbation(img, Perturbation("noise", 8)) for _ in range(2))
    assert np.array_equal(n1, n2) and 25 < _psnr(img, n1) < 35


def _row(mid: str, label: str, p: float | None, status: str = "ok") -> dict:
    return {"media_id": mid, "label": label, "p_fake": p, "status": status}


def test_robustness_by_hand():
    base = [_row("a", "real", 0.1), _row("b", "real", 0.4), _row("c", "fake", 0.35),
            _row("d", "fake", 0.8), _row("e", "fake", None, "no_face")]
    jpeg = [_row("a", "real", 0.1), _row("b", "real", 0.2), _row("c", "fake", 0.6),
            _row("d", "fake", 0.7), _row("e", "fake", 0.9)]
    out = robustness({"none": base, "jpeg:50": jpeg}, threshold=0.5)
    assert out["items"] == 4  # e is not scored in the baseline: left out of both
    b, j = out["by_perturbation"]["none"], out["by_perturbation"]["jpeg:50"]
    # Baseline: fakes 0.35, 0.8 against reals 0.1, 0.4: 3 of 4 pairs ordered right.
    assert b["roc_auc"] == pytest.approx(0.75) and b["delta_auc"] == 0
    assert (b["recall"], b["fpr"]) == (0.5, 0.0)
    assert j["roc_auc"] == pytest.approx(1.0) and j["delta_auc"] == pytest.approx(0.25)
    assert (j["recall"], j["fpr"]) == (1.0, 0.0)


@pytest.mark.ray
@pytest.mark.slow
def test_evaluate_perturb_end_to_end(ray_local, tiny_card, media, tmp_path):
    card = tiny_card
    manifest = tmp_path / "val.csv"
    with manifest.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["uri", "label"])
        w.writeheader()
        w.writerows([{"uri": str(media["face_image"]), "label": "real"},
                     {"uri": str(media["face_png"]), "label": "fake"},
                     {"uri": str(media["face_video"]), "label": "fake"},
                     {"uri": str(media["face_video_2"]), "label": "real"}])
    out = tmp_path / "eval"
    res = runner.invoke(app, ["evaluate", str(manifest), "-o", str(out), "--model", str(card),
                              "--frames", "4", "--perturb", "jpeg:20,blur:2",
                              "--record-out-of-domain"])
    assert res.exit_code == 0, res.output
    assert "robustness" in res.output and "jpeg:20" in res.output
    rob = json.loads((out / "metrics.json").read_text())["robustness"]
    assert rob["items"] == 4 and set(rob["by_perturbation"]) == {"none", "jpeg:20", "blur:2"}
    from deepaudit.pipeline.writer import read_verdicts

    runs = rob["runs"]
    assert runs["jpeg:20"].startswith(str(out / "audit-jpeg-20"))
    base = {r["media_id"]: r["p_fake"] for r in read_verdicts(runs["none"]).to_pylist()}
    jpeg = {r["media_id"]: r["p_fake"] for r in read_verdicts(runs["jpeg:20"]).to_pylist()}
    assert len(base) == 4 and base.keys() == jpeg.keys()
    assert any(base[k] != jpeg[k] for k in base)  # the crops really were re-encoded
    # The card now carries the measurement, and every verdict surface quotes it.
    from deepaudit.models.checkpoint import resolve_model

    ood = json.loads(card.read_text())["metrics"]["out_of_domain"]
    assert ood["data"] == str(manifest) and ood["roc_auc"] == rob["by_perturbation"]["none"][
        "roc_auc"]
    assert set(ood["robustness"]) == {"none", "jpeg:20", "blur:2"} and "image_roc_auc" in ood
    quality = resolve_model(card).quality
    assert quality["ood_auc"] == ood["roc_auc"]
    bad = runner.invoke(app, ["evaluate", str(manifest), "-o", str(out / "x"), "--perturb",
                              "jpeg:0"])
    assert bad.exit_code == 2 and "1-100" in bad.output
