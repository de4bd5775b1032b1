"""Throughput of the audit pipeline against a naive baseline, on generated 10 s clips.

Runs, in one go and on the same fixed clips:
  1. each stage alone, in this process, single-threaded (decode = ffprobe + sampled
     ffmpeg decode; detect = RetinaFace + align/crop; classify = ResNeXt trunk + LSTM),
     recording CPU seconds per video (this process plus its ffmpeg children);
  2. the naive baseline the seed systems use: one video at a time in one process,
     decode → detect → classify, with torch on all cores;
  3. the Ray Data pipeline (``run_audit``) on a local Ray using every core.

Prints one JSON line. ``efficiency`` is the pipeline's throughput divided by the ideal
throughput the stages' measured costs allow on this machine's cores:
``ideal = cores / (decode + detect + classify CPU-seconds per video)``.

    python bench/audit_throughput.py [--videos 24] [--seconds 10] [--frames 16]
"""

from __future__ import annotations

import csv
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from deepaudit.infra.storage import StorageConfig
from deepaudit.models.checkpoint import resolve_model
from deepaudit.models.face_detector import FaceDetectorConfig, RetinaFaceDetector
from deepaudit.pipeline.crop import align_crop, select_face
from deepaudit.pipeline.media import DecodeConfig, decode_frames, open_source, probe

FACES = ("astronaut", "grace_hopper", "cameraman")


def cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def make_clips(folder: Path, n: int, seconds: float) -> list[Path]:
    from deepaudit.jobs.demo_media import make_test_clip

    folder.mkdir(parents=True, exist_ok=True)
    clips = []
    for i in range(n):
        path = folder / f"clip{i:02d}_{seconds:g}s.mp4"
        if not path.exists():
            make_test_clip(path, seconds=seconds, size=(640, 360), face=FACES[i % len(FACES)])
        clips.append(path)
    return clips


def decode_one(path: Path, cfg: DecodeConfig) -> tuple[list[int], np.ndarray]:
    with open_source(str(path), StorageConfig(), cfg) as src:
        return decode_frames(src, probe(src, str(path), cfg), cfg)


def crops_of(det: RetinaFaceDetector, frames: np.ndarray, size: int) -> np.ndarray:
    out = []
    for frame, faces in zip(frames, det.detect(frames)):
        i = select_face(faces)
        if i is not None:
            out.append(align_crop(frame, faces[i], size))
    return np.stack(out)


class Scorer:
    """The model applied to one video's crops, as the baseline and stage timing use it."""

    def __init__(self, handle) -> None:
        import torch

        self.torch = torch
        self.model = handle.load("cpu").to(memory_format=torch.channels_last)
        cfg = handle.config
        self.mean = torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(cfg.std).view(1, 3, 1, 1) * 255

    def __call__(self, crops: np.ndarray) -> float:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(crops).permute(0, 3, 1, 2).float().sub_(self.mean).div_(self.std)
            feats = self.model.frame_features(x.contiguous(memory_format=torch.channels_last))
            logit = self.model.sequence_logits(feats[None], torch.tensor([len(crops)]))
        return float(torch.sigmoid(logit)[0])


def main(
    videos: Annotated[int, typer.Option(
        help="Number of clips (enough that actor start-up is amortised, as in an archive).")] = 24,
    seconds: Annotated[float, typer.Option(help="Clip length.")] = 10.0,
    frames: Annotated[int, typer.Option(help="Frames sampled per clip.")] = 16,
    model: Annotated[str, typer.Option(help="Model name or checkpoint.")] = "resnext_lstm",
    workdir: Annotated[Path, typer.Option(help="Clip cache and outputs.")] = Path("bench-out"),
) -> None:
    import torch

    cores = os.cpu_count() or 1
    clips = make_clips(workdir / "clips", videos, seconds)
    handle = resolve_model(model)
    size = handle.config.input_size
    dcfg = DecodeConfig(frames=frames)

    # 1. Each stage alone, single-threaded: CPU seconds per video.
    torch.set_num_threads(1)
    det = RetinaFaceDetector(FaceDetectorConfig(threads=1))
    scorer = Scorer(handle)
    scorer(np.zeros((2, size, size, 3), np.uint8))  # warm-up
    costs = {"decode": 0.0, "detect": 0.0, "classify": 0.0}
    for clip in clips:
        c0 = cpu_seconds()
        _, fr = decode_one(clip, dcfg)
        c1 = cpu_seconds()
        crops = crops_of(det, fr, size)
        c2 = cpu_seconds()
        scorer(crops)
        c3 = cpu_seconds()
        costs["decode"] += c1 - c0
        costs["detect"] += c2 - c1
        costs["classify"] += c3 - c2
    costs = {k: v / len(clips) for k, v in costs.items()}
    ideal = cores / sum(costs.values())

    # 2. Naive baseline: one video at a time, one process, torch on every core.
    torch.set_num_threads(cores)
    t0 = time.perf_counter()
    det_b = RetinaFaceDetector(FaceDetectorConfig(threads=cores))
    scorer_b = Scorer(handle)
    for clip in clips:
        _, fr = decode_one(clip, dcfg)
        scorer_b(crops_of(det_b, fr, size))
    baseline_vps = len(clips) / (time.perf_counter() - t0)
    del scorer, scorer_b

    # 3. The pipeline on a local Ray (started before timing, as a cluster would be).
    from deepaudit.infra.ray_runtime import connect
    from deepaudit.jobs.audit import AuditConfig, run_audit

    connect("local", num_cpus=cores)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        manifest = Path(tmp) / "manifest.csv"
        with manifest.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["uri"])
            w.writerows([[str(c.absolute())] for c in clips])
        t0 = time.perf_counter()
        summary = run_audit(AuditConfig(manifest=str(manifest), output=str(Path(tmp) / "out"),
                                        model=model, frames=frames))
        pipeline_vps = len(clips) / (time.perf_counter() - t0)
    assert summary["status"]["ok"] == len(clips), summary

    print(json.dumps({
        "bench": "audit_throughput",
        "videos": len(clips),
        "clip_seconds": seconds,
        "frames": frames,
        "model": handle.model_id,
        "input_size": size,
        "cores": cores,
        "pipeline_videos_per_s": round(pipeline_vps, 4),
        "baseline_videos_per_s": round(baseline_vps, 4),
        "speedup_vs_baseline": round(pipeline_vps / baseline_vps, 3),
        "stage_cpu_s_per_video": {k: round(v, 4) for k, v in costs.items()},
        "ideal_videos_per_s": round(ideal, 4),
        "efficiency": round(pipeline_vps / ideal, 3),
        "plan": summary["plan"],
    }))


if __name__ == "__main__":
    typer.run(main)
