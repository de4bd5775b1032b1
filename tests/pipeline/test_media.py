"""FFmpeg decode, RetinaFace and the CPU stage on real media, without Ray."""

from __future__ import annotations

import numpy as np
import pytest

from deepaudit.infra.storage import StorageConfig
from deepaudit.models.face_detector import FaceDetectorConfig, RetinaFaceDetector
from deepaudit.pipeline.crop import align_crop, eye_angle_deg, select_face
from deepaudit.pipeline.media import DecodeConfig, decode_frames, open_source, probe, sample_indices
from deepaudit.pipeline.stages import CropConfig, DecodeCropStage

from ..conftest import EXPECTED


def test_sample_indices_are_even_and_unique():
    assert sample_indices(100, 4) == [12, 37, 62, 87]
    assert sample_indices(3, 16) == [0, 1, 2]
    assert sample_indices(1, 16) == [0]


def test_decode_samples_exact_frames(media):
    cfg = DecodeConfig(frames=5, max_side=160)
    with open_source(str(media["face_video"]), StorageConfig(), cfg) as src:
        info = probe(src, str(media["face_video"]), cfg)
        indices, frames = decode_frames(src, info, cfg)
    assert info.media_type == "video" and info.n_frames == 50 and info.codec == "h264"
    assert indices == [5, 15, 25, 35, 45]
    assert frames.shape == (5, 120, 160, 3) and frames.dtype == np.uint8
    assert src.fingerprint.startswith(f"size={media['face_video'].stat().st_size};")
    assert "sha256=" in src.fingerprint
    # Distinct frames, not one frame repeated: the clip pans over the photo.
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 1.0


def test_seek_mode_matches_select_mode(media):
    """Long-video path (a seek per frame) returns the same frames as the select filter."""
    base = DecodeConfig(frames=3, max_side=160)
    seek = DecodeConfig(frames=3, max_side=160, seek_spacing_s=0.1)
    with open_source(str(media["face_video"]), StorageConfig(), base) as src:
        info = probe(src, "x.mp4", base)
        i1, f1 = decode_frames(src, info, base)
        i2, f2 = decode_frames(src, info, seek)
    assert i1 == i2
    assert np.abs(f1.astype(int) - f2.astype(int)).mean() < 2.0


@pytest.mark.parametrize("seek_spacing_s", [4.0, 0.1])  # select filter, seek per frame
def test_single_threaded_ffmpeg_decodes_the_same_frames(media, seek_spacing_s):
    """ffmpeg on one thread (the default, cheapest when items decode side by side) gives
    exactly the frames its automatic threading gives, on both decode paths."""
    one = DecodeConfig(frames=4, max_side=160, seek_spacing_s=seek_spacing_s)
    auto = DecodeConfig(frames=4, max_side=160, seek_spacing_s=seek_spacing_s,
                        ffmpeg_threads=0)
    assert one.ffmpeg_threads == 1
    with open_source(str(media["face_video"]), StorageConfig(), one) as src:
        info = probe(src, "x.mp4", one)
        i1, f1 = decode_frames(src, info, one)
        i2, f2 = decode_frames(src, info, auto)
    assert i1 == i2 and len(i1) == 4
    assert np.array_equal(f1, f2)
    with pytest.raises(ValueError, match="ffmpeg_threads"):
        DecodeConfig(4, ffmpeg_threads=-1)


def test_retinaface_finds_one_face_and_alignment_levels_eyes(media):
    import cv2

    det = RetinaFaceDetector(FaceDetectorConfig())
    img = cv2.cvtColor(cv2.imread(str(media["face_image"])), cv2.COLOR_BGR2RGB)
    h, w = img.shape[:2]
    rotated = cv2.warpAffine(img, cv2.getRotationMatrix2D((w / 2, h / 2), 25, 1.0), (w, h))
    faces = det.detect(rotated)[0]
    assert len(faces) == 1 and faces[0].score > 0.9
    assert abs(eye_angle_deg(faces[0])) > 15  # the face is tilted in the frame
    crop = align_crop(rotated, faces[select_face(faces)], 224)
    again = det.detect(crop)[0]
    assert crop.shape == (224, 224, 3) and len(again) == 1
    assert abs(eye_angle_deg(again[0])) < 5  # and upright in the crop
    cat = cv2.cvtColor(cv2.imread(str(media["no_face_image"])), cv2.COLOR_BGR2RGB)
    assert det.detect(cat) == [[]]


