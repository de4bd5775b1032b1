"""Face detectors side by side: RetinaFace (the default) and MTCNN (``--face-detector
mtcnn``), cost per frame and agreement, on the same frames in one run (issue 31 item 4).

Frames, decoded as the audit decodes them (``decode_sampled``, ``--frames`` per video):
  * ``generated``: Ken Burns clips of the bundled face photos (and one faceless photo) at
    640x360, made by pipeline/demo_media.py;
  * ``shared``: every video of ../shared/data and ``--images`` of its images (spread over
    the manifest), when the folder is there.

Each item's frames go through one ``detect`` call, as in the audit's CPU stage, with the
audit's detector settings (one thread each). The two detectors alternate which goes
first, ``--repeats`` times; each reports the median over repeats of wall and CPU
milliseconds per frame. Agreement: per frame, whether both find a face and the faces the
crop would take (``select_face``) overlap at IoU > 0.5. Prints one JSON line; ``--record``
appends it, with date, commit and machine, to ``bench/results/face_detector.jsonl``.

    python bench/face_detector_cost.py [--frames 16] [--images 40] [--repeats 3]
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from record import append_record, machine  # bench/record.py, beside this script

from deepaudit.infra.storage import StorageConfig
from deepaudit.models.face_detector import Face, FaceDetectorConfig, build_face_detector
from deepaudit.pipeline.crop import select_face
from deepaudit.pipeline.demo_media import face_photos, make_test_clip
from deepaudit.pipeline.media import DecodeConfig, decode_sampled, open_source, probe

DETECTORS = ("retinaface", "mtcnn")


def decode(path: Path, frames: int) -> np.ndarray:
    cfg = DecodeConfig(frames=frames)
    with open_source(str(path), StorageConfig(), cfg) as src:
        return decode_sampled(src, probe(src, str(path), cfg), cfg).frames


def iou(a: Face, b: Face) -> float:
    w = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    h = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = w * h
    return inter / max(a.area + b.area - inter, 1e-9)


def measure(items: list[tuple[str, np.ndarray]], detectors: dict, repeats: int) -> dict:
    """Per detector: median wall and CPU ms per frame over repeats; and agreement."""
    frames = sum(len(f) for _, f in items)
    wall = {k: [] for k in detectors}
    cpu = {k: [] for k in detectors}
    found: dict[str, list[list[Face]]] = {}
    for r in range(repeats):
        order = list(detectors) if r % 2 == 0 else list(reversed(detectors))
        totals = {k: [0.0, 0.0] for k in detectors}
        for _, batch in items:
            for name in order:
                t0, c0 = time.perf_counter(), time.process_time()
                out = detectors[name].detect(batch)
                totals[name][0] += time.perf_counter() - t0
                totals[name][1] += time.process_time() - c0
                if r == 0:
                    found.setdefault(name, []).extend(out)
        for name, (w, c) in totals.items():
            wall[name].append(w * 1e3 / frames)
            cpu[name].append(c * 1e3 / frames)
    per = {name: {"wall_ms_per_frame": round(statistics.median(wall[name]), 2),
                  "cpu_ms_per_frame": round(statistics.median(cpu[name]), 2),
                  "frames_with_face": sum(1 for f in found[name] if f)}
           for name in detectors}
    both = agree = only_r = only_m = 0
    for fr, fm in zip(found["retinaface"], found["mtcnn"]):
        if fr and fm:
            both += 1
            agree += iou(fr[select_face(fr)], fm[select_face(fm)]) > 0.5
        only_r += bool(fr) and not fm
        only_m += bool(fm) and not fr
    return {"items": len(items), "frames": frames, **per,
            "mtcnn_over_retinaface_wall": round(per["mtcnn"]["wall_ms_per_frame"]
                                                / per["retinaface"]["wall_ms_per_frame"], 2),
            "mtcnn_over_retinaface_cpu": round(per["mtcnn"]["cpu_ms_per_frame"]
                                               / per["retinaface"]["cpu_ms_per_frame"], 2),
            "agreement": {"both_found": both, "same_face": agree, "only_retinaface": only_r,
                          "only_mtcnn": only_m,
                          "same_face_share": round(agree / both, 3) if both else None}}


def generated_items(folder: Path, frames: int) -> list[tuple[str, np.ndarray]]:
    items = []
    for name in [*sorted(face_photos()), "chelsea"]:
        clip = make_test_clip(folder / f"{name}.mp4", seconds=2.0, size=(640, 360), face=name)
        items.append((name, decode(clip, frames)))
    return items


def shared_items(shared: Path, frames: int, images: int) -> list[tuple[str, np.ndarray]]:
    with open(shared / "MANIFEST.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    videos = [r["relative_path"] for r in rows if r["kind"] == "video"]
    stills = [r["relative_path"] for r in rows if r["kind"] == "image"]
    step = max(1, len(stills) // max(images, 1))
    items = []
    for rel in videos + stills[::step][:images]:
        try:
            items.append((rel, decode(shared / rel, frames)))
        except Exception as exc:  # a file the audit would row as an error: not a detector cost
            print(f"skipped {rel}: {exc}", file=sys.stderr)
    return items


def main(
    frames: Annotated[int, typer.Option(help="Frames sampled per video.")] = 16,
    images: Annotated[int, typer.Option(help="Shared images measured.")] = 40,
    repeats: Annotated[int, typer.Option(help="Runs of each detector (median).")] = 3,
    shared: Annotated[Optional[Path], typer.Option(
        help="Shared data (default: $DEEPAUDIT_SHARED_DATA or ../shared/data).")] = None,
    note: Annotated[str, typer.Option(help="Recorded with the line.")] = "",
    record: Annotated[bool, typer.Option(help="Append the line to bench/results/.")] = False,
) -> None:
    root = Path(__file__).resolve().parents[1]
    shared = shared or Path(os.environ.get("DEEPAUDIT_SHARED_DATA",
                                           root.parent / "shared" / "data"))
    started = time.time()
    detectors = {k: build_face_detector(FaceDetectorConfig(kind=k)) for k in DETECTORS}
    for det in detectors.values():  # load and warm up before any timing
        det.detect(np.zeros((1, 360, 640, 3), np.uint8))
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"generated": generated_items(Path(tmp), frames)}
    if (shared / "MANIFEST.tsv").is_file():
        sets["shared"] = shared_items(shared, frames, images)
    result = {"bench": "face_detector", "frames_per_video": frames, "repeats": repeats,
              "threads_each": 1, "load_average_start": round(os.getloadavg()[0], 1)}
    for name, items in sets.items():
        result[name] = measure(items, detectors, repeats)
        print(json.dumps({name: result[name]}), file=sys.stderr, flush=True)
    result.update(load_average_end=round(os.getloadavg()[0], 1),
                  wall_s=round(time.time() - started, 1), note=note)
    line = (append_record(Path(__file__).parent / "results" / "face_detector.jsonl", result)
            if record else {"machine": machine(), **result})
    print(json.dumps(line))


if __name__ == "__main__":
    typer.run(main)
