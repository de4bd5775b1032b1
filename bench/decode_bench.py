"""Sampled decode of long videos: cost and corrupt frames of each decode mode (issue 19).

Long videos (10 minutes by default):
  * generated 720p clips, open-GOP x264 with B-frames and a 10 s keyframe interval: a
    ``--segment``-second encode looped to length by stream copy (the same GOPs over and
    over, as a real encode of that length would have);
  * shared FaceForensics++ c23 clips looped to length by stream copy (``-stream_loop``,
    ``-c copy``), including ones from x264 core 148, whose seeks decode to garbage unless
    the decoder is told the x264 build (docs/decode.md).

Each video is decoded three ways at ``--frames`` frames:
  * ``old_seek``: what decode_frames did before: one ``-ss idx/fps`` per frame, errors
    ignored;
  * ``sequential``: every frame decoded, the sampled ones kept (``select``): the
    reference; a frame of another mode is corrupt when its PSNR against it is under 35 dB;
  * ``new``: :func:`deepaudit.pipeline.media.decode_sampled` (seek, checked, with the
    sequential fallback), corrupt counted over the frames it keeps (the ones scored).

CPU seconds are this process's plus its ffmpeg children's, per video; the two seek modes
run ``--repeats`` times, alternating, and report their medians. Then the
false-alarm rate of :func:`~deepaudit.pipeline.media.frame_defect` on the clean frames of
the shared data: ``--fa-frames`` frames of every video decoded sequentially, and every
image. Prints one JSON line; ``--record`` appends it, with date, commit and machine, to
``bench/results/decode.jsonl``.

    python bench/decode_bench.py [--minutes 10] [--generated 1] [--ffpp 2] [--frames 16]
                                 [--repeats 3]
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import ffmpeg
import numpy as np
import typer
from record import append_record, git_commit, machine  # bench/record.py, beside this script

from deepaudit.infra.mediatypes import IMAGE_EXTENSIONS
from deepaudit.infra.storage import StorageConfig
from deepaudit.pipeline.media import (
    DecodeConfig,
    decode_sampled,
    frame_defect,
    open_source,
    output_size,
    probe,
    sample_indices,
)

MIN_PSNR_DB = 35.0
# FF++ clips looped, in this order: x264 core 148 at 480p (the 033) and at 720p,
# then core 152 (no decoder quirk).
FFPP_DEFAULT = ["ffpp_c23_original__033__mosahil.mp4", "ffpp_c23_Deepfakes__263_284__mosahil.mp4",
                "ffpp_c23_original__828__mosahil.mp4"]


def cpu_now() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def ffmpeg_run(*args: str) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True)


def make_generated(folder: Path, i: int, minutes: float, segment: int) -> Path:
    seg = folder / f"gen{i}_seg.mp4"
    ffmpeg_run("-f", "lavfi", "-i", f"testsrc2=s=1280x720:r=25:d={segment},hue=h={30 + 40 * i}",
               "-c:v", "libx264", "-preset", "veryfast", "-bf", "3", "-pix_fmt", "yuv420p",
               "-x264-params", "open-gop=1:keyint=250:min-keyint=250:scenecut=0", str(seg))
    return loop_to(seg, folder / f"gen{i}_{minutes:g}min.mp4", minutes)


def loop_to(src: Path, dst: Path, minutes: float) -> Path:
    ffmpeg_run("-stream_loop", "-1", "-i", str(src), "-map", "0:v:0", "-c", "copy",
               "-t", f"{minutes * 60:g}", str(dst))
    return dst


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def old_seek(path: Path, info, cfg: DecodeConfig) -> dict[int, np.ndarray]:
    """The seek path as it was: -ss at idx / fps to the millisecond, errors not read."""
    w, h = output_size(info.width, info.height, cfg.max_side)
    out = {}
    for idx in sample_indices(info.n_frames, cfg.frames):
        args = (ffmpeg.input(str(path), loglevel="error", ss=f"{idx / info.fps:.3f}", threads=1,
                             filter_threads=1).video.filter("scale", w, h)
                .output("pipe:", format="rawvideo", pix_fmt="rgb24", vframes=1).compile())
        data = subprocess.run(args, capture_output=True).stdout
        if len(data) >= w * h * 3:
            out[idx] = np.frombuffer(data[: w * h * 3], np.uint8).reshape(h, w, 3)
    return out


def measure(path: Path, frames: int, repeats: int) -> dict:
    cfg = DecodeConfig(frames=frames)
    seq_cfg = DecodeConfig(frames=frames, seek_spacing_s=1e12)
    old_cpus, new_cpus = [], []
    with open_source(str(path), StorageConfig(), cfg) as src:
        info = probe(src, str(path), cfg)
        t = cpu_now()
        ref = decode_sampled(src, info, seq_cfg)
        seq_cpu = cpu_now() - t
        # The two seek modes alternate, median of each: other work on the machine moves
        # a single reading by 10-30 %.
        for _ in range(repeats):
            t = cpu_now()
            old = old_seek(path, info, cfg)
            old_cpus.append(cpu_now() - t)
            t = cpu_now()
            new = decode_sampled(src, info, cfg)
            new_cpus.append(cpu_now() - t)
    old_cpu, new_cpu = statistics.median(old_cpus), statistics.median(new_cpus)
    truth = dict(zip(ref.indices, ref.frames))

    def corrupt(got: dict[int, np.ndarray]) -> int:
        return int(sum(i not in truth or psnr(f, truth[i]) < MIN_PSNR_DB for i, f in got.items()))

    old_bad = corrupt(old)
    return {
        "video": path.name, "duration_s": round(info.duration_s, 1),
        "size": f"{info.width}x{info.height}",
        "old_seek": {"cpu_s": round(old_cpu, 2), "frames": len(old), "corrupt": old_bad,
                     "caught_by_frame_defect": int(sum(
                         frame_defect(f) is not None for i, f in old.items()
                         if i not in truth or psnr(f, truth[i]) < MIN_PSNR_DB))},
        "sequential": {"cpu_s": round(seq_cpu, 2), "frames": len(ref.indices), "corrupt": 0,
                       "dropped": len(ref.dropped)},
        "new": {"cpu_s": round(new_cpu, 2), "frames": len(new.indices),
                "corrupt": corrupt(dict(zip(new.indices, new.frames))), "mode": new.mode,
                "warnings": new.warnings, "dropped": len(new.dropped)},
    }


def summarise(rows: list[dict]) -> dict:
    out = {"videos": len(rows)}
    for mode in ("old_seek", "sequential", "new"):
        frames = sum(r[mode]["frames"] for r in rows)
        bad = sum(r[mode]["corrupt"] for r in rows)
        out[mode] = {"cpu_s_per_video": round(sum(r[mode]["cpu_s"] for r in rows) / len(rows), 2),
                     "corrupt_share": round(bad / max(1, frames), 4),
                     "corrupt_frames": bad, "frames": frames}
    out["new_over_old_seek_cpu"] = round(out["new"]["cpu_s_per_video"]
                                         / max(1e-9, out["old_seek"]["cpu_s_per_video"]), 3)
    return out


def false_alarms(shared: Path, frames: int) -> dict:
    """frame_defect on clean frames: every shared video decoded sequentially (the frames
    the video shows) and every shared image."""
    import cv2

    cfg = DecodeConfig(frames=frames, seek_spacing_s=1e12)
    videos = images = flagged = 0
    which = []
    for path in sorted(shared.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in (".mp4", ".avi", ".mov", ".webm",
                                                              ".mkv", *IMAGE_EXTENSIONS):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if img is None:
                continue
            batch = [cv2.cvtColor(img, cv2.COLOR_BGR2RGB)]
            images += 1
        else:
            try:
                with open_source(str(path), StorageConfig(), cfg) as src:
                    batch = list(decode_sampled(src, probe(src, str(path), cfg), cfg).frames)
            except Exception as exc:  # counted as not measured
                print(f"skip {path.name}: {exc}", file=sys.stderr)
                continue
            videos += len(batch)
        for f in batch:
            if frame_defect(f) is not None:
                flagged += 1
                which.append(f"{path.relative_to(shared)}: {frame_defect(f)}")
    total = videos + images
    return {"video_frames": videos, "images": images, "flagged": flagged,
            "false_alarm_rate": round(flagged / max(1, total), 5), "flagged_items": which[:20]}


def main(
    minutes: Annotated[float, typer.Option(help="Length of each long video.")] = 10.0,
    generated: Annotated[int, typer.Option(help="Generated 720p open-GOP videos.")] = 1,
    segment: Annotated[int, typer.Option(help="Seconds encoded before looping.")] = 30,
    ffpp: Annotated[int, typer.Option(help="Shared FF++ c23 clips looped to length.")] = 2,
    frames: Annotated[int, typer.Option(help="Frames sampled per video.")] = 16,
    repeats: Annotated[int, typer.Option(help="Runs of each seek mode (median).")] = 3,
    fa_frames: Annotated[int, typer.Option(help="Frames per shared video, false alarms.")] = 16,
    shared: Annotated[Optional[Path], typer.Option(
        help="Shared data (default: $DEEPAUDIT_SHARED_DATA or ../shared/data).")] = None,
    workdir: Annotated[Optional[Path], typer.Option(help="Where the long videos go.")] = None,
    record: Annotated[bool, typer.Option(help="Append the line to bench/results/.")] = False,
) -> None:
    root = Path(__file__).resolve().parents[1]
    shared = shared or Path(os.environ.get("DEEPAUDIT_SHARED_DATA",
                                           root.parent / "shared" / "data"))
    started, commit = time.time(), git_commit()  # before: others may commit meanwhile
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = Path(tmp)
        groups: dict[str, list[dict]] = {"generated": [], "ffpp": []}
        for i in range(generated):
            path = make_generated(folder, i, minutes, segment)
            groups["generated"].append(measure(path, frames, repeats))
            print(json.dumps(groups["generated"][-1]), file=sys.stderr, flush=True)
            path.unlink()
        clips = {p.name: p for p in (shared / "train" / "videos").glob("*/ffpp_c23_*.mp4")}
        picked = [clips[n] for n in FFPP_DEFAULT if n in clips]
        picked += [p for n, p in sorted(clips.items()) if p not in picked]
        for src in picked[:ffpp]:
            path = loop_to(src, folder / f"{src.stem}_{minutes:g}min.mp4", minutes)
            groups["ffpp"].append(measure(path, frames, repeats))
            print(json.dumps(groups["ffpp"][-1]), file=sys.stderr, flush=True)
            path.unlink()
    fa = false_alarms(shared, fa_frames) if shared.is_dir() else None
    result = {
        "bench": "decode",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "commit": commit,
        "machine": machine(),
        "minutes": minutes,
        "frames": frames,
        "repeats": repeats,
        **{name: summarise(rows) for name, rows in groups.items() if rows},
        "per_video": [r for rows in groups.values() for r in rows],
        "frame_defect_false_alarms": fa,
        "wall_s": round(time.time() - started, 1),
    }
    print(json.dumps(result))
    if record:
        append_record(Path(__file__).parent / "results" / "decode.jsonl", result)


if __name__ == "__main__":
    typer.run(main)