def test_small_frames_are_enlarged_for_detection_and_boxes_map_back(media):
    """A whole frame shrunk to 128 px (a ~20 px face, like FF++'s thumbnails) is enlarged
    before detection, and the box comes back in the small frame's own pixels."""
    import cv2

    img = cv2.cvtColor(cv2.imread(str(media["face_image"])), cv2.COLOR_BGR2RGB)
    h, w = img.shape[:2]
    big = cv2.copyMakeBorder(img, h // 2, h // 2, w // 2, w // 2, cv2.BORDER_CONSTANT)
    scale = 128 / max(big.shape[:2])
    small = cv2.resize(big, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    det = RetinaFaceDetector(FaceDetectorConfig())
    ref = det.detect(big)[0]
    faces = det.detect(small)[0]
    assert ref and faces, "the enlarged small frame should show its face"
    a, b = max(ref, key=lambda f: f.area), max(faces, key=lambda f: f.area)
    assert b.x2 <= small.shape[1] and b.y2 <= small.shape[0]
    for got, want in ((b.x1, a.x1), (b.y1, a.y1), (b.x2, a.x2), (b.y2, a.y2)):
        assert abs(got - want * scale) < 4  # same box, in the small frame's pixels
    unenlarged = RetinaFaceDetector(FaceDetectorConfig(min_detect_side=128))
    assert unenlarged.detect(small) == [[]]  # found only thanks to the enlarging
    with pytest.raises(ValueError, match="min_detect_side"):
        FaceDetectorConfig(min_detect_side=1000)


def test_most_prominent_face_is_the_largest_confident_one():
    from deepaudit.models.face_detector import Face

    lm = ((0, 0),) * 5
    faces = [Face(0, 0, 50, 50, 0.99, lm), Face(0, 0, 200, 200, 0.85, lm),
             Face(0, 0, 60, 60, 1.0, lm)]
    assert select_face(faces) == 1
    assert select_face([]) is None


@pytest.fixture(scope="module")
def stage():
    return DecodeCropStage(DecodeConfig(frames=4), FaceDetectorConfig(), CropConfig(size=64),
                           StorageConfig())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_cpu_stage_bad_input_matrix(stage, media, name):
    """Every good or bad input gives one row with the expected status; nothing raises."""
    row = stage.process({"manifest_row": 0, "media_id": name, "uri": str(media[name])})
    status, code = EXPECTED[name]
    assert row["status"] == status, row["error"]
    if code:
        assert row["error"].startswith(code + ":"), row["error"]
    if status == "ok":
        assert row["error"] is None
        n = row["n_frames_with_face"]
        assert n >= 1 and len(row["crops"]) == n * 64 * 64 * 3
        assert len(row["frame_indices"]) == n
        assert sum(b["selected"] for b in row["face_boxes"]) == n
    else:
        assert row["crops"] == b""


def test_cpu_stage_never_ships_frames(stage, media):
    row = stage.process({"manifest_row": 0, "media_id": "v", "uri": str(media["face_video"])})
    # 4 crops of 64x64, far smaller than one 320x240 frame would be.
    assert len(row["crops"]) == 4 * 64 * 64 * 3
    assert row["width"] == 320 and row["height"] == 240


def test_empty_uri_is_an_error_row(stage):
    row = stage.process({"manifest_row": 3, "media_id": "blank", "uri": ""})
    assert row["status"] == "error" and row["error"].startswith("bad_uri:")


@pytest.mark.s3
def test_s3_moov_at_end_decodes_through_presigned_url(stage, media, s3fs_client, s3_server):
    """ffmpeg cannot read an end-indexed MP4 from a pipe; through a ranged URL it can."""
    from deepaudit.pipeline.stages import DecodeCropStage as Stage

    s3fs_client.put(str(media["face_video"]), "audit/stage/face.mp4")
    s3_stage = Stage(DecodeConfig(frames=4), FaceDetectorConfig(), CropConfig(size=64),
                     StorageConfig(endpoint_url=s3_server))
    row = s3_stage.process({"manifest_row": 0, "media_id": "s3", "uri": "s3://audit/stage/face.mp4"})
    assert row["status"] == "ok", row["error"]
    assert row["fingerprint"].startswith("size=") and "etag=" in row["fingerprint"]
    missing = s3_stage.process({"manifest_row": 1, "media_id": "m", "uri": "s3://audit/stage/nope.mp4"})
    assert missing["status"] == "error" and missing["error"].startswith("missing:")
