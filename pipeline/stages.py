"""The two Ray Data stages. Each is a callable class that loads its model once in
``__init__`` and turns a pyarrow batch into a pyarrow batch of the same rows.

* :class:`DecodeCropStage` (CPU actors): fetch → ffprobe → sampled decode (checked for
  decoder garbage; see :func:`~deepaudit.pipeline.media.decode_sampled`) → RetinaFace →
  most prominent face per frame → aligned crop. Only uint8 crops and metadata leave it.
* :class:`ClassifyStage` (GPU actors, CPU when there is none): crops from every video in
  the batch go through the detector's one inference call (``model.score``, see
  :mod:`deepaudit.models.detector`) together.

No Ray here: :mod:`deepaudit.pipeline.dataset` wires both stages into Ray Data.

Neither stage ever raises for a bad item: a failure becomes the row's ``status`` and
``error``, so rows out always equal rows in.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from deepaudit.infra.storage import StorageConfig, redact
from deepaudit.models.face_detector import FaceDetectorConfig, build_face_detector
from deepaudit.models.perturb import Perturbation, apply_perturbation
from deepaudit.pipeline.crop import align_crop, select_face
from deepaudit.pipeline.evidence import EvidenceBuilder, EvidenceConfig
from deepaudit.pipeline.media import (
    DecodeConfig,
    MediaError,
    decode_sampled,
    media_type_of,
    open_source,
    probe,
)
from deepaudit.pipeline.schema import (
    CROP_SCHEMA,
    STAGE_VERDICT_SCHEMA,
    STATUS_ERROR,
    STATUS_NO_FACE,
    STATUS_OK,
    margin,
    table_from_rows,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CropConfig:
    size: int = 224  # the classifier's input size; the audit takes it from the model card
    margin: float = 1.3

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"crop size must be >= 16, got {self.size}")
        if not 1.0 <= self.margin <= 3.0:
            raise ValueError(f"crop margin must be in [1, 3], got {self.margin}")


def _internal_error(exc: BaseException) -> str:
    log.error("internal error:\n%s", redact(traceback.format_exc()))
    return f"internal: {type(exc).__name__}: {redact(str(exc))[:300]}"


class DecodeCropStage:
    """CPU stage: media URI in, face crops and metadata out."""

    def __init__(
        self,
        decode: DecodeConfig,
        detector: FaceDetectorConfig,
        crop: CropConfig,
        storage: StorageConfig,
    ) -> None:
        import cv2

        cv2.setNumThreads(1)  # one actor per core; OpenCV's own pool would oversubscribe
        self.decode, self.crop, self.storage = decode, crop, storage
        self.detector = build_face_detector(detector)  # RetinaFace or MTCNN

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(["manifest_row", "media_id", "uri"]).to_pylist()
        return table_from_rows([self.process(r) for r in rows], CROP_SCHEMA)

    def process(self, row: dict) -> dict:
        uri = row["uri"] or ""
        out = {
            **row,
            "media_type": media_type_of(uri),
            "status": STATUS_ERROR,
            "n_frames_sampled": 0,
            "n_frames_with_face": 0,
            "frame_indices": [],
            "face_boxes": [],
            "dropped_frames": [],
            "crops": b"",
            "crop_size": self.crop.size,
        }
        try:
            t0 = time.perf_counter()
            with open_source(uri, self.storage, self.decode) as src:
                out.update(size_bytes=src.size_bytes, fingerprint=src.fingerprint)
                info = probe(src, uri, self.decode)
                out.update(
                    media_type=info.media_type,
                    width=info.width,
                    height=info.height,
                    duration_s=info.duration_s,
                    codec=info.codec,
                )
                decoded = decode_sampled(src, info, self.decode)
            t1 = time.perf_counter()
            out.update(
                decode_mode=decoded.mode,
                decode_warnings=decoded.warnings,
                n_frames_dropped=len(decoded.dropped),
                dropped_frames=[{"frame": d.frame, "reason": d.reason} for d in decoded.dropped],
            )
            frames = decoded.frames
            out.update(self._faces(decoded.indices, frames, info.width / frames.shape[2]))
            out["decode_ms"] = (t1 - t0) * 1e3
            out["detect_ms"] = (time.perf_counter() - t1) * 1e3
        except MediaError as exc:
            out["error"] = str(exc)
        except Exception as exc:  # never lose the row
            out["error"] = _internal_error(exc)
        return out

    def _faces(self, indices: list[int], frames: np.ndarray, to_media: float) -> dict:
        detections = self.detector.detect(frames)
        boxes, crops, kept = [], [], []
        for idx, frame, faces in zip(indices, frames, detections):
            chosen = select_face(faces)
            for j, f in enumerate(faces):
                boxes.append(
                    {
                        "frame": idx,
                        "x1": f.x1 * to_media,
                        "y1": f.y1 * to_media,
                        "x2": f.x2 * to_media,
                        "y2": f.y2 * to_media,
                        "score": f.score,
                        "selected": j == chosen,
                    }
                )
            if chosen is not None:
                crops.append(align_crop(frame, faces[chosen], self.crop.size, self.crop.margin))
                kept.append(idx)
        result = {
            "n_frames_sampled": len(indices),
            "n_frames_with_face": len(crops),
            "frame_indices": kept,
            "face_boxes": boxes,
        }
        if not crops:
            result.update(
                status=STATUS_NO_FACE,
                error=f"no_face: no face found in {len(indices)} sampled frame(s)",
            )
        else:
            result.update(status=STATUS_OK, error=None, crops=np.stack(crops).tobytes())
        return result


@dataclass(frozen=True)
class ClassifyConfig:
    device: str = "auto"  # auto | cpu | cuda
    crop_batch: int = 64  # crops per forward pass of the CNN trunk
    threads: int = 0  # torch intra-op threads on CPU; 0 keeps torch's default
    # A robustness check (evaluate --perturb): every crop is perturbed before scoring.
    perturb: str | None = None

    def __post_init__(self) -> None:
        if self.perturb is not None:
            Perturbation.parse(self.perturb)  # validates
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.crop_batch < 1:
            raise ValueError(f"crop_batch must be >= 1, got {self.crop_batch}")


class ClassifyStage:
    """Classifier stage: crops in, per-frame and per-video scores out.

    With ``evidence``, rows flagged fake also get Grad-CAM evidence (see
    :mod:`deepaudit.pipeline.evidence`), computed after scoring on those rows only.

    Calls may run concurrently in threads of one actor (``StagePlan.classify_calls``):
    scoring shares only the eval-mode model, read-only under ``inference_mode``; the
    evidence step (its item count and files) runs under a lock.
    """

    def __init__(
        self, handle, config: ClassifyConfig, evidence: EvidenceConfig | None = None
    ) -> None:
        import torch

        self.torch = torch
        want_cuda = config.device in ("auto", "cuda") and torch.cuda.is_available()
        if config.device == "cuda" and not want_cuda:
            raise RuntimeError("device=cuda was asked for but torch sees no CUDA device")
        self.device = torch.device("cuda" if want_cuda else "cpu")
        if self.device.type == "cpu" and config.threads:
            torch.set_num_threads(config.threads)
        self.config, self.handle = config, handle
        model = handle.load(device=str(self.device))
        # channels_last: faster convolutions on both oneDNN (CPU) and cuDNN (GPU).
        self.model = model.to(memory_format=torch.channels_last).eval()
        cfg = handle.config
        self.size = cfg.input_size
        self.threshold = float(cfg.threshold)
        self.perturbation = Perturbation.parse(config.perturb or "none")
        if self.perturbation.kind == "pgd" and not hasattr(self.model, "attack"):
            raise ValueError(f"--perturb {self.perturbation.name}: {handle.model_id} has no "
                             "white-box attack (pgd needs a detector with a CLIP branch)")
        self.evidence = self._evidence_builder(evidence)
        self._evidence_lock = threading.Lock()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.drop_columns(["crops"]).to_pylist()
        crops = batch.column("crops")
        for row in rows:
            row.update(
                threshold=self.threshold,
                model=self.handle.model_id,
                model_sha256=self.handle.sha256,
                frame_p_fake=[],
            )
        todo = [i for i, r in enumerate(rows) if r["status"] == STATUS_OK]
        if todo:
            try:
                scored = self._score(rows, todo, crops)
            except Exception as exc:  # e.g. out of memory: fail these rows, not the run
                message = _internal_error(exc)
                for i in todo:
                    rows[i].update(status=STATUS_ERROR, error=f"classify_failed: {message}")
            else:
                self._add_evidence(rows, todo, *scored)
        return table_from_rows(rows, STAGE_VERDICT_SCHEMA)

    def _score(self, rows: list[dict], todo: list[int], crops: pa.ChunkedArray) -> tuple:
        """Score ``rows[todo]`` in place through the detector contract
        (``model.score``); return ``(arrays, scores, lengths)`` for the evidence step."""
        t0 = time.perf_counter()
        arrays, lengths = [], []
        for i in todo:
            n, size = rows[i]["n_frames_with_face"], rows[i]["crop_size"]
            if size != self.size:
                raise ValueError(f"crops are {size}px but the model expects {self.size}px")
            arr = np.frombuffer(crops[i].as_py(), np.uint8).reshape(n, size, size, 3)
            if self.perturbation.kind not in ("none", "pgd"):
                arr = np.stack([apply_perturbation(c, self.perturbation) for c in arr])
            arrays.append(arr)
            lengths.append(n)
        batch = np.concatenate(arrays)
        if self.perturbation.kind == "pgd":  # white-box: the attack needs the model
            batch = self.model.attack(batch, lengths, self.perturbation.value)
            arrays = np.split(batch, np.cumsum(lengths)[:-1])
        scores = self.model.score(batch, lengths, self.config.crop_batch)
        video_p, frame_p = scores.video_p, scores.frame_p
        ms = (time.perf_counter() - t0) * 1e3 / len(todo)
        offsets = np.cumsum([0] + lengths)
        for k, i in enumerate(todo):
            p = float(video_p[k])
            row = rows[i]
            row["classify_ms"] = ms
            row["score_head"] = scores.head[k]
            # A frame no branch scored stays null (frame_indices says which frame it is).
            row["frame_p_fake"] = [float(v) if math.isfinite(v) else None
                                   for v in frame_p[offsets[k] : offsets[k + 1]]]
            if scores.frame_weights is not None:
                row["frame_weights"] = [
                    float(v) for v in scores.frame_weights[offsets[k] : offsets[k + 1]]]
            if not math.isfinite(p):
                row.update(status=STATUS_ERROR, error="classify_failed: non-finite score")
                continue
            row["p_fake"] = p
            row["margin"] = margin(p, self.threshold)
            if self.handle.trained:
                row["verdict"] = self.handle.config.verdict(p)
            else:
                row["verdict"] = None  # an untrained model's score is no verdict
                row["error"] = "untrained_model: score withheld from verdict"
        return arrays, scores, lengths

    # Evidence (issue 5): Grad-CAM only for rows flagged fake, after the normal pass.

    def _evidence_builder(self, evidence: EvidenceConfig | None) -> EvidenceBuilder | None:
        if evidence is None or evidence.max_items == 0:
            return None
        torch = self.torch

        def autocast():
            return torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda")

        return EvidenceBuilder(evidence, self.model, autocast)

    def _add_evidence(self, rows: list[dict], todo: list[int], arrays, scores, lengths) -> None:
        """Evidence for the flagged rows among ``todo``; never on the normal path (a batch
        with no fake verdict returns at once) and never fails a row."""
        if self.evidence is None or not self.evidence.remaining():
            return
        scored = [rows[i] for i in todo]
        if not any(r.get("verdict") == "fake" for r in scored):
            return
        with self._evidence_lock:
            try:
                self.evidence.add(scored, arrays, scores.cam_features, lengths)
            except Exception as exc:
                self.evidence.failed += 1
                _internal_error(exc)
