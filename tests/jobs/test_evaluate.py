"""``deepaudit evaluate``: a real (tiny) audit, metrics that agree with models.metrics on the
verdicts, unscored items counted, plots written, and --calibrate writing the card."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepaudit.jobs.cli import app
from deepaudit.models.metrics import binary_metrics, threshold_at_fpr
from deepaudit.pipeline.evaluation import EvalConfig, compute_metrics, run_evaluate

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})


def _manifest(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["uri", "label", "group"])
        w.writeheader()
        w.writerows(rows)
    return path


def _row(media_id, label, status="ok", p=None, media_type="image", group="g", error=None):
    return {"media_id": media_id, "uri": f"/{media_id}", "label": label, "status": status,
            "p_fake": p, "media_type": media_type, "group": group, "error": error}


def test_compute_metrics_by_hand():
    rows = [_row("a", "fake", p=0.9, group="x"), _row("b", "real", p=0.2, group="x"),
            _row("c", "1", p=0.4, media_type="video", group="y"),
            _row("d", "0", p=0.7, media_type="video", group="y"),
            _row("e", "real", status="no_face", error="no_face: none", group="y"),
            _row("f", "fake", status="error", error="not_media: bad", group="x"),
            _row("g", "maybe", p=0.5), _row("h", None, p=0.5)]
    m = compute_metrics(rows, threshold=0.5, group_column="group")
    c = m["counts"]
    assert (c["items"], c["labelled"], c["unlabelled"]) == (8, 6, 2)
    assert (c["scored"], c["unscored"]) == (4, 2)
    assert c["coverage"] == pytest.approx(4 / 6)
    assert c["by_label"] == {"real": {"ok": 2, "no_face": 1}, "fake": {"ok": 2, "error": 1}}
    assert c["unscored_codes"] == {"no_face": 1, "not_media": 1}
    o = m["overall"]
    # predicted fake: a (F, tp), d (R, fp); c (F) missed; b (R) tn.
    assert (o["tp"], o["fp"], o["tn"], o["fn"]) == (1, 1, 1, 1)
    assert o["roc_auc"] == pytest.approx(0.75)  # fakes 0.9, 0.4 vs reals 0.2, 0.7: 3 of 4
    assert m["by_media_type"]["video"]["n"] == 2 and m["by_media_type"]["image"]["accuracy"] == 1.0
    assert m["by_group"]["x"]["labelled"] == 3 and m["by_group"]["x"]["scored"] == 2
    assert m["by_group"]["x"]["metrics"]["n"] == 2
    assert m["by_group"]["y"]["scored"] == 2 and m["by_group"]["y"]["labelled"] == 3
    assert {u["media_id"] for u in m["unscored_items"]} == {"e", "f"}


def test_youden_threshold_by_hand():
    from deepaudit.models.metrics import threshold_max_youden

    # Scores 0.9 F, 0.8 F, 0.7 R, 0.4 R, 0.35 F, 0.1 R: J = TPR - FPR peaks (2/3) at 0.8.
    labels, scores = [0, 0, 1, 1, 0, 1], [0.1, 0.4, 0.35, 0.8, 0.7, 0.9]
    assert threshold_max_youden(labels, scores) == pytest.approx(0.8)
    assert threshold_max_youden([0, 1], [0.6, 0.61]) == pytest.approx(0.61)
    assert threshold_max_youden([1, 1], [0.2, 0.3]) is None


def test_calibrate_refuses_registered_names_and_unlabelled_manifests(tmp_path):
    m = _manifest(tmp_path / "m.csv", [{"uri": "/a.jpg", "label": "real", "group": "g"}])
    with pytest.raises(ValueError, match="card"):
        run_evaluate(EvalConfig.build(str(m), str(tmp_path / "o"), model="resnext_lstm_tiny",
                                calibrate=True))
    result = runner.invoke(app, ["evaluate", str(m), "-o", str(tmp_path / "o"), "--calibrate"])
    assert result.exit_code == 2 and "card" in result.output
    (tmp_path / "n.csv").write_text("uri\n/a.jpg\n")
    with pytest.raises(ValueError, match="label"):
        run_evaluate(EvalConfig.build(str(tmp_path / "n.csv"), str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()  # refused before any audit


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_evaluate_runs_the_audit_and_calibrates_the_card(ray_local, tiny_card, media, tmp_path):
    card = tiny_card
    rows = [
        {"uri": str(media["face_image"]), "label": "real", "group": "g1"},
        {"uri": str(media["face_png"]), "label": "fake", "group": "g2"},
        {"uri": str(media["face_video"]), "label": "fake", "group": "g1"},
        {"uri": str(media["face_video_2"]), "label": "real", "group": "g2"},
        {"uri": str(media["odd_codec"]), "label": "real", "group": "g1"},
        {"uri": str(media["no_face_image"]), "label": "real", "group": "g2"},
        {"uri": str(media["not_media"]), "label": "fake", "group": "g1"},
        {"uri": str(media["face_video"]) + "?", "label": "", "group": "g2"},
    ]
    manifest = _manifest(tmp_path / "val.csv", rows)
    out = tmp_path / "eval"
    result = run_evaluate(EvalConfig.build(str(manifest), str(out), model=str(card),
                                           calibrate=True, target_fpr=0.0, frames=4))

    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["overall"] == result["overall"] and on_disk["model"].startswith("resnext_lstm")
    c = result["counts"]
    assert (c["items"], c["labelled"], c["unlabelled"], c["scored"]) == (8, 7, 1, 5)
    assert c["unscored_codes"] == {"no_face": 1, "not_media": 1}
    assert c["by_label"]["real"] == {"ok": 3, "no_face": 1}

    # The figures are models.metrics' on the audit's own verdict rows.
    from deepaudit.pipeline.writer import read_verdicts

    verdicts = read_verdicts(result["audit_run"]).to_pylist()
    scored = [v for v in verdicts if v["status"] == "ok" and v["label"] in ("real", "fake")]
    labels = [int(v["label"] == "fake") for v in scored]
    scores = [v["p_fake"] for v in scored]
    assert result["overall"] == binary_metrics(labels, scores, 0.5).to_dict()
    assert result["by_group"]["g1"]["labelled"] == 4 and result["by_group"]["g1"]["scored"] == 3
    assert set(result["by_media_type"]) == {"image", "video"}
    for name in ("roc.png", "hist.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    cal = result["calibration"]
    assert cal["threshold"] == pytest.approx(threshold_at_fpr(labels, scores, 0.0))
    assert cal["achieved_fpr"] == 0.0 and cal["previous_threshold"] == pytest.approx(0.5)
    written = json.loads(card.read_text())
    assert written["config"]["threshold"] == pytest.approx(cal["threshold"])
    assert written["calibration"]["target_fpr"] == 0.0

    from deepaudit.models.checkpoint import resolve_model

    handle = resolve_model(card)  # the card changed, the weights did not: still loads
    assert handle.config.threshold == pytest.approx(cal["threshold"])
    handle.load()
