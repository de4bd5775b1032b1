"""What a cheaper CLIP tower does to a card's verdicts (issue 30, item 3): every labelled
item of ``--data`` scored by the card as it is (the float tower) and with
``clip_tower`` set to a candidate of models/clip_fast.py, on CPU, item by item, on the
frames the audit reads on CPU (the card's ``frames_for("cpu")``, evenly spaced over the
training crop cache's frames; items that cache lacks are counted and left out). Prints
one JSON line: max and mean |delta p_fake|, the items whose verdict flips at the card's
threshold, and the ROC AUC with either tower; appended to
``bench/results/clip_tower.jsonl`` (bench ``clip_tower_scores``).
``--data`` is for reporting only: nothing is chosen on it.

    python bench/clip_tower_scores.py --candidate int8x2
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

RESULTS = Path(__file__).parent / "results" / "clip_tower.jsonl"


def main(
    candidate: Annotated[str, typer.Option(help="A name from models/clip_fast.py.")]
        = "int8x2",
    model: Annotated[str, typer.Option(help="Model name or card.")] = "clip_effnet_fused",
    data: Annotated[str, typer.Option(help="Labelled input (folder with MANIFEST.tsv).")]
        = "../shared/data",
    cache_frames: Annotated[int, typer.Option(help="Frames per video in the crop cache.")]
        = 16,
    record: Annotated[bool, typer.Option(help="Append to bench/results.")] = True,
) -> None:
    import torch
    from record import append_record

    from deepaudit.infra.storage import StorageConfig
    from deepaudit.models.checkpoint import resolve_model
    from deepaudit.models.metrics import roc_auc
    from deepaudit.pipeline.media import sample_indices
    from deepaudit.training.crop_cache import (
        CropCacheConfig,
        item_key,
        load_crops,
        quick_fingerprints,
        read_index,
    )
    from deepaudit.training.datasets import load_inputs

    t0 = time.perf_counter()
    torch.set_num_threads(1)
    handle = resolve_model(model)
    if handle.weights_path is None:
        raise typer.BadParameter(f"{model} has no trained weights")
    cfg = handle.config
    if "clip_frames" not in cfg.arch_kwargs:
        raise typer.BadParameter(f"{model} has no CLIP branch")
    fast = replace(handle, config=replace(
        cfg, arch_kwargs={**cfg.arch_kwargs, "clip_tower": candidate}))
    models = {"float": handle.load("cpu"), candidate: fast.load("cpu")}
    k = cfg.frames_for("cpu")
    labelled = load_inputs([data], StorageConfig())
    # The items the training crop cache holds with a face (nothing is decoded here).
    cache = CropCacheConfig(frames=cache_frames, size=cfg.input_size)
    rows = labelled.table.to_pylist()
    quick = quick_fingerprints([r["uri"] for r in rows], cache.storage())
    index = {r["item_key"]: r for r in read_index(cache).to_pylist()}
    items = [{**r, "item_key": item_key(r["uri"], q)} for r, q in zip(rows, quick)]
    items = [r for r in items if (index.get(r["item_key"]) or {}).get("status") == "ok"]
    crops = load_crops(cache.directory(), [r["item_key"] for r in items])
    p: dict[str, list[float]] = {name: [] for name in models}
    for r in items:
        arr = crops[r["item_key"]][0]
        arr = arr[sample_indices(len(arr), k)] if r["media_type"] == "video" else arr[:1]
        for name, m in models.items():
            p[name].append(float(m.score(arr, [len(arr)]).video_p[0]))
    y = [r["label"] for r in items]
    a, b = np.array(p["float"]), np.array(p[candidate])
    delta = np.abs(b - a)
    thr = cfg.threshold
    worst = int(np.argmax(delta)) if len(delta) else None
    result = {
        "bench": "clip_tower_scores", "model": handle.model_id, "candidate": candidate,
        "data": data, "items": len(items), "not_in_cache_or_faceless": len(rows) - len(items),
        "frames_cpu": k,
        "crops_scored": int(sum(min(k, len(crops[r["item_key"]][0])) if
                                r["media_type"] == "video" else 1 for r in items)),
        "max_abs_delta_p_fake": round(float(delta.max()), 6),
        "mean_abs_delta_p_fake": round(float(delta.mean()), 7),
        "worst_item": items[worst]["uri"].split("/data/")[-1] if worst is not None else None,
        "verdict_flips": int(((a >= thr) != (b >= thr)).sum()), "threshold": thr,
        "auc_float": round(roc_auc(y, a.tolist()), 5),
        f"auc_{candidate}": round(roc_auc(y, b.tolist()), 5),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    line = append_record(RESULTS, result) if record else result
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    typer.run(main)
