"""The demo media generators: encoding, Ken Burns clips, face swaps and the demo archive."""

from __future__ import annotations

import csv
import struct
import time
from pathlib import Path

import ffmpeg
import numpy as np
import pytest
import retinaface

from deepaudit.pipeline.demo_media import (
    blend_face,
    build_demo_archive,
    encode_clip,
    face_photos,
    ken_burns_frames,
    make_test_clip,
    no_face_photos,
)


def _gradient_frames(n: int, size: tuple[int, int] = (160, 120)) -> list[np.ndarray]:
    w, h = size
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    return [np.broadcast_to((ramp + 7 * i) % 256, (h, w, 3)).astype(np.uint8) for i in range(n)]


def _top_level_atoms(path: Path) -> list[str]:
    """The types of an MP4's top-level boxes, in file order."""
    atoms, data, pos = [], path.read_bytes(), 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if size == 1:  # 64-bit size follows the type
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
        atoms.append(kind.decode("latin-1"))
        if size < 8:
            break
        pos += size
    return atoms


def _frame_at(path: Path, seconds: float) -> np.ndarray:
    info = next(s for s in ffmpeg.probe(str(path))["streams"] if s["codec_type"] == "video")
    out, _ = (ffmpeg.input(str(path), ss=seconds)
              .output("pipe:", vframes=1, format="rawvideo", pix_fmt="rgb24")
              .run(capture_stdout=True, quiet=True))
    return np.frombuffer(out, np.uint8).reshape(info["height"], info["width"], 3)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return build_demo_archive(tmp_path_factory.mktemp("demo"), seconds=2.0)


@pytest.mark.parametrize(("codec", "name"), [("libx264", "h264"), ("mpeg4", "mpeg4")])
def test_encode_clip_probes_to_request(tmp_path, codec, name):
    path = encode_clip(_gradient_frames(30), tmp_path / f"{codec}.mp4", fps=25, codec=codec)
    info = ffmpeg.probe(str(path))
    video = next(s for s in info["streams"] if s["codec_type"] == "video")
    assert (video["codec_name"], video["width"], video["height"]) == (name, 160, 120)
    assert video["pix_fmt"] == "yuv420p"
    assert abs(float(info["format"]["duration"]) - 1.2) <= 0.1


@pytest.mark.parametrize("faststart", [False, True])
def test_moov_position_follows_faststart(tmp_path, faststart):
    path = encode_clip(_gradient_frames(10), tmp_path / "clip.mp4", faststart=faststart)
    atoms = _top_level_atoms(path)
    assert "moov" in atoms and "mdat" in atoms
    assert (atoms.index("moov") < atoms.index("mdat")) == faststart


def test_encode_clip_errors(tmp_path):
    with pytest.raises(ValueError, match="even"):
        encode_clip(_gradient_frames(2, (161, 120)), tmp_path / "odd.mp4")
    with pytest.raises(ValueError, match="differs"):
        encode_clip([*_gradient_frames(2), *_gradient_frames(1, (80, 60))], tmp_path / "mixed.mp4")
    with pytest.raises(RuntimeError, match="ffmpeg failed"):
        encode_clip(_gradient_frames(2), tmp_path / "bad.mp4", codec="no-such-encoder")
    assert not (tmp_path / "bad.mp4").exists() and not (tmp_path / "mixed.mp4").exists()


def test_ken_burns_is_deterministic_and_moves():
    photo = face_photos()["astronaut"]
    a = list(ken_burns_frames(photo, 0.4, size=(160, 90), seed=3))
    b = list(ken_burns_frames(photo, 0.4, size=(160, 90), seed=3))
    assert len(a) == 10 and a[0].shape == (90, 160, 3) and a[0].dtype == np.uint8
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert np.abs(a[0].astype(int) - a[-1].astype(int)).mean() > 1.0
    cat = list(ken_burns_frames(no_face_photos()["chelsea"], 0.2, size=(160, 90)))
    assert len(cat) == 5 and min(f.mean() for f in cat) > 20  # the photo, not black bars


def test_blend_face_changes_the_face_only():
    photos = face_photos()
    target = photos["astronaut"]
    fake = blend_face(target, photos["grace_hopper"])
    assert fake.shape == target.shape and fake.dtype == np.uint8
    (face,) = retinaface.detect_faces(target)
    diff = np.abs(fake.astype(int) - target.astype(int)).mean(axis=2)
    inner = diff[face.y:face.y + face.height, face.x:face.x + face.width]
    assert inner.mean() > 10
    for corner in (diff[:64, :64], diff[:64, -64:], diff[-64:, :64], diff[-64:, -64:]):
        assert corner.max() <= 1


def test_blend_face_needs_faces():
    photos, cat = face_photos(), no_face_photos()["chelsea"]
    with pytest.raises(ValueError, match="target"):
        blend_face(cat, photos["astronaut"])
    with pytest.raises(ValueError, match="source"):
        blend_face(photos["astronaut"], cat)


def test_make_test_clip(tmp_path):
    path = make_test_clip(tmp_path / "t.mp4", seconds=0.4, face="cameraman")
    video = ffmpeg.probe(str(path))["streams"][0]
    assert (video["width"], video["height"], int(video["nb_frames"])) == (320, 240, 10)


@pytest.mark.parametrize("media_id", ["real/astronaut.mp4", "fake/grace_hopper_swap_astronaut.mp4",
                                      "fake/cameraman_swap_astronaut.mp4"])
def test_demo_clips_show_one_confident_face(archive, media_id):
    frame = _frame_at(archive.parent / media_id, 1.0)
    faces = retinaface.detect_faces(frame)
    assert len(faces) == 1 and faces[0].score > 0.9
    assert 0.25 <= faces[0].height / frame.shape[0] <= 0.5


def test_demo_archive_manifest(archive):
    with archive.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["uri", "media_id", "label", "kind", "note"]
    for r in rows:
        uri = Path(r["uri"])
        assert uri.is_absolute() and uri.is_file() and uri == archive.parent / r["media_id"]
        folder = r["media_id"].split("/")[0]
        assert r["label"] == {"real": "real", "fake": "fake"}.get(folder, "")
        assert r["kind"] == ("video" if uri.suffix == ".mp4" else "image")
    kinds = sorted((r["media_id"].split("/")[0], r["kind"]) for r in rows)
    assert kinds == sorted([("real", "video")] * 3 + [("real", "image")] * 2
                           + [("fake", "video")] * 3 + [("fake", "image")]
                           + [("noface", "video"), ("noface", "image")]
                           + [("broken", "video")] * 2)
    for r in rows:
        if r["media_id"].startswith("broken/"):
            with pytest.raises(ffmpeg.Error):
                ffmpeg.probe(r["uri"])
    assert not retinaface.detect_faces(_frame_at(archive.parent / "noface/chelsea_coffee.mp4", 0.5))


def test_demo_archive_is_idempotent(archive):
    files = sorted(p for p in archive.parent.rglob("*") if p.is_file())
    mtimes = [p.stat().st_mtime_ns for p in files]
    t0 = time.perf_counter()
    again = build_demo_archive(archive.parent, seconds=2.0)
    assert time.perf_counter() - t0 < 1.0
    assert again == archive
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    assert sorted(p for p in archive.parent.rglob("*") if p.is_file()) == files
