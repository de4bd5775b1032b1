"""Soak: does the driver's memory stay flat, and throughput steady, as the archive grows?

Builds a Parquet manifest of ``--rows`` rows from a few small real media made locally
(``deepaudit.pipeline.demo_media``: the bundled face photos as JPEG/PNG, one face swap still,
a faceless photo, and short Ken Burns clips), repeated under distinct media ids
(``soak-000000``, ...): mostly images, one row in ``--clip-every`` a clip. Then runs ONE
audit of it on a local Ray (default model, no evidence) and watches the driver:

* its RSS (``VmRSS`` of /proc/self/status), sampled by a background thread every second
  and on every progress callback; ``rss_mb`` holds the peak so far when the rows done
  first reach 10 %, 50 % and 100 % of the rows (1k, 5k and 10k with the default rows);
* items/s in consecutive windows of 10 % of the rows, timed from the first rows out (Ray's
  start-up and the actors' warm-up are ``startup_s``, not a window); a window boundary's
  time is interpolated between the progress callbacks around it (rows arrive in batches).
  ``throughput_slope`` is the least-squares slope of window items/s against window index,
  divided by the windows' mean: the fraction of the mean gained (or, negative, lost) per
  window. Rows come back a block at a time (up to 32 rows; ``rows_per_callback``), so the
  windows mean something only when they span many blocks: with the default 10,000 rows
  ~30 blocks each; a few hundred rows give noise (the last blocks often arrive together).
  ``trace`` names a file with every callback's (seconds, rows done, peak RSS MiB).
* CPU per window, to tell a pipeline that slows down from a machine that gets busier:
  ``cpu_ms_per_item`` is the CPU time per item of the driver and of everything under it
  (``pipeline``: Ray's processes, the actors and their ffmpeg runs), and
  ``other_cores`` how many cores the rest of the machine used meanwhile (``/proc/stat``
  busy time minus the pipeline's). ``cpu_slope`` is ``pipeline``'s slope, as above: a
  pipeline whose work per item grows has it positive.

The issue's goal: RSS at 100 % within 1.2x of RSS at 10 % (``rss_ratio``), and throughput
that does not decay (``throughput_slope`` not below ``-max_decay``). Prints one JSON line;
``--record`` appends it, with date, commit and machine, to ``bench/results/soak.jsonl``.

    python bench/soak.py [--rows 10000] [--workdir bench-out/soak] [--record]
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from record import append_record  # bench/record.py, beside this script

MARKS = (0.10, 0.50, 1.00)
WINDOWS = 10
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _status_mb(*fields: str) -> dict[str, float]:
    """Fields of /proc/self/status (kB), in MiB."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in fields:
                found[name] = int(value.split()[0]) / 1024
    return found


def rss_mb() -> float:
    """This process's resident set size, in MiB."""
    return _status_mb("VmRSS").get("VmRSS", float("nan"))


def rss_parts_mb() -> dict[str, float]:
    """This process's RSS now, by kind: ``anon`` (its own heap), ``file`` (mapped files,
    libraries) and ``shmem`` (shared memory it has touched: Ray's object store pages)."""
    parts = _status_mb("RssAnon", "RssFile", "RssShmem")
    return {name[3:].lower(): round(mb, 1) for name, mb in parts.items()}


def hwm_mb() -> float:
    """This process's peak resident set size since it started (VmHWM), in MiB."""
    return _status_mb("VmHWM").get("VmHWM", float("nan"))


def _proc_stat(pid: str) -> tuple[int, float]:
    """(parent pid, CPU-s of the process and of its children it has waited for)."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), sum(int(x) for x in fields[11:15]) / CLOCK_TICKS


def cpu_seconds() -> tuple[float, float, float]:
    """CPU-s so far of (this process, it and all its descendants, the whole machine)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                parents[int(name)], cpu[int(name)] = _proc_stat(name)
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
    me = os.getpid()
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    tree, todo = 0.0, [me]
    while todo:
        pid = todo.pop()
        tree += cpu.get(pid, 0.0)
        todo.extend(children.get(pid, ()))
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    busy = sum(ticks[:3]) + sum(ticks[5:8])  # all but idle and iowait
    return cpu.get(me, 0.0), tree, busy / CLOCK_TICKS


