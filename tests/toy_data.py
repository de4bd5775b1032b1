"""A small, learnable labelled set for training and evaluation tests.

Reals are jittered views (zoom, shift, brightness, flip) of the face photos that ship in
scikit-image and matplotlib; each fake is such a view with a strong colour cast
inside an ellipse over the face: a manipulation confined to the face, which RetinaFace
still detects and a tiny CNN learns in an epoch or two. Two short clips (one real, one
with the tinted face on every frame) exercise the video path.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np

from deepaudit.models.face_detector import RetinaFaceDetector
from deepaudit.pipeline.demo_media import encode_clip, face_photos, ken_burns_frames


def _face_boxes() -> dict[str, tuple[float, float, float, float]]:
    det = RetinaFaceDetector()
    out = {}
    for name, photo in face_photos().items():
        faces = det.detect(photo)[0]
        f = max(faces, key=lambda f: f.area * f.score)
        out[name] = (f.x1, f.y1, f.x2, f.y2)
    return out


def _tint_face(img: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    x1, y1, x2, y2 = box
    mask = np.zeros(img.shape[:2], np.uint8)
    centre = (int((x1 + x2) / 2), int((y1 + y2) / 2))
    axes = (int((x2 - x1) * 0.4), int((y2 - y1) * 0.5))
    cv2.ellipse(mask, centre, axes, 0, 0, 360, 255, -1)
    tinted = img.astype(np.float32) * np.array([1.1, 0.9, 0.3], np.float32) + [30, 0, 0]
    out = img.copy()
    out[mask > 0] = np.clip(tinted[mask > 0], 0, 255).astype(np.uint8)
    return out


def _view(photo: np.ndarray, rng: np.random.Generator,
          size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A random zoom/shift/brightness/flip of ``photo``: (view, 2x3 affine used)."""
    h, w = photo.shape[:2]
    zoom = rng.uniform(1.0, 1.25)
    side = min(h, w) / zoom
    cx = w / 2 + rng.uniform(-0.08, 0.08) * side
    cy = h / 2 + rng.uniform(-0.08, 0.08) * side
    scale = size / side
    m = np.array([[scale, 0, size / 2 - cx * scale], [0, scale, size / 2 - cy * scale]])
    view = cv2.warpAffine(photo, m, (size, size), flags=cv2.INTER_AREA,
                          borderMode=cv2.BORDER_REFLECT_101)
    view = np.clip(view.astype(np.float32) * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8)
    return view, m


def _map_box(box, m):
    x1, y1, x2, y2 = box
    return (x1 * m[0, 0] + m[0, 2], y1 * m[1, 1] + m[1, 2], x2 * m[0, 0] + m[0, 2],
            y2 * m[1, 1] + m[1, 2])


def build_toy_set(dest: Path, per_photo: int = 8, videos: bool = True, seed: int = 0) -> Path:
    """Write ``dest/real/*``, ``dest/fake/*`` and ``dest/labels.csv`` (uri, label, group,
    media_id); return the folder. ``per_photo`` real and fake images per bundled photo."""
    rng = np.random.default_rng(seed)
    boxes = _face_boxes()
    rows = []
    for label in ("real", "fake"):
        (dest / label).mkdir(parents=True, exist_ok=True)
    for name, photo in face_photos().items():
        for i in range(per_photo):
            for label in ("real", "fake"):
                view, m = _view(photo, rng)
                if label == "fake":
                    view = _tint_face(view, _map_box(boxes[name], m))
                path = dest / label / f"{name}-{i:02d}.jpg"
                cv2.imwrite(str(path), cv2.cvtColor(view, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, 90])
                rows.append({"uri": str(path), "label": label, "group": f"{name}-{i}-{label}",
                             "media_id": f"{label}/{path.name}"})
    if videos:
        photo = face_photos()["astronaut"]
        box = boxes["astronaut"]
        real = list(ken_burns_frames(photo, 1.0, 10, (320, 240)))
        fake_photo = _tint_face(photo, box)
        fake = list(ken_burns_frames(fake_photo, 1.0, 10, (320, 240)))
        for label, frames in (("real", real), ("fake", fake)):
            path = encode_clip(frames, dest / label / "astronaut-clip.mp4", fps=10)
            rows.append({"uri": str(path), "label": label, "group": f"clip-{label}",
                         "media_id": f"{label}/{path.name}"})
    with (dest / "labels.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["uri", "label", "group", "media_id"])
        w.writeheader()
        w.writerows(rows)
    return dest
