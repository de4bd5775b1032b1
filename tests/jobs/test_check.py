"""``deepaudit check``: a few files, in-process, with exit codes a script can gate on."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
from typer.testing import CliRunner

from deepaudit.jobs.cli import app

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})


def _check(*args: str) -> tuple[int, dict | None, str]:
    result = runner.invoke(app, ["check", *args])
    doc = None
    if "--json" in args and result.stdout.strip():
        doc = json.loads(result.stdout)
    return result.exit_code, doc, result.output


def test_flagged_file_exits_1_with_json_and_evidence(tiny_model, media, tmp_path):
    ev = tmp_path / "ev"
    code, doc, _ = _check(str(media["face_image"]), "--model", str(tiny_model),
                          "--threshold", "0.01", "--json", "--evidence-dir", str(ev))
    assert code == 1 == doc["exit_code"]
    (f,) = doc["files"]
    assert f["file"] == str(media["face_image"]) and f["status"] == "ok"
    assert f["verdict"] == "fake" and 0.0 < f["p_fake"] < 1.0 and f["media_type"] == "image"
    assert f["n_faces"] >= 1 and f["n_frames_sampled"] == f["n_frames_with_face"] == 1
    png = Path(f["evidence"])
    assert png.is_file() and png.parent.parent == ev and cv2.imread(str(png)) is not None
    assert doc["evidence_dir"] == str(ev) and doc["flagged"] == 1 and doc["model_trained"]


def test_real_file_exits_0_and_writes_nothing(tiny_model, media, tmp_path):
    ev = tmp_path / "ev"
    code, doc, _ = _check(str(media["face_png"]), "--model", str(tiny_model),
                          "--threshold", "0.99", "--json", "--evidence-dir", str(ev))
    assert code == 0 and doc["files"][0]["verdict"] == "real"
    assert doc["files"][0]["evidence"] is None and doc["evidence_dir"] is None
    assert not ev.exists()


def test_unscorable_files_exit_3_unless_something_is_flagged(tiny_model, media, tmp_path):
    bad = [str(media["not_media"]), str(media["no_face_image"]), str(media["missing"])]
    code, doc, _ = _check(*bad, "--model", str(tiny_model), "--threshold", "0.99", "--json",
                          "--evidence-dir", str(tmp_path / "ev"))
    assert code == 3 and doc["unscored"] == 3 and doc["flagged"] == 0
    assert [f["status"] for f in doc["files"]] == ["error", "no_face", "error"]
    assert [f["error"].split(":")[0] for f in doc["files"]] == ["not_media", "no_face", "missing"]
    assert all(f["p_fake"] is None and f["verdict"] is None for f in doc["files"])
    # A flagged file wins: the gate must stop on it.
    code, doc, _ = _check(str(media["face_image"]), *bad, "--model", str(tiny_model),
                          "--threshold", "0.01", "--json", "--evidence-dir", str(tmp_path / "ev"))
    assert code == 1 and doc["flagged"] == 1 and doc["unscored"] == 3


def test_untrained_model_is_not_a_pass(media, tmp_path):
    code, doc, _ = _check(str(media["face_image"]), "--model", "resnext_lstm_tiny", "--json",
                          "--evidence-dir", str(tmp_path / "ev"))
    assert code == 3 and doc["model_trained"] is False
    assert doc["files"][0]["verdict"] is None
    assert doc["files"][0]["error"].startswith("untrained_model:")


def test_usage_errors_exit_2(tiny_model, media, tmp_path):
    assert _check()[0] == 2  # no file
    code, _, out = _check(str(media["face_image"]), "--model", "no-such-model")
    assert code == 2 and "resnext_lstm" in out
    assert _check(str(media["face_image"]), "--frames", "0")[0] == 2
    code, _, out = _check(str(media["face_image"]), "--model", str(tiny_model),
                          "--threshold", "1.5")
    assert code == 2 and "threshold" in out


def test_human_output_names_the_evidence(tiny_model, media, tmp_path):
    ev = tmp_path / "ev"
    code, _, out = _check(str(media["face_video"]), "--model", str(tiny_model), "--threshold",
                          "0.01", "--frames", "3", "--evidence-dir", str(ev))
    assert code == 1
    assert "FAKE" in out and str(media["face_video"]) in out
    assert "frames with a face 3 of 3 sampled" in out
    (png,) = ev.glob("*/*.png")
    assert f"evidence {png}" in out and "1 of 1 flagged fake" in out


@pytest.mark.shared_data
def test_shared_video_and_image(tiny_model, shared_data, tmp_path):
    video = shared_data / "videos/fake/genconvit__0017_fake.mp4"
    image = shared_data / "images/real/face_recognition__obama.jpg"
    ev = tmp_path / "ev"
    code, doc, _ = _check(str(video), str(image), "--model", str(tiny_model), "--threshold",
                          "0.01", "--json", "--evidence-dir", str(ev))
    assert code == 1 and doc["flagged"] == 2
    v, i = doc["files"]
    assert v["media_type"] == "video" and v["n_frames_sampled"] == 8  # the tiny card's frames
    assert v["n_frames_with_face"] >= 6 and v["n_faces"] >= v["n_frames_with_face"]
    assert i["media_type"] == "image" and i["n_frames_sampled"] == 1 and i["n_faces"] >= 1
    for f in (v, i):
        assert Path(f["evidence"]).is_file()
        meta = json.loads(Path(f["evidence"]).with_suffix(".json").read_text())
        assert len(meta["frames"]) == min(3, f["n_frames_with_face"])


def test_commands_and_evidence_options_are_documented():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "report" in result.output and "check" in result.output
    result = runner.invoke(app, ["audit", "--help"])
    for option in ("--evidence", "--no-evidence", "--evidence-max"):
        assert option in result.output
    result = runner.invoke(app, ["check", "--help"])
    assert "Exit code" in result.output and "--evidence-dir" in result.output
