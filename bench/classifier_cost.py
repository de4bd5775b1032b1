"""What the classifier costs per crop and per video, for each model named, in one run.

Each model scores the same batches of face crops through the audit's own ``ClassifyStage``
(trunk on batched crops, then the LSTM per video), with the torch threads the audit plan
gives a CPU classifier. Models take turns, round by round, so drift on a noisy machine
falls on all of them; the line reports medians, and each model's cost as a ratio of the
first model's. Each detector branch is also timed alone, per crop, at one thread
(``branch_ms_per_crop``). Prints one JSON line; ``--record`` appends it, with date,
commit and machine, to ``bench/results/classifier_cost.jsonl``; ``--write-card`` stores
the first model's ``cost`` (single-thread CPU ms per sampled frame, per branch) in its
card, where the audit's actor plan reads it.

    python bench/classifier_cost.py effnet_lite0_lstm clip_effnet_fused --threads 1
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from record import append_record  # bench/record.py, beside this script


def main(
    models: Annotated[list[str], typer.Argument(help="Model names or checkpoint cards; the "
                                                     "first is the yardstick.")],
    videos: Annotated[int, typer.Option(help="Videos per round.")] = 8,
    frames: Annotated[int, typer.Option(help="Crops per video.")] = 16,
    rounds: Annotated[int, typer.Option()] = 5,
    threads: Annotated[int, typer.Option(help="torch threads (0: torch's default).")] = 0,
    sizes: Annotated[str, typer.Option(help="Crop size per model, comma-separated "
                                            "(default: each card's).")] = "",
    record: Annotated[bool, typer.Option(help="Append the line to bench/results/.")] = False,
    write_card: Annotated[bool, typer.Option(
        help="Write the first model's measured cost into its card (a .json path).")] = False,
) -> None:
    import pyarrow as pa

    from deepaudit.models.checkpoint import resolve_model
    from deepaudit.pipeline.schema import CROP_SCHEMA, table_from_rows
    from deepaudit.pipeline.stages import ClassifyConfig, ClassifyStage

    handles = [resolve_model(m) for m in models]
    size_list = [int(s) for s in sizes.split(",")] if sizes else [h.config.input_size
                                                                  for h in handles]
    stages, batches = [], []
    rng = np.random.default_rng(0)
    for h, size in zip(handles, size_list):
        h = replace(h, config=replace(h.config, input_size=size))
        stages.append(ClassifyStage(h, ClassifyConfig(device="cpu", crop_batch=16,
                                                      threads=threads)))
        rows = [{"status": "ok", "media_id": f"v{i}", "n_frames_with_face": frames,
                 "crop_size": size,
                 "crops": rng.integers(0, 255, (frames, size, size, 3), np.uint8).tobytes()}
                for i in range(videos)]
        batches.append(table_from_rows(rows, CROP_SCHEMA))
    for stage, batch in zip(stages, batches):  # warm-up
        stage(batch.slice(0, 1))
    wall: list[list[float]] = [[] for _ in stages]
    cpu: list[list[float]] = [[] for _ in stages]
    for _ in range(rounds):
        for k, (stage, batch) in enumerate(zip(stages, batches)):
            t0, c0 = time.perf_counter(), time.process_time()
            out = stage(batch)
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
            assert isinstance(out, pa.Table) and out.num_rows == videos
    result = {"videos": videos, "frames": frames, "rounds": rounds, "threads": threads,
              "models": []}
    base = None
    for h, stage, size, w, c in zip(handles, stages, size_list, wall, cpu):
        ms = float(np.median(w)) / (videos * frames) * 1e3
        base = base or ms
        branches = branch_costs(stage.model, size, h.config, rounds)
        result["models"].append({
            "model": h.model_id, "input_size": size, "ms_per_crop": round(ms, 2),
            "cpu_s_per_video": round(float(np.median(c)) / videos, 3),
            "ratio_to_first": round(ms / base, 3), **branches})
    line = json.dumps(result)
    print(line)
    if record:
        append_record(Path(__file__).parent / "results" / "classifier_cost.jsonl", result)
    if write_card:
        if handles[0].weights_path is None:
            raise typer.BadParameter(f"{models[0]} has no card to write into")
        write_cost(handles[0].weights_path, result["models"][0])


def branch_costs(model, size: int, config, rounds: int) -> dict:
    """Single-thread ms per crop of each branch the model runs on CPU, the crops each
    reads per video (the card's ``branch_frames``), and the CPU ms per decoded frame that
    gives with the frames the audit decodes on CPU (``config.frames_for("cpu")``)."""
    import torch

    crops = torch.from_numpy(np.random.default_rng(1).integers(0, 255, (4, size, size, 3),
                                                                np.uint8))
    decoded = config.frames_for("cpu")
    reads = {name: r["cpu"] for name, r in (config.branch_frames or {}).items()}
    timings = {}
    if hasattr(model, "clip_logits"):
        timings["clip"] = lambda: model.clip_logits(crops)
        reads.setdefault("clip", min(getattr(model, "clip_frames", None) or decoded, decoded))
    if not getattr(model, "clip_only", False):  # a CNN weight of 0: the CNN is not run
        timings["cnn"] = lambda: (model.cnn if hasattr(model, "cnn") else model).raw_scores(
            crops, [len(crops)], 16)
        reads.setdefault("cnn", decoded)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for name, fn in timings.items():
            fn()  # warm-up
            runs = []
            for _ in range(max(1, rounds // 2)):
                t0 = time.process_time()
                fn()
                runs.append((time.process_time() - t0) / len(crops) * 1e3)
            out[name] = round(float(np.median(runs)), 1)
    finally:
        torch.set_num_threads(before)
    per_video = sum(out[name] * reads[name] for name in out)
    return {"branch_ms_per_crop": out,
            "branch_crops_per_video": {name: reads[name] for name in out},
            "frames_decoded": decoded, "cpu_ms_per_frame": round(per_video / decoded, 1)}


def write_cost(card_path: str, measured: dict) -> None:
    from datetime import datetime, timezone

    path = Path(card_path).with_suffix(".json")
    card = json.loads(path.read_text())
    card["cost"] = {"cpu_ms_per_frame": measured["cpu_ms_per_frame"],
                    "branch_ms_per_crop": measured["branch_ms_per_crop"],
                    "branch_crops_per_video": measured["branch_crops_per_video"],
                    "frames": measured["frames_decoded"], "threads": 1,
                    "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "by": "bench/classifier_cost.py (process CPU time, one torch thread)"}
    path.write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    typer.run(main)
