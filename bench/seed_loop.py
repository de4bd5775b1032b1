"""The audit against a seed-style loop, as whole processes, on the same clips.

The systems deepaudit grew from score a video in one process, one video at a time:
decode 16 frames, find the face in each, crop at 224 px and run a ResNeXt50 + LSTM over
the 16 crops (torch on every core). This bench times that loop (``--loop``, this file
run as a script) against ``deepaudit audit`` of the same clips on a fresh local Ray, each
as a whole process from start to exit (imports, model loads and Ray's start-up
included), in turns A B A B..., and reports the median of the pairwise ratios.

    python bench/seed_loop.py --clips 39 --rounds 3
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

HERE = Path(__file__).resolve().parent


def seed_loop(clips: list[str], frames: int = 16) -> None:
    """The seed-style scorer: every clip, one at a time, in this process."""
    import numpy as np
    import torch

    from deepaudit.infra.storage import StorageConfig
    from deepaudit.models.checkpoint import resolve_model
    from deepaudit.models.face_detector import FaceDetectorConfig, RetinaFaceDetector
    from deepaudit.pipeline.crop import align_crop, select_face
    from deepaudit.pipeline.media import DecodeConfig, decode_frames, open_source, probe

    torch.set_num_threads(os.cpu_count() or 1)
    handle = resolve_model("resnext_lstm")  # ResNeXt50_32x4d + LSTM at 224 px
    model = handle.load("cpu")
    det = RetinaFaceDetector(FaceDetectorConfig(threads=os.cpu_count() or 1))
    cfg = DecodeConfig(frames=frames, ffmpeg_threads=0)
    scores = []
    for clip in clips:
        with open_source(clip, StorageConfig(), cfg) as src:
            _, frames_ = decode_frames(src, probe(src, clip, cfg), cfg)
        crops = [align_crop(f, faces[i], handle.config.input_size)
                 for f, faces in zip(frames_, det.detect(frames_))
                 if (i := select_face(faces)) is not None]
        with torch.inference_mode():
            scores.append(float(model.score(np.stack(crops), [len(crops)]).video_p[0]))
    print(json.dumps({"videos": len(scores)}))


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    return time.perf_counter() - t0


def main(
    clips: Annotated[int, typer.Option(help="Generated 10 s 640x360 clips.")] = 39,
    rounds: Annotated[int, typer.Option(help="A B pairs.")] = 3,
    model: Annotated[Optional[str], typer.Option(
        help="The audit's model (default: the shipped default).")] = None,
    workdir: Annotated[Path, typer.Option(help="Clip cache and outputs.")] = Path("bench-out"),
    record: Annotated[bool, typer.Option(help="Append to bench/results/.")] = True,
    baseline: Annotated[Optional[Path], typer.Option(
        help="Another build's deepaudit executable (e.g. an older commit's venv), timed in "
             "the same rounds: before and after on the same machine.")] = None,
    loop: Annotated[Optional[Path], typer.Option(
        help="Internal: run the seed-style loop over this manifest.")] = None,
) -> None:
    if loop is not None:
        with loop.open() as f:
            seed_loop([r["uri"] for r in csv.DictReader(f)])
        return
    from audit_throughput import make_clips  # bench/, beside this script
    from record import append_record

    paths = make_clips(workdir / "clips", clips, 10.0)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        manifest = Path(tmp) / "manifest.csv"
        with manifest.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["uri"])
            w.writerows([[str(p.absolute())] for p in paths])
        bin_dir = Path(sys.executable).parent
        seed = [sys.executable, str(Path(__file__).resolve()), "--loop", str(manifest)]
        def audit(exe: Path, out: str) -> list[str]:
            return [str(exe), "audit", str(manifest), "-o", str(Path(tmp) / out),
                    "--no-evidence", "--no-progress", *(["--model", model] if model else [])]

        pairs = []
        timed(seed)  # warm-up: page cache, compiled kernels
        for r in range(rounds):
            a, b = timed(seed), timed(audit(bin_dir / "deepaudit", f"out{r}"))
            pairs.append({"seed_loop_s": round(a, 2), "audit_s": round(b, 2),
                          "speedup": round(a / b, 3)})
            if baseline:
                c = timed(audit(baseline, f"base{r}"))
                pairs[-1].update(baseline_audit_s=round(c, 2),
                                 baseline_speedup=round(a / c, 3))
            print(json.dumps({"round": r, **pairs[-1]}), file=sys.stderr, flush=True)
    result = {"bench": "seed_loop", "clips": clips, "clip_seconds": 10.0,
              "model": model or "default", "rounds": rounds,
              "speedup_median": statistics.median(p["speedup"] for p in pairs),
              **({"baseline": str(baseline), "baseline_speedup_median": statistics.median(
                  p["baseline_speedup"] for p in pairs)} if baseline else {}),
              "per_round": pairs}
    print(json.dumps(result))
    if record:
        append_record(HERE / "results" / "seed_loop.jsonl", result)


if __name__ == "__main__":
    typer.run(main)