def media_paths(folder: Path, clip_seconds: float) -> tuple[list[Path], list[Path]]:
    """The soak's media under ``folder``: (images, clips)."""
    images = [folder / n for n in ("astronaut.png", "grace_hopper.jpg", "cameraman.jpg",
                                   "astronaut_swap_grace_hopper.jpg", "coffee.jpg")]
    clips = [folder / f"{face}_{clip_seconds:g}s.mp4" for face in ("astronaut", "grace_hopper")]
    return images, clips


def make_media(folder: Path, clip_seconds: float) -> tuple[list[Path], list[Path]]:
    """A few small images and clips under ``folder`` (made once): (images, clips).

    Made in a child process: demo_media loads RetinaFace, matplotlib and scikit-image,
    which the audit's driver never does, and they would sit in the RSS measured here."""
    import multiprocessing

    images, clips = media_paths(folder, clip_seconds)
    if not all(p.is_file() for p in images + clips):
        child = multiprocessing.get_context("spawn").Process(
            target=_make_media, args=(folder, clip_seconds))
        child.start()
        child.join()
        if child.exitcode != 0 or not all(p.is_file() for p in images + clips):
            raise RuntimeError(f"making the soak media under {folder} failed "
                               f"(exit {child.exitcode})")
    return images, clips


