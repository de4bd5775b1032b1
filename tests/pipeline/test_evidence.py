"""Evidence for flagged media: safe paths for hostile ids, the PNG strip, the classifier
stage writing it only for flagged rows (under a cap), on local disk, S3 and in an audit."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepaudit.infra.storage import StorageConfig
from deepaudit.models.checkpoint import resolve_model
from deepaudit.models.face_detector import FaceDetectorConfig
from deepaudit.pipeline.audit import AuditConfig, evidence_config, run_audit
from deepaudit.pipeline.evidence import (
    EvidenceConfig,
    EvidenceWriter,
    evidence_dirname,
    mask_stats,
    per_actor_cap,
    render_strip,
    safe_filename,
    suspect_mask,
    top_frames,
)
from deepaudit.pipeline.media import DecodeConfig
from deepaudit.pipeline.plan import StagePlan
from deepaudit.pipeline.stages import ClassifyConfig, ClassifyStage, CropConfig, DecodeCropStage
from deepaudit.pipeline.writer import read_verdicts

HOSTILE = [
    "../../x", "..", ".", "/abs/path", "/", "a/b\\c", "a/b", "a_b", "a\\b", "x" * 1000,
    "y" * 999 + "/", "nul\x00byte", "new\nline", "\r\n\t", "", "   ", "-rf", ".hidden",
    "caf\udce9",  # non-UTF-8 byte 0xe9 as os.fsdecode gives it (surrogateescape)
    "café", "日本語の動画.mp4", "s3://bucket/../../etc/passwd", "C:\\Windows\\system32",
    "%2e%2e%2fx", "con", "a" * 48 + "-" + "0" * 16,
]
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def test_hostile_ids_get_distinct_safe_folder_names():
    names = [evidence_dirname(i) for i in HOSTILE]
    assert len(set(names)) == len(HOSTILE)  # "a/b", "a_b" and "a\\b" do not collide
    for raw, name in zip(HOSTILE, names):
        assert SAFE_NAME.match(name), (raw, name)
        assert len(name) <= 48 + 1 + 16
        assert evidence_dirname(raw) == name  # stable
    assert names[HOSTILE.index("x" * 1000)].startswith("x" * 48 + "-")
    # Raw bytes and their surrogate-escaped str name the same folder; other bytes differ.
    assert evidence_dirname(b"caf\xe9") == evidence_dirname("caf\udce9")
    assert evidence_dirname(b"caf\xe9") != evidence_dirname("café")
    assert evidence_dirname(b"\xff\xfe\x00") != evidence_dirname(b"\xff\xfe")
    # Readable when the id is: the file name survives.
    assert evidence_dirname("videos/real/clip 01.mp4").startswith("clip_01.mp4-")
    # One rule, whatever the id's length: the file name, then the hash.
    assert evidence_dirname("data/images/real/" + "n" * 60 + ".jpg").startswith(
        "n" * 44 + ".jpg-")
    assert safe_filename("20260101T000000Z-abc123") == "20260101T000000Z-abc123"
    assert SAFE_NAME.match(safe_filename("../../run"))


def test_writer_never_leaves_its_root(tmp_path):
    root = tmp_path / "out" / "evidence"
    w = EvidenceWriter(str(root))
    for i, mid in enumerate(HOSTILE + [b"\xff\xfe/../../bytes"]):
        uri = w.write(mid, "../../evil name.png", f"item {i}".encode())
        path = Path(uri)
        assert path.parent.parent == root and path.read_bytes() == f"item {i}".encode()
        assert SAFE_NAME.match(path.name) and SAFE_NAME.match(path.parent.name)
    everything = [p for p in tmp_path.rglob("*")]
    assert all(p == tmp_path / "out" or root in (p, *p.parents) for p in everything)
    assert len(list(root.iterdir())) == len(HOSTILE) + 1


@pytest.mark.s3
def test_writer_on_s3(s3_server, s3fs_client):
    w = EvidenceWriter("s3://audit/ev-out/evidence", StorageConfig(endpoint_url=s3_server))
    uris = [w.write(mid, "r1.png", b"png") for mid in ("../../x", "/abs/path", "a/b\\c")]
    assert all(u.startswith("s3://audit/ev-out/evidence/") for u in uris)
    keys = s3fs_client.find("audit/ev-out")
    assert len(keys) == 3 and all(k.count("/") == 4 for k in keys), keys
    assert s3fs_client.cat(uris[0]) == b"png"


def test_mask_threshold_and_stats():
    heat = np.zeros((8, 8), np.float32)
    heat[2:4, 5:7] = 1.0
    heat[6, 0] = 0.49
    mask = suspect_mask(heat, 0.5)
    assert mask.sum() == 4 and not mask[6, 0]
    assert mask_stats(mask) == {"mask_area": 4 / 64, "mask_box": [5, 2, 6, 3]}
    assert not suspect_mask(np.zeros((4, 4))).any()  # nothing raised the score: no region
    assert mask_stats(suspect_mask(np.zeros((4, 4)))) == {"mask_area": 0.0, "mask_box": None}
    assert top_frames([0.1, 0.9, 0.5, 0.9], 3) == [1, 3, 2]
    assert top_frames([0.3], 3) == [0]


def test_render_strip_layout_and_mask_panel():
    k, size = 2, 200  # >= the 192 px minimum panel: drawn at native size
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (k, size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    video = np.stack([np.exp(-((xx - 150) ** 2 + (yy - 50) ** 2) / 800.0)] * k).astype(np.float32)
    frame = video[:, ::-1].copy()
    png = render_strip(crops, video, frame, [12, 40], [0.91, 0.88], "FAKE p=0.93 <id>")
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    gap, top = 4, 30 + 22
    assert img.shape == (top + k * (size + gap) + gap, 4 * size + 5 * gap, 3)
    for r in range(k):
        y = top + r * (size + gap)
        panels = [img[y : y + size, gap + c * (size + gap) : gap + c * (size + gap) + size]
                  for c in range(4)]
        # Column 1 is the crop itself (above the label box), in RGB order once decoded.
        np.testing.assert_array_equal(panels[0][:150, :, ::-1], crops[r][:150])
        # Column 4 is exactly the thresholded video map, white on black.
        np.testing.assert_array_equal(panels[3][:, :, 0] > 127, video[r] >= 0.5)
        # The overlays differ from the crop, and from each other (different maps).
        assert np.abs(panels[1].astype(int) - panels[0]).mean() > 10
        assert np.abs(panels[1].astype(int) - panels[2]).mean() > 5
    with pytest.raises(ValueError):
        render_strip(crops, video[:1], frame, [1, 2], [0.5, 0.5], "x")


def test_evidence_config_from_audit_options(tmp_path):
    plan = StagePlan(1, 0.5, 3, 0.5, 0.0, 4, 1)
    ev = evidence_config(AuditConfig(manifest="m.csv", output=str(tmp_path / "o"),
                                     evidence_max=10), plan, "run1")
    assert ev.max_items == 4 == per_actor_cap(10, 3)  # ceil(10 / 3)
    assert ev.root == str(tmp_path / "o" / "evidence") and ev.run_id == "run1"
    rel = evidence_config(AuditConfig(manifest="m", output="rel"), plan, "r")
    assert Path(rel.root).is_absolute()
    assert evidence_config(AuditConfig(manifest="m", output="o", evidence=False), plan, "r") is None
    assert evidence_config(AuditConfig(manifest="m", output="o", evidence_max=0), plan, "r") is None
    with pytest.raises(ValueError):
        evidence_config(AuditConfig(manifest="m", output="o", evidence_max=-1), plan, "r")
    with pytest.raises(ValueError):
        EvidenceConfig(root="x", run_id="r", top_k=0)


# ----------------------------------------------------------- the classifier stage, in-process


@pytest.fixture(scope="module")
def crop_table(media, tiny_model):
    handle = resolve_model(str(tiny_model))
    stage = DecodeCropStage(DecodeConfig(frames=6), FaceDetectorConfig(),
                            CropConfig(size=handle.config.input_size), StorageConfig())
    names = ["face_image", "face_video", "face_png", "face_video_2", "not_media"]
    return stage(pa.table({
        "manifest_row": pa.array(range(len(names)), pa.int64()),
        "media_id": names,
        "uri": [str(media[n]) for n in names],
    }))


def _classify(tiny_model, table, threshold, evidence=None):
    handle = resolve_model(str(tiny_model)).with_threshold(threshold)
    return ClassifyStage(handle, ClassifyConfig(device="cpu"), evidence)(table).to_pylist()


def test_stage_writes_evidence_only_for_flagged_rows(tiny_model, crop_table, tmp_path):
    plain = _classify(tiny_model, crop_table, 0.5)
    scores = sorted(r["p_fake"] for r in plain if r["p_fake"] is not None)
    assert len(scores) == 4 and len(set(scores)) == 4
    threshold = (scores[1] + scores[2]) / 2  # two fake, two real
    root = tmp_path / "evidence"
    ev = EvidenceConfig(root=str(root), run_id="run-1", top_k=2)
    rows = _classify(tiny_model, crop_table, threshold, ev)
    assert [r["p_fake"] for r in rows] == [r["p_fake"] for r in plain]  # scores untouched
    fakes = [r for r in rows if r["verdict"] == "fake"]
    assert len(fakes) == 2
    areas = []
    for r in rows:
        if r["verdict"] != "fake":
            assert r["evidence"] is None, r["media_id"]
            continue
        png = Path(r["evidence"])
        assert png.parent.parent == root and png.name == "run-1.png"
        assert png.parent.name == evidence_dirname(r["media_id"])
        img = cv2.imread(str(png))
        k = min(2, r["n_frames_with_face"])
        assert img.shape[0] == 52 + k * (192 + 4) + 4  # one row per explained frame
        meta = json.loads(png.with_suffix(".json").read_text())
        assert meta["media_id"] == r["media_id"] and meta["strip"] == r["evidence"]
        best = top_frames(r["frame_p_fake"], 2)
        assert [f["frame_index"] for f in meta["frames"]] == [r["frame_indices"][p] for p in best]
        assert all(0.0 <= f["mask_area"] < 1.0 for f in meta["frames"])
        areas.extend(f["mask_area"] for f in meta["frames"])
    assert max(areas) > 0.0  # some suspect region was found


def test_stage_cap_and_normal_path(tiny_model, crop_table, tmp_path, monkeypatch):
    ev = EvidenceConfig(root=str(tmp_path / "ev"), run_id="r", max_items=1)
    rows = _classify(tiny_model, crop_table, 0.01, ev)  # every scored row is flagged
    assert sum(r["verdict"] == "fake" for r in rows) == 4
    assert sum(r["evidence"] is not None for r in rows) == 1
    # Nothing flagged: Grad-CAM is never called.
    import deepaudit.models.gradcam as gradcam

    calls = []

    def boom(*a, **k):
        calls.append(a)
        raise RuntimeError("Grad-CAM failed")

    monkeypatch.setattr(gradcam, "explain_from_features", boom)
    rows = _classify(tiny_model, crop_table, 0.99, EvidenceConfig(root=str(tmp_path / "e2"),
                                                                 run_id="r"))
    assert all(r["verdict"] in ("real", None) and r["evidence"] is None for r in rows)
    assert calls == []
    # A failing evidence step keeps the verdicts and leaves evidence null.
    rows = _classify(tiny_model, crop_table, 0.01, EvidenceConfig(root=str(tmp_path / "e3"),
                                                                 run_id="r"))
    assert len(calls) == 1 and sum(r["verdict"] == "fake" for r in rows) == 4
    assert all(r["evidence"] is None for r in rows) and not (tmp_path / "e3").exists()


def test_stage_calls_in_threads_match_sequential_calls_and_share_the_cap(tiny_model, crop_table,
                                                                         tmp_path):
    """CPU plans run several calls at once in one classifier actor (threads): scores must
    not depend on it, and the evidence cap holds across the threads."""
    from concurrent.futures import ThreadPoolExecutor

    handle = resolve_model(str(tiny_model)).with_threshold(0.01)
    ev = EvidenceConfig(root=str(tmp_path / "ev"), run_id="r", max_items=2, top_k=1)
    stage = ClassifyStage(handle, ClassifyConfig(device="cpu", threads=1, crop_batch=4), ev)
    slices = [crop_table.slice(i, 1) for i in range(crop_table.num_rows)] * 3
    sequential = [ClassifyStage(handle, ClassifyConfig(device="cpu", threads=1, crop_batch=4))(t)
                  .to_pylist()[0] for t in slices]
    with ThreadPoolExecutor(4) as pool:
        threaded = [t.to_pylist()[0] for t in pool.map(stage, slices)]
    for a, b in zip(sequential, threaded):
        assert a["status"] == b["status"] and a["verdict"] == b["verdict"]
        if a["p_fake"] is not None:
            assert b["p_fake"] == pytest.approx(a["p_fake"], abs=1e-6)
            assert b["frame_p_fake"] == pytest.approx(a["frame_p_fake"], abs=1e-6)
    assert sum(r["verdict"] == "fake" for r in threaded) == 12
    assert sum(r["evidence"] is not None for r in threaded) == 2 == stage.evidence.written


# ------------------------------------------------------------------------ the audit, on Ray


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_audit_writes_evidence_for_flagged_items_with_hostile_ids(ray_local, tiny_model, media,
                                                                   tmp_path):
    ids = ["../../etc/passwd", "/abs/path.mp4", "a/b\\c", "nul\x00and\nnewline", "z" * 1000,
           "<b>bold</b>"]
    names = ["face_image", "face_png", "face_video", "face_image", "face_png", "not_media"]
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": [str(media[n]) for n in names], "media_id": ids}), manifest)
    out = tmp_path / "out"
    summary = run_audit(AuditConfig(manifest=str(manifest), output=str(out), model=str(tiny_model),
                                    threshold=0.01, frames=3, classify_actors=1, evidence_max=3))
    rows = {r["media_id"]: r for r in read_verdicts(summary["output"]).to_pylist()}
    assert set(rows) == set(ids)
    flagged = [r for r in rows.values() if r["verdict"] == "fake"]
    with_evidence = [r for r in flagged if r["evidence"]]
    assert len(flagged) == 5 and len(with_evidence) == 3  # one actor, cap 3
    assert summary["evidence"] == {
        "enabled": True, "dir": str(out / "evidence"), "max": 3, "per_actor_max": 3,
        "frames": 3, "written": 3, "flagged_without_evidence": 2,
    }
    for r in with_evidence:
        png = Path(r["evidence"])
        assert png.is_file() and png.parent.parent == out / "evidence"
        assert png.name == f"{summary['run_id']}.png"
        assert cv2.imread(str(png)) is not None
    assert rows["<b>bold</b>"]["evidence"] is None  # not media: no verdict, no evidence
    # Nothing was written outside OUT/evidence and OUT/runs.
    assert {p.name for p in out.iterdir()} == {"evidence", "runs", "_summary.json"}
    assert not (tmp_path / "etc").exists() and not Path("/abs/path.mp4").exists()


def test_strip_header_keeps_verdict_and_score_first():
    """A long path is shortened from its middle; the verdict and score always show."""
    from deepaudit.pipeline.evidence import _ascii, strip_title

    long_id = "s3://archive/" + "deep/" * 60 + "interview_2026-03-01_cam7.mp4"
    title = strip_title("fake", 0.91234, 0.5, long_id, 95)
    assert title.startswith("FAKE p=0.912 (threshold 0.5)  s3://")
    assert title.endswith("interview_2026-03-01_cam7.mp4") and "..." in title
    assert len(_ascii(title, 95)) <= 95 and _ascii(title, 95) == title
    assert strip_title("fake", 0.5, 0.5, "a.mp4", 95) == "FAKE p=0.500 (threshold 0.5)  a.mp4"


def test_drop_staging_survives_a_worker_still_writing(tmp_path, monkeypatch, caplog):
    """A SIGKILLed run's classifier can outlive its driver for a moment and keep writing
    into staging; settling that run must not fail the next audit."""
    import shutil

    from deepaudit.pipeline.evidence import drop_staging

    staging = tmp_path / "evidence" / "_staging" / "run1"
    staging.mkdir(parents=True)
    (staging / "x.png").write_bytes(b"png")

    def busy(path, *a, **k):
        raise OSError(39, "Directory not empty", str(path))

    monkeypatch.setattr(shutil, "rmtree", busy)
    monkeypatch.setattr("time.sleep", lambda s: None)
    with caplog.at_level("WARNING"):
        drop_staging(str(staging))
    assert "left evidence staging" in caplog.text and staging.exists()
    monkeypatch.undo()
    drop_staging(str(staging))
    assert not staging.exists()
