"""What the classifier costs per crop and per video, for each model named, in one run.

Each model scores the same batches of face crops through the audit's own ``ClassifyStage``
(trunk on batched crops, then the LSTM per video), with the torch threads the audit plan
gives a CPU classifier. Models take turns, round by round, so drift on a noisy machine
falls on all of them; the line reports medians, and each model's cost as a ratio of the
first model's. Prints one JSON line; ``--record`` appends it, with date, commit and
machine, to ``bench/results/classifier_cost.jsonl``.

    python bench/classifier_cost.py resnext_lstm effnet_lite0_lstm
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
    result = {"videos": videos, "frames": frames, "rounds": rounds, "models": []}
    base = None
    for h, size, w, c in zip(handles, size_list, wall, cpu):
        ms = float(np.median(w)) / (videos * frames) * 1e3
        base = base or ms
        result["models"].append({
            "model": h.model_id, "input_size": size, "ms_per_crop": round(ms, 2),
            "cpu_s_per_video": round(float(np.median(c)) / videos, 3),
            "ratio_to_first": round(ms / base, 3)})
    line = json.dumps(result)
    print(line)
    if record:
        append_record(Path(__file__).parent / "results" / "classifier_cost.jsonl", result)


if __name__ == "__main__":
    typer.run(main)
