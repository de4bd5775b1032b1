"""Checking a handful of local files in this process (``deepaudit check``, and the
Check-a-file page of ``deepaudit serve``).

For a few files, starting Ray (about 4 s and 660 MB) costs more than the work, so
``check`` builds the audit's own :class:`DecodeCropStage` and :class:`ClassifyStage` and
calls them on a small pyarrow table: the files are scored by exactly the audit's code.

Exit codes, for use as a gate in scripts:

* 0: every file was scored and none was flagged fake;
* 1: at least one file was flagged fake;
* 2: usage error (bad option, unknown model, no file given);
* 3: no file was flagged, but at least one could not be scored (not media, corrupt,
  no face, or an untrained model that withholds its verdicts).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

EXIT_OK, EXIT_FLAGGED, EXIT_USAGE, EXIT_UNSCORED = 0, 1, 2, 3
DEFAULT_EVIDENCE_DIR = "deepaudit-evidence"


@dataclass(frozen=True)
class CheckConfig:
    files: tuple[str, ...]
    model: str | None = None
    threshold: float | None = None
    frames: int | None = None
    device: str = "auto"
    evidence: bool = True
    evidence_dir: str | None = None  # None: write no files
    evidence_frames: int = 3
    face_detector: str = "retinaface"  # or "mtcnn" (FaceDetectorConfig.kind)

    def __post_init__(self) -> None:
        if not self.files:
            raise ValueError("give at least one file to check")
        if self.evidence_frames < 1:
            raise ValueError(f"--evidence-frames must be >= 1, got {self.evidence_frames}")
        for f in self.files:
            try:
                f.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"file name {f!r} is not valid UTF-8: rename the file") from None


class Checker:
    """The ``check`` code path with its model and face detector loaded once: build it
    once, then call :meth:`check` for each batch of files (``deepaudit serve`` keeps one
    for its upload page). Not for concurrent calls: callers serialise them.

    Evidence for flagged files goes to ``evidence_dir/<safe name of the file>/<run>.png``.
    """

    def __init__(self, model: str | None = None, threshold: float | None = None,
                 frames: int | None = None, device: str = "auto",
                 evidence_dir: str | None = DEFAULT_EVIDENCE_DIR, evidence_frames: int = 3,
                 run_id: str | None = None, face_detector: str = "retinaface") -> None:
        from deepaudit.infra.storage import StorageConfig
        from deepaudit.models.checkpoint import resolve_model
        from deepaudit.models.face_detector import FaceDetectorConfig
        from deepaudit.pipeline.dataset import stage_configs
        from deepaudit.pipeline.evidence import EvidenceConfig
        from deepaudit.pipeline.stages import ClassifyStage, DecodeCropStage
        from deepaudit.pipeline.writer import new_run_id

        self.handle = resolve_model(model).with_overrides(threshold, frames)
        self.run_id = run_id or "check-" + new_run_id()
        self.evidence_root = (str(Path(evidence_dir).expanduser().absolute())
                              if evidence_dir else None)
        # The evidence cap counts over the checker's life: effectively none.
        evidence = (EvidenceConfig(root=self.evidence_root, run_id=self.run_id,
                                   storage=StorageConfig(), max_items=2**62,
                                   top_k=evidence_frames)
                    if self.evidence_root else None)
        # The audit's own stage configs, so a file is checked exactly as it is audited;
        # only the detector may use a few threads in this one process.
        threads = max(1, min(4, os.cpu_count() or 1))
        import torch

        gpu = device != "cpu" and torch.cuda.is_available()
        stages = stage_configs(self.handle, device=device,
                               detector=FaceDetectorConfig(threads=threads,
                                                           kind=face_detector),
                               evidence=evidence, gpu=gpu)
        self.decode = DecodeCropStage(stages.decode, stages.detector, stages.crop,
                                      stages.storage)
        self.classify = ClassifyStage(stages.handle, stages.classify, stages.evidence)

    def check(self, files: list[str] | tuple[str, ...],
              media_ids: list[str] | None = None) -> dict:
        """Score local ``files``; returns the JSON-ready result (with ``exit_code``).
        ``media_ids``: the names shown and used for evidence folders (default: the paths)."""
        handle = self.handle
        ids = list(media_ids) if media_ids is not None else list(files)
        table = pa.table({
            "manifest_row": pa.array(range(len(files)), pa.int64()),
            "media_id": pa.array(ids, pa.string()),
            "uri": pa.array([str(Path(f).expanduser().absolute()) for f in files], pa.string()),
        })
        rows = self.classify(self.decode(table)).to_pylist()
        out = []
        for r in rows:
            out.append({
                "file": r["media_id"],
                "status": r["status"],
                "verdict": r["verdict"],
                "p_fake": r["p_fake"],
                "margin": r["margin"],
                "error": r["error"],
                "media_type": r["media_type"],
                "n_faces": len(r["face_boxes"] or []),
                "n_frames_sampled": r["n_frames_sampled"],
                "n_frames_with_face": r["n_frames_with_face"],
                "frame_p_fake": r["frame_p_fake"],
                "evidence": r["evidence"],
            })
        flagged = sum(f["verdict"] == "fake" for f in out)
        unscored = sum(f["verdict"] is None for f in out)
        code = EXIT_FLAGGED if flagged else EXIT_UNSCORED if unscored else EXIT_OK
        return {
            "model": handle.model_id,
            "model_trained": handle.trained,
            "model_quality": handle.quality,
            "threshold": handle.config.threshold,
            "run_id": self.run_id,
            "files": out,
            "flagged": flagged,
            "unscored": unscored,
            "evidence_dir": self.evidence_root if flagged and self.evidence_root else None,
            "exit_code": code,
        }


def run_check(cfg: CheckConfig) -> dict:
    """Score ``cfg.files`` in this process; returns the JSON-ready result (with
    ``exit_code``). Raises ValueError/FileNotFoundError for usage errors only."""
    from deepaudit.infra.ray_runtime import check_device_here
    from deepaudit.infra.storage import check_writable

    check_device_here(cfg.device)
    evidence = cfg.evidence and cfg.evidence_dir is not None  # no files unless asked
    if evidence:  # a folder is made only when something is flagged
        check_writable(cfg.evidence_dir, what="--evidence-dir", create=False)
    checker = Checker(model=cfg.model, threshold=cfg.threshold, frames=cfg.frames,
                      device=cfg.device, evidence_dir=cfg.evidence_dir if evidence else None,
                      evidence_frames=cfg.evidence_frames, face_detector=cfg.face_detector)
    return checker.check(cfg.files)
