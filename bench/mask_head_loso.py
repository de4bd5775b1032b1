"""Leave-one-source-out check of the learnt localisation head (models/mask_head.py).

Per fold of clip_loso's FOLDS, the head is trained on self-blended (SBI) views and
un-blended views of the training sources' reals, then measured on the held-out
source's reals (CelebA and CelebA-HQ for fake-only sources, left out of training too):

* IoU of the predicted region (probability >= 0.5) with the blended region (the SBI
  mask over its peak, >= 0.5), at 56 x 56, on SBI views: mean and share >= 0.5;
* ``prior_iou``: the same IoU of a constant guess, the mean training SBI region (>= 0.5):
  the bar a head must clear, since SBI face masks are nearly one centred ellipse;
* with ``--partial``, a share of SBI views blended only inside a random blob of the face
  mask (``iou_partial``, ``iou_face`` apart): these test localisation;
* ``real_empty``: the share of un-blended held-out reals with an empty predicted region;
* detection AUC of the head alone: score = mean of the top 5 % pixel probabilities, on
  the held-out source's real fakes against held-out reals (at most 50 + 50 items, one
  frame each).

One frame (the middle one) per item; at most ``--reals`` reals and ``--fakes`` fakes per
source. Prints one JSON line per block and appends it to
``bench/results/mask_head_loso.jsonl``; the last line names the block with the best
mean held-out IoU.

    python bench/mask_head_loso.py --train ../shared/data/train
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from clip_loso import FOLDS, select_items  # bench/clip_loso.py

TOP_SHARE = 0.05  # pooled score: mean of the top 5 % pixel probabilities
AUC_CAP = 50  # per label and fold


def pooled_score(prob: np.ndarray, share: float = TOP_SHARE) -> np.ndarray:
    flat = prob.reshape(len(prob), -1)
    k = max(1, int(round(share * flat.shape[1])))
    return np.sort(flat, axis=1)[:, -k:].mean(axis=1)


def prior_iou(bank: dict, train: np.ndarray, test: np.ndarray) -> dict:
    """IoU of one constant guess, the mean training SBI region, on the test SBI views."""
    from deepaudit.models.mask_head import iou

    masks = bank["masks"]
    prior = masks[train].astype(np.float32).mean(0)
    target = masks[test].astype(np.float32)
    s = iou(np.broadcast_to(prior, target.shape), target)
    out = {"prior_iou": round(float(s.mean()), 4),
           "prior_iou_ge_0_5": round(float((s >= 0.5).mean()), 4)}
    kinds = np.array([bank["meta"][r].get("region", "face") for r in test])
    if (kinds == "partial").any():
        out["prior_iou_partial"] = round(float(s[kinds == "partial"].mean()), 4)
    return out


def run_block(bank: dict, block: int, cfg) -> dict:
    from dataclasses import replace

    from deepaudit.models.metrics import roc_auc
    from deepaudit.training.patch_features import block_tokens, fit_on_bank, iou_metrics, predict

    meta = bank["meta"]
    src = np.array([m["source"] for m in meta])
    view = np.array([m["view"] for m in meta])
    lab = np.array([m["label"] for m in meta])
    has_mask = np.array([m["has_mask"] for m in meta])
    size = bank["masks"].shape[-1]
    folds, t0 = {}, time.perf_counter()
    for fold, (held, pool) in FOLDS.items():
        out = np.isin(src, held + pool)
        head = fit_on_bank(bank, np.where(~out & has_mask)[0], replace(cfg, block=block))
        res = iou_metrics(head, bank, np.where(out & has_mask)[0])
        res.update(prior_iou(bank, np.where(~out & (view == "sbi"))[0],
                             np.where(out & (view == "sbi"))[0]))
        reals = np.where(out & (view == "orig") & (lab == 0))[0][:AUC_CAP]
        fakes = np.where(np.isin(src, held) & (view == "orig") & (lab == 1))[0][:AUC_CAP]
        rows = np.concatenate([reals, fakes])
        if len(reals) and len(fakes):
            s = pooled_score(predict(head, block_tokens(bank, block, rows), size))
            res["auc"] = round(float(roc_auc([0] * len(reals) + [1] * len(fakes), s)), 4)
        # The same score on held-out SBI views against the reals they came from.
        sbi = np.where(out & (view == "sbi"))[0]
        real_all = np.where(out & (view == "orig") & (lab == 0))[0]
        s = pooled_score(predict(head, block_tokens(bank, block, np.concatenate(
            [real_all, sbi])), size))
        res["sbi_auc"] = round(float(roc_auc([0] * len(real_all) + [1] * len(sbi), s)), 4)
        res["n_auc"] = [len(reals), len(fakes)]
        folds[fold] = res
        print(json.dumps({"block": block, "fold": fold, **res}), flush=True)

    def mean(key):
        vals = [f[key] for f in folds.values() if key in f]
        return round(float(np.mean(vals)), 4) if vals else None

    return {"bench": "mask_head_loso", "block": block, "hidden": cfg.hidden,
            "epochs": cfg.epochs, "iou_size": size, "mean_iou": mean("iou_mean"),
            "mean_iou_ge_0_5": mean("iou_ge_0_5"), "mean_auc": mean("auc"),
            "mean_sbi_auc": mean("sbi_auc"), "mean_real_empty": mean("real_empty"),
            "mean_prior_iou": mean("prior_iou"), "mean_iou_partial": mean("iou_partial"),
            "mean_iou_face": mean("iou_face"), "mean_prior_iou_partial": mean("prior_iou_partial"),
            "partial": cfg.features.partial,
            "by_fold": folds, "seconds": round(time.perf_counter() - t0, 1)}


def main(
    train: Annotated[str, typer.Option(help="Training collection.")] = "../shared/data/train",
    blocks: Annotated[str, typer.Option(help="Comma-separated CLIP blocks to compare.")]
        = "4,6,8,12",
    reals: Annotated[int, typer.Option(help="Reals per source (one frame each).")] = 100,
    fakes: Annotated[int, typer.Option(help="Fakes per source, for the AUC.")] = 50,
    epochs: Annotated[int, typer.Option(help="Head training epochs.")] = 12,
    hidden: Annotated[int, typer.Option(help="Head width.")] = 64,
    partial: Annotated[float, typer.Option(
        help="Share of SBI views blended only inside a random blob.")] = 0.0,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
    record: Annotated[bool, typer.Option(help="Append to bench/results/.")] = True,
    prior_only: Annotated[bool, typer.Option(
        help="Only the constant-guess baseline per fold (no head is trained).")] = False,
) -> None:
    import torch
    from record import append_record  # bench/record.py

    from deepaudit.infra.storage import StorageConfig
    from deepaudit.training.crop_cache import CropCacheConfig, build_crop_cache, load_crops
    from deepaudit.training.datasets import load_inputs
    from deepaudit.training.patch_features import (
        MaskHeadConfig,
        PatchConfig,
        build_patch_bank,
        select_items as cap_items,
    )

    torch.set_num_threads(threads)
    wanted = tuple(int(b) for b in blocks.split(","))
    pcfg = PatchConfig(blocks=wanted, max_reals_per_source=reals, max_fakes_per_source=fakes,
                       partial=partial)
    labelled = load_inputs([train], StorageConfig())
    cache = build_crop_cache(labelled.table, CropCacheConfig(frames=16, size=224))
    items = cap_items(select_items(cache.items), pcfg)
    crops = load_crops(cache.directory, [r["item_key"] for r in items])
    t0 = time.perf_counter()
    bank = build_patch_bank(items, crops, cache.key, pcfg, on_progress=lambda n: print(
        f"  embedded {n}", flush=True) if n % 160 == 0 else None)
    print(f"patch bank: {len(bank['meta'])} views, {time.perf_counter() - t0:.0f} s",
          flush=True)
    if prior_only:
        src = np.array([m["source"] for m in bank["meta"]])
        sbi = np.array([m["view"] == "sbi" for m in bank["meta"]])
        folds = {}
        for fold, (held, pool) in FOLDS.items():
            out = np.isin(src, held + pool)
            folds[fold] = prior_iou(bank, np.where(~out & sbi)[0], np.where(out & sbi)[0])
        res = {"bench": "mask_head_loso", "baseline": "constant mean training SBI region",
               "partial": partial, "iou_size": bank["masks"].shape[-1],
               "mean_prior_iou": round(float(np.mean([f["prior_iou"] for f in folds.values()])), 4),
               "by_fold": folds}
        print(json.dumps(res), flush=True)
        if record:
            append_record(Path(__file__).parent / "results" / "mask_head_loso.jsonl", res)
        return
    cfg = MaskHeadConfig(hidden=hidden, epochs=epochs, features=pcfg)
    results = []
    for block in wanted:
        res = run_block(bank, block, cfg)
        results.append(res)
        print(json.dumps(res), flush=True)
        if record:
            append_record(Path(__file__).parent / "results" / "mask_head_loso.jsonl", res)
    best = max(results, key=lambda r: (r["mean_iou"], r["mean_iou_ge_0_5"]))
    choice = {"bench": "mask_head_loso", "choice": True, "block": best["block"],
              "partial": partial,
              "by": "mean held-out IoU", "mean_iou": best["mean_iou"],
              "compared": {r["block"]: r["mean_iou"] for r in results}}
    print(json.dumps(choice), flush=True)
    if record:
        append_record(Path(__file__).parent / "results" / "mask_head_loso.jsonl", choice)


if __name__ == "__main__":
    typer.run(main)
