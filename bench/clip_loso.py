"""Leave-one-source-out choice of the CLIP branch's probe (and of K, its frames per video).

Every candidate is trained on all training sources but one and scored on the held-out
source against reals it never saw: the source's own reals, and for fake-only sources
(StyleGAN3, the other GAN faces, DFDC clips) the CelebA and CelebA-HQ photos, which are
then left out of training too. Crops come from the audit's own decode/detect/align stage
(the training crop cache at 224 px) and CLIP features from the float tower, cached
(``training/clip_features.py``). Prints one JSON line per candidate and appends it to
``bench/results/clip_loso.jsonl``; ``--report`` also scores ``../shared/data`` with the
chosen candidate trained on everything (reported, never used to choose).

    python bench/clip_loso.py --train ../shared/data/train --report ../shared/data
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

FOLDS = {
    "ffpp": (("ffpp",), ()),
    "ciplab": (("ciplab",), ()),
    "ismaolen": (("ismaolen",), ()),
    "dfdc": (("dfdc",), ("celeba", "celebahq")),
    "stylegan3": (("stylegan3",), ("celeba", "celebahq")),
    "other_gan": (("sd_gan", "stylegan2ada"), ("celeba", "celebahq")),
}
CANDIDATES = {
    "cls12": dict(blocks=(12,), l2=1e-3, sbi=True, fakes=True),
    "cls12_l2e-2": dict(blocks=(12,), l2=1e-2, sbi=True, fakes=True),
    "multi_6-12": dict(blocks=(6, 8, 10, 12), l2=1e-3, sbi=True, fakes=True),
    "multi_4-12": dict(blocks=(4, 6, 8, 10, 12), l2=1e-3, sbi=True, fakes=True),
    "multi_4-12_l2e-2": dict(blocks=(4, 6, 8, 10, 12), l2=1e-2, sbi=True, fakes=True),
    "multi_all": dict(blocks=tuple(range(1, 13)), l2=1e-2, sbi=True, fakes=True),
    "multi_4-12_nosbi": dict(blocks=(4, 6, 8, 10, 12), l2=1e-3, sbi=False, fakes=True),
    "multi_4-12_sbionly": dict(blocks=(4, 6, 8, 10, 12), l2=1e-3, sbi=True, fakes=False),
    # Weaker penalties: per-block L2-normalised tokens have tiny coordinates (~0.04), so a
    # useful weight vector is large and 1e-3 already shrinks it hard.
    "cls12_l2e-4": dict(blocks=(12,), l2=1e-4, sbi=True, fakes=True),
    "cls12_l2e-5": dict(blocks=(12,), l2=1e-5, sbi=True, fakes=True),
    "multi_6-12_l2e-4": dict(blocks=(6, 8, 10, 12), l2=1e-4, sbi=True, fakes=True),
    "multi_6-12_l2e-5": dict(blocks=(6, 8, 10, 12), l2=1e-5, sbi=True, fakes=True),
    "multi_4-12_l2e-4": dict(blocks=(4, 6, 8, 10, 12), l2=1e-4, sbi=True, fakes=True),
    "multi_all_l2e-4": dict(blocks=tuple(range(1, 13)), l2=1e-4, sbi=True, fakes=True),
    "multi_8-12_l2e-4": dict(blocks=(8, 10, 12), l2=1e-4, sbi=True, fakes=True),
    "multi_8-12_l2e-4_sbi50": dict(blocks=(8, 10, 12), l2=1e-4, sbi=True, fakes=True,
                                   sbi_share=0.5),
    "multi_8-12_l2e-4_sbi30": dict(blocks=(8, 10, 12), l2=1e-4, sbi=True, fakes=True,
                                   sbi_share=0.3),
    "cls12_l2e-4_sbi50": dict(blocks=(12,), l2=1e-4, sbi=True, fakes=True, sbi_share=0.5),
    "multi_10-12_l2e-4": dict(blocks=(10, 11, 12), l2=1e-4, sbi=True, fakes=True),
    "multi_8-12_l2e-3.5": dict(blocks=(8, 10, 12), l2=3e-4, sbi=True, fakes=True),
}
UTKFACE_KEEP = 400  # of 1,321 real-only UTKFace photos (they still appear as SBI fakes)


def select_items(cache_items, seed: int = 0) -> list[dict]:
    """The usable items, with UTKFace thinned to UTKFACE_KEEP (deterministic)."""
    import hashlib

    items = [r for r in cache_items.to_pylist() if r["status"] == "ok"]
    utk = sorted((r for r in items if r["source"] == "utkface"),
                 key=lambda r: hashlib.sha256(f"{seed}:{r['media_id']}".encode()).hexdigest())
    drop = {r["item_key"] for r in utk[UTKFACE_KEEP:]}
    return [r for r in items if r["item_key"] not in drop]


def item_scores(meta: list[dict], logits: np.ndarray, rows: np.ndarray, k: int) -> dict:
    """Mean frame logit per item over its first-``k`` evenly spaced bank frames."""
    from deepaudit.models.fused import evenly_spaced

    per: dict[str, list] = {}
    for i in rows:
        per.setdefault(meta[i]["item_key"], []).append((meta[i]["pos"], logits[i]))
    out = {}
    for key, frames in per.items():
        frames.sort()
        pick = evenly_spaced(len(frames), k)
        out[key] = float(np.mean([frames[j][1] for j in pick]))
    return out


def weights_for(spec: dict, lab, src, view):
    """Source-balanced weights; with ``sbi_share``, that share of the fake half goes to
    the self-blended views (pooled as one source) and the rest to the real fakes."""
    from deepaudit.models.clip_branch import balanced_weights

    share = spec.get("sbi_share")
    if share is None:
        return balanced_weights(lab, src)
    w = balanced_weights(lab, np.where(view == "sbi", "sbi", src))
    sbi, fake = (view == "sbi"), (lab == 1) & (view != "sbi")
    if sbi.any() and fake.any():
        total = w[lab == 1].sum()
        w[sbi] *= share * total / w[sbi].sum()
        w[fake] *= (1 - share) * total / w[fake].sum()
    return w


def run_candidate(name: str, spec: dict, bank: dict, ks=(1, 2, 4, 8)) -> dict:
    import torch

    from deepaudit.models.clip_branch import ClipProbe, fit_probe
    from deepaudit.models.metrics import roc_auc

    meta, cls = bank["meta"], bank["cls"]
    src = np.array([m["source"] for m in meta])
    view = np.array([m["view"] for m in meta])
    lab = np.array([m["label"] for m in meta])
    folds, t0 = {}, time.perf_counter()
    for fold, (held, pool) in FOLDS.items():
        out = np.isin(src, held + pool)
        train = ~out & ((view == "sbi") if not spec["fakes"] else True)
        if not spec["fakes"]:
            train |= ~out & (view == "orig") & (lab == 0)
        if not spec["sbi"]:
            train &= view != "sbi"
        probe = fit_probe(ClipProbe(spec["blocks"]), cls[train], lab[train],
                          weights_for(spec, lab[train], src[train], view[train]), l2=spec["l2"])
        test = np.where(out & (view == "orig"))[0]
        with torch.no_grad():
            logits = probe(torch.from_numpy(cls[test].astype(np.float32))).numpy()
        full = np.zeros(len(meta), np.float32)
        full[test] = logits
        label_of = {meta[i]["item_key"]: meta[i]["label"] for i in test}
        by_k = {}
        for k in ks:
            s = item_scores(meta, full, test, k)
            keys = sorted(s)
            by_k[k] = roc_auc([label_of[x] for x in keys], [s[x] for x in keys])
        n_fake = sum(v == 1 for v in label_of.values())
        folds[fold] = {"auc": by_k, "n_items": len(label_of), "n_fake": n_fake}
    k_default = 4
    aucs = [f["auc"][k_default] for f in folds.values()]
    return {
        "candidate": name, "spec": {**spec, "blocks": list(spec["blocks"])},
        "k": k_default, "mean_auc": float(np.mean(aucs)), "min_auc": float(np.min(aucs)),
        "by_source": {f: round(v["auc"][k_default], 4) for f, v in folds.items()},
        "by_k_mean": {k: float(np.mean([f["auc"][k] for f in folds.values()])) for k in ks},
        "ffpp_by_k": {k: folds["ffpp"]["auc"][k] for k in ks},
        "items": {f: [v["n_items"], v["n_fake"]] for f, v in folds.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def load_bank(data: str, augment: bool, perturb: str | None = None, thin: bool = True):
    import pyarrow.compute as pc  # noqa: F401

    from deepaudit.infra.storage import StorageConfig
    from deepaudit.training.clip_features import BankConfig, build_bank
    from deepaudit.training.crop_cache import CropCacheConfig, build_crop_cache, load_crops
    from deepaudit.training.datasets import load_inputs

    labelled = load_inputs([data], StorageConfig())
    cache = build_crop_cache(labelled.table, CropCacheConfig(frames=16, size=224))
    items = select_items(cache.items) if thin else [
        r for r in cache.items.to_pylist() if r["status"] == "ok"]
    crops = load_crops(cache.directory, [r["item_key"] for r in items])
    cfg = BankConfig(augment=augment, perturb=perturb)
    t0 = time.perf_counter()
    bank = build_bank(items, crops, cache.key, cfg,
                      on_progress=lambda n: print(f"  embedded {n}", flush=True)
                      if n % 320 == 0 else None)
    print(f"bank {data}: {len(bank['meta'])} crops, {time.perf_counter() - t0:.0f} s",
          flush=True)
    return bank


def main(
    train: Annotated[str, typer.Option(help="Training collection.")] = "../shared/data/train",
    report: Annotated[Optional[str], typer.Option(
        help="Also score this labelled set with the best candidate (report only).")] = None,
    only: Annotated[Optional[str], typer.Option(help="Comma-separated candidate names.")]
        = None,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
    record: Annotated[bool, typer.Option(help="Append to bench/results/.")] = True,
    card: Annotated[Optional[str], typer.Option(
        help="Write the best candidate's table into this model card's "
             "metrics.leave_one_source_out (for a card whose CLIP probe is that candidate "
             "and whose CNN weight is 0).")] = None,
) -> None:
    import torch
    from record import append_record  # bench/record.py

    torch.set_num_threads(threads)
    bank = load_bank(train, augment=True)
    names = only.split(",") if only else list(CANDIDATES)
    results = []
    for name in names:
        res = run_candidate(name, CANDIDATES[name], bank)
        results.append(res)
        print(json.dumps(res), flush=True)
        if record:
            append_record(Path(__file__).parent / "results" / "clip_loso.jsonl", res)
    best = max(results, key=lambda r: (r["mean_auc"], r["min_auc"]))
    if card:
        write_card(card, best)
    if report:
        print(json.dumps(score_report(best["candidate"], bank, report)), flush=True)


def write_card(path: str, best: dict) -> None:
    """Record ``best`` as the card's leave-one-source-out measurement."""
    p = Path(path).with_suffix(".json")
    data = json.loads(p.read_text())
    data.setdefault("metrics", {})["leave_one_source_out"] = {
        "mean_auc": best["mean_auc"], "min_auc": best["min_auc"],
        "by_source": best["by_source"], "candidate": best["candidate"],
        "frames_per_video": best["k"],
        "scope": "CLIP branch; the fused score's CNN weight is 0",
        "protocol": "bench/clip_loso.py: train on all training sources but one, score the "
                    "held-out source against reals never seen (its own, or CelebA and "
                    "CelebA-HQ for fake-only sources)",
    }
    p.write_text(json.dumps(data, indent=2) + "\n")


