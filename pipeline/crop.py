"""Choose the face to judge in each frame, then crop and align it.

Rule for the most prominent face: among the detections that passed the detector's
score threshold and minimum size, take the one with the largest ``area * score``.
In a talking-head or interview shot that is the subject; in a crowd it is the
nearest confident face. Every other box is still reported in ``face_boxes``.

Alignment: the crop is rotated so the eye line is horizontal, centred on the box
centre, and covers ``margin`` times the box's longer side (1.3 by default, which keeps
the hairline, jaw and blending boundary that face-swap artefacts live in).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from deepaudit.models.face_detector import Face


def select_face(faces: list[Face]) -> int | None:
    """Index of the most prominent face (largest area x score), or None."""
    if not faces:
        return None
    return max(range(len(faces)), key=lambda i: faces[i].area * faces[i].score)


def eye_angle_deg(face: Face) -> float:
    """Angle of the line from the image-left eye to the image-right eye, in degrees."""
    (rx, ry), (lx, ly) = face.landmarks[0], face.landmarks[1]
    if rx > lx:  # landmarks come subject-right first; guard against flipped order
        (rx, ry), (lx, ly) = (lx, ly), (rx, ry)
    return math.degrees(math.atan2(ly - ry, lx - rx))


def align_crop(frame: np.ndarray, face: Face, size: int, margin: float = 1.3) -> np.ndarray:
    """A ``size x size`` RGB uint8 crop of ``face``, rotated upright."""
    cx, cy = (face.x1 + face.x2) / 2.0, (face.y1 + face.y2) / 2.0
    side = margin * max(face.width, face.height, 1.0)
    angle = eye_angle_deg(face)
    # Large faces are shrunk with area averaging first; warpAffine alone would alias.
    shrink = size / side
    src = frame
    if shrink < 0.5:
        half = int(math.ceil(side * 0.75))
        x0, y0 = max(0, int(cx) - half), max(0, int(cy) - half)
        x1, y1 = min(frame.shape[1], int(cx) + half), min(frame.shape[0], int(cy) + half)
        roi = frame[y0:y1, x0:x1]
        pre = shrink * 2.0  # leave 2x headroom for the final, rotating resample
        src = cv2.resize(roi, None, fx=pre, fy=pre, interpolation=cv2.INTER_AREA)
        cx, cy, side = (cx - x0) * pre, (cy - y0) * pre, side * pre
    scale = size / side
    m = cv2.getRotationMatrix2D((cx, cy), angle, scale)
    m[0, 2] += size / 2.0 - cx
    m[1, 2] += size / 2.0 - cy
    return cv2.warpAffine(
        src, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