def _make_media(folder: Path, clip_seconds: float) -> None:
    import cv2

    from deepaudit.pipeline.demo_media import (
        blend_face,
        face_photos,
        make_test_clip,
        no_face_photos,
    )

    folder.mkdir(parents=True, exist_ok=True)
    image_paths, clip_paths = media_paths(folder, clip_seconds)
    images = {p.name: p for p in image_paths}
    if not all(p.is_file() for p in images.values()):
        faces, others = face_photos(), no_face_photos()
        photos = {"astronaut.png": faces["astronaut"],
                  "grace_hopper.jpg": faces["grace_hopper"],
                  "cameraman.jpg": faces["cameraman"],
                  "astronaut_swap_grace_hopper.jpg": blend_face(faces["astronaut"],
                                                                faces["grace_hopper"]),
                  "coffee.jpg": others["coffee"]}
        for name, rgb in photos.items():
            tmp = folder / f".tmp-{name}"  # renamed into place: never half-written
            if not cv2.imwrite(str(tmp), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
                raise RuntimeError(f"could not write {tmp}")
            tmp.replace(images[name])
    for face, path in zip(("astronaut", "grace_hopper"), clip_paths):
        if not path.is_file():
            tmp = folder / f".tmp-{path.name}"
            make_test_clip(tmp, seconds=clip_seconds, size=(320, 240), face=face)
            tmp.replace(path)


def write_manifest(path: Path, rows: int, images: list[Path], clips: list[Path],
                   clip_every: int, real_every: int = 1) -> int:
    """The soak manifest (Parquet: uri, media_id, kind); returns how many rows are clips.
    ``real_every`` > 1: only one row in that many is real media, the others a zero-byte
    file (an ``empty:`` error row at once, no decode): the driver's work per row and per
    block stays, the workers' shrinks (bench/chaos.py's 100k-row memory run)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    uris, kinds = [], []
    n_img = n_clip = 0
    empty = images[0].parent / "empty.jpg"
    if real_every > 1:
        empty.write_bytes(b"")
    for i in range(rows):
        if real_every > 1 and i % real_every:
            uris.append(str(empty.absolute()))
            kinds.append("empty")
        elif clip_every and i % clip_every == clip_every - 1:
            uris.append(str(clips[n_clip % len(clips)].absolute()))
            kinds.append("video")
            n_clip += 1
        else:
            uris.append(str(images[n_img % len(images)].absolute()))
            kinds.append("image")
            n_img += 1
    table = pa.table({"uri": uris, "media_id": [f"soak-{i:06d}" for i in range(rows)],
                      "kind": kinds})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return n_clip


class Watch:
    """The driver's RSS (peak so far) and the progress callbacks' (time, rows done)."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.lock = threading.Lock()
        self.peak = rss_mb()
        self.t0 = time.perf_counter()
        self.points: list[tuple[float, int, float]] = []  # (seconds, done, peak so far)
        self.marks: dict[str, dict] = {}
        # (rows done, seconds, driver CPU-s, pipeline CPU-s, machine CPU-s) per callback
        self.cpu: list[tuple[int, float, float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="soak-rss", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(1.0):
            self.sample()

    def sample(self) -> float:
        now = rss_mb()
        with self.lock:
            self.peak = max(self.peak, now)
            return self.peak

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def on_rows(self, done: int, total: int) -> None:
        peak = self.sample()
        t = time.perf_counter() - self.t0
        self.points.append((t, done, peak))
        self.cpu.append((done, t, *cpu_seconds()))
        for frac in MARKS:
            key = f"{round(frac * 100)}%"
            if key not in self.marks and done >= round(frac * self.rows):
                self.marks[key] = {"rows": done, "seconds": round(t, 1),
                                   "rss_mb": round(peak, 1), "rss_now_mb": rss_parts_mb()}

    def time_at(self, rows: float) -> float | None:
        """When ``rows`` were done, interpolated between the callbacks around it."""
        prev = None
        for t, done, _ in self.points:
            if done >= rows:
                if prev is None or done == prev[1]:
                    return t
                return prev[0] + (t - prev[0]) * (rows - prev[1]) / (done - prev[1])
            prev = (t, done)
        return None

    def windows(self) -> tuple[float | None, list[float | None]]:
        """Time to the first rows out, and items/s in each window of 10 % of the rows."""
        first = next(((t, d) for t, d, _ in self.points if d > 0), None)
        if first is None:
            return None, [None] * WINDOWS
        width = self.rows / WINDOWS
        out: list[float | None] = []
        for k in range(WINDOWS):
            lo, hi = k * width, (k + 1) * width
            t_hi = self.time_at(hi)
            if t_hi is None or hi <= first[1]:
                out.append(None)  # the first batch already covered it: no window to time
                continue
            t_lo, lo = (first[0], first[1]) if lo < first[1] else (self.time_at(lo), lo)
            out.append(round((hi - lo) / (t_hi - t_lo), 3) if t_hi > t_lo else None)
        return first[0], out


    def cpu_windows(self) -> dict:
        """CPU per item in each window of 10 % of the rows (from the first callback at or
        past each boundary): the driver's, the pipeline's, and the cores the rest of the
        machine used meanwhile."""
        driver, pipeline, other = [], [], []
        width = self.rows / WINDOWS
        for k in range(WINDOWS):
            lo = next((c for c in self.cpu if c[0] >= k * width and c[0] > 0), None)
            hi = next((c for c in self.cpu if c[0] >= (k + 1) * width), None)
            if lo is None or hi is None or hi[0] <= lo[0] or hi[1] <= lo[1]:
                for values in (driver, pipeline, other):
                    values.append(None)
                continue
            n, dt = hi[0] - lo[0], hi[1] - lo[1]
            driver.append(round((hi[2] - lo[2]) / n * 1e3, 1))
            pipeline.append(round((hi[3] - lo[3]) / n * 1e3, 1))
            other.append(round(((hi[4] - lo[4]) - (hi[3] - lo[3])) / dt, 2))
        return {"cpu_ms_per_item": {"driver": driver, "pipeline": pipeline},
                "other_cores": other}


def slope(values: list[float | None]) -> float | None:
    """Least-squares slope of values against their index, over the mean (None-skipping)."""
    pts = [(i, v) for i, v in enumerate(values) if v is not None]
    if len(pts) < 2:
        return None
    n = len(pts)
    mx, my = sum(i for i, _ in pts) / n, sum(v for _, v in pts) / n
    sxx = sum((i - mx) ** 2 for i, _ in pts)
    sxy = sum((i - mx) * (v - my) for i, v in pts)
    return round(sxy / sxx / my, 4) if sxx and my else None


def main(
    rows: Annotated[int, typer.Option(help="Manifest rows (distinct media ids).")] = 10_000,
    workdir: Annotated[Path, typer.Option(help="Media, manifest and audit output.")] = Path(
        "bench-out/soak"),
    clip_every: Annotated[int, typer.Option(help="One row in this many is a clip "
                                                 "(0: images only).")] = 50,
    clip_seconds: Annotated[float, typer.Option(help="Length of the clips.")] = 2.0,
    real_every: Annotated[int, typer.Option(help="One row in this many is real media, the "
                                                 "others a zero-byte file (1: all real).")] = 1,
    model: Annotated[str, typer.Option(help="Model name or checkpoint card "
                                            "(default: the audit's).")] = "",
    num_cpus: Annotated[int, typer.Option(help="CPUs for the local Ray (0: all).")] = 0,
    roll_rows: Annotated[int, typer.Option(help="Rows per verdict file (0: the audit's "
                                                "default).")] = 0,
    roll_seconds: Annotated[float, typer.Option(help="Seconds per verdict file (0: the "
                                                     "audit's default).")] = 0.0,
    max_decay: Annotated[float, typer.Option(help="Goal: throughput_slope >= -max_decay "
                                                  "(fraction of the mean per window).")] = 0.01,
    record: Annotated[bool, typer.Option(help="Append the line to bench/results/.")] = False,
) -> None:
    import ray

    from deepaudit.pipeline.audit import AuditConfig, run_audit

    if rows < WINDOWS or real_every < 1:
        raise typer.BadParameter(f"--rows must be at least {WINDOWS}, --real-every >= 1")
    workdir = workdir.absolute()
    images, clips = make_media(workdir / "media", clip_seconds)
    manifest = workdir / f"manifest-{rows}.parquet"
    n_clips = write_manifest(manifest, rows, images, clips, clip_every, real_every)
    n_empty = rows - -(-rows // real_every) if real_every > 1 else 0

    cfg = AuditConfig(manifest=str(manifest), output=str(workdir / "out"),
                      model=model or None, num_cpus=num_cpus or None, evidence=False)
    if roll_rows:
        cfg = replace(cfg, roll_rows=roll_rows)
    if roll_seconds:
        cfg = replace(cfg, roll_seconds=roll_seconds)
    rss_before = rss_mb()
    watch = Watch(rows)
    watch.start()
    try:
        summary = run_audit(cfg, on_rows=watch.on_rows)
    finally:
        watch.stop()
        ray.shutdown()
    seconds = time.perf_counter() - watch.t0
    startup, windows = watch.windows()
    slope_ = slope(windows)
    rss = {k: watch.marks.get(k, {}).get("rss_mb") for k in ("10%", "50%", "100%")}
    ratio = round(rss["100%"] / rss["10%"], 3) if rss["10%"] and rss["100%"] else None
    steps = sorted(b - a for (_, a, _), (_, b, _) in zip(watch.points, watch.points[1:])
                   if b > a)
    steps = [watch.points[0][1]] + steps if watch.points else steps
    trace = workdir / f"trace-{rows}.json"  # every callback: seconds, rows done, peak RSS MiB
    trace.write_text(json.dumps({"run_id": summary["run_id"], "points": watch.points,
                                 "cpu": watch.cpu}))
    cpu = watch.cpu_windows()
    run_dir = Path(summary["output"])
    parquet = sorted(run_dir.rglob("*.parquet"))
    result = {
        "rows": rows,
        "images": rows - n_clips - n_empty,
        "clips": n_clips,
        "empty": n_empty,
        "clip_seconds": clip_seconds,
        "model": summary["model"],
        "state": summary["state"],
        "seconds": round(seconds, 1),
        "startup_s": round(startup, 1) if startup is not None else None,
        "items_per_s": round(rows / seconds, 3),
        "rss_mb_before": round(rss_before, 1),
        "rss_mb": rss,
        "marks": watch.marks,
        "rss_ratio": ratio,
        "rss_mb_hwm": round(hwm_mb(), 1),
        "window_items_per_s": windows,
        # Rows arrive in blocks: windows much wider than a block give steady figures.
        "rows_per_callback": {"median": steps[len(steps) // 2] if steps else None,
                              "max": max(steps, default=None)},
        "throughput_slope": slope_,
        **cpu,
        "cpu_slope": slope(cpu["cpu_ms_per_item"]["pipeline"]),
        "parquet_files": len(parquet),
        "files_in_summary": len(summary["files"]),
        "roll": summary["roll"],
        "plan": summary["plan"],
        "cluster": summary["cluster"],
        "status": summary["status"],
        "rows_out": summary["rows_out"],
        "rows_out_ok": summary["rows_out"] == rows,
        "goal": {"rss_ratio_max": 1.2, "max_decay": max_decay,
                 "rss_ok": ratio is not None and ratio <= 1.2,
                 "throughput_ok": slope_ is not None and slope_ >= -max_decay},
        "num_cpus": num_cpus or os.cpu_count(),
        "trace": str(trace),
    }
    print(json.dumps(result))
    if record:
        append_record(Path(__file__).parent / "results" / "soak.jsonl", result)
    if not result["rows_out_ok"]:
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