def score_report(name: str, bank: dict, data: str) -> dict:
    """Train ``name`` on the whole training bank and score ``data`` (plain and JPEG 50)."""
    import torch

    from deepaudit.models.clip_branch import ClipProbe, balanced_weights, fit_probe
    from deepaudit.models.metrics import roc_auc

    spec = CANDIDATES[name]
    meta, cls = bank["meta"], bank["cls"]
    lab = np.array([m["label"] for m in meta])
    src = np.array([m["source"] for m in meta])
    probe = fit_probe(ClipProbe(spec["blocks"]), cls, lab, balanced_weights(lab, src),
                      l2=spec["l2"])
    out = {"candidate": name, "data": data}
    for perturb in (None, "jpeg:50"):
        ev = load_bank(data, augment=False, perturb=perturb, thin=False)
        with torch.no_grad():
            logits = probe(torch.from_numpy(ev["cls"].astype(np.float32))).numpy()
        s = item_scores(ev["meta"], logits, np.arange(len(logits)), 4)
        label_of = {m["item_key"]: m["label"] for m in ev["meta"]}
        mt = {m["item_key"]: m["media_type"] for m in ev["meta"]}
        keys = sorted(s)
        tag = perturb or "none"
        out[tag] = {"auc": roc_auc([label_of[k] for k in keys], [s[k] for k in keys])}
        for kind in ("image", "video"):
            ks = [k for k in keys if mt[k] == kind]
            out[tag][f"{kind}_auc"] = roc_auc([label_of[k] for k in ks], [s[k] for k in ks])
    return out


if __name__ == "__main__":
    typer.run(main)
