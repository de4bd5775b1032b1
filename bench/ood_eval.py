"""Score a model on a labelled media set from the training crop cache: fast recipe choice.

The crops come from the audit's own decode/detect/align stage (``deepaudit train``'s crop
cache, built here if missing), and the scores from the audit's own ``ClassifyStage``, on
the model's ``frames`` evenly spaced frames of each video. ``--perturb`` applies the same
perturbations as ``deepaudit evaluate --perturb`` to the cached crops. Prints one JSON line:
ROC AUC overall, for images and for videos, the false-positive rate on real images at the
card's threshold, per-source AUC and item counts.

    python bench/ood_eval.py runs/lite0/effnet_lite0_lstm.json --data ../shared/data
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Optional

import numpy as np
import typer


def main(
    model: Annotated[str, typer.Argument(help="Model name or checkpoint card.")],
    data: Annotated[str, typer.Option(help="Labelled input (a folder with MANIFEST.tsv, "
                                           "or any train INPUT).")] = "../shared/data",
    train_frames: Annotated[int, typer.Option(help="Frames per video in the cache.")] = 32,
    perturb: Annotated[Optional[str], typer.Option(
        help="Comma-separated perturbations, e.g. jpeg:50,resize:0.5 ('none' is always "
             "reported).")] = None,
    scores_out: Annotated[Optional[str], typer.Option(help="Write per-item scores (JSONL).")]
        = None,
    frame_mean: Annotated[bool, typer.Option(
        help="Score an item by the mean of its frame scores (the frame head) instead of the "
             "video head: for checkpoints whose LSTM is not trained yet.")] = False,
) -> None:
    import pyarrow.compute as pc

    from deepaudit.infra.storage import StorageConfig
    from deepaudit.models.checkpoint import resolve_model
    from deepaudit.models.metrics import binary_metrics, roc_auc
    from deepaudit.models.perturb import apply_perturbation, parse_perturbations
    from deepaudit.pipeline.media import sample_indices
    from deepaudit.pipeline.schema import CROP_SCHEMA, table_from_rows
    from deepaudit.pipeline.stages import ClassifyConfig, ClassifyStage
    from deepaudit.training.crop_cache import CropCacheConfig, build_crop_cache, load_crops
    from deepaudit.training.datasets import load_inputs

    t0 = time.perf_counter()
    handle = resolve_model(model)
    size = handle.config.input_size
    labelled = load_inputs([data], StorageConfig())
    cache = build_crop_cache(labelled.table, CropCacheConfig(frames=train_frames, size=size))
    items = cache.items.filter(pc.equal(cache.items["status"], "ok")).to_pylist()
    crops = load_crops(cache.directory, [r["item_key"] for r in items])
    stage = ClassifyStage(handle, ClassifyConfig())
    perturbations = parse_perturbations(perturb)
    result: dict = {"model": handle.model_id, "data": data, "items": len(items),
                    "without_face": len(cache.items) - len(items),
                    "threshold": handle.config.threshold}
    rows_out = []
    for spec in perturbations:
        rows = []
        for r in items:
            arr = crops[r["item_key"]][0]
            arr = arr[sample_indices(len(arr), handle.config.frames)]
            arr = np.stack([apply_perturbation(c, spec) for c in arr])
            rows.append({"status": "ok", "media_id": r["media_id"], "uri": r["uri"],
                         "n_frames_with_face": len(arr), "crop_size": size,
                         "crops": arr.tobytes()})
        scored = []
        for i in range(0, len(rows), 32):
            scored += stage(table_from_rows(rows[i:i + 32], CROP_SCHEMA)).to_pylist()
        y = [r["label"] for r in items]
        p = [float(np.mean(s["frame_p_fake"])) if frame_mean else s["p_fake"] for s in scored]
        block = {"auc": roc_auc(y, p)}
        for kind in ("image", "video"):
            sel = [k for k, r in enumerate(items) if r["media_type"] == kind]
            block[f"{kind}_auc"] = roc_auc([y[k] for k in sel], [p[k] for k in sel])
            block[f"{kind}_n"] = len(sel)
        real_img = [p[k] for k, r in enumerate(items) if r["media_type"] == "image"
                    and r["label"] == 0]
        block["fpr_real_images"] = float(np.mean(np.array(real_img) >= handle.config.threshold))
        block["by_source"] = {}
        for src in sorted({r["source"] for r in items}):
            sel = [k for k, r in enumerate(items) if r["source"] == src]
            block["by_source"][src] = roc_auc([y[k] for k in sel], [p[k] for k in sel])
        block["overall_at_threshold"] = binary_metrics(y, p, handle.config.threshold).to_dict()
        result[spec.name] = block
        rows_out += [{"perturb": spec.name, "media_id": r["media_id"], "source": r["source"],
                      "media_type": r["media_type"], "label": r["label"], "p_fake": pk}
                     for r, pk in zip(items, p)]
    if scores_out:
        with open(scores_out, "w") as f:
            for row in rows_out:
                f.write(json.dumps(row) + "\n")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    typer.run(main)
