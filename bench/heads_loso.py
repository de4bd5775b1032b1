"""Leave-one-source-out comparison of the CLIP branch's heads (issue 26): today's head
(the mean of a linear probe's frame logits), the BiLSTM with temporal attention
(models/temporal_attention.py) and PGD adversarial training of the probe
(models/adversarial.py). Same folds, bank and probe inputs as bench/clip_loso.py; each
head is trained on all sources but one and scored on the held-out source against reals
it never saw, with the frames a CPU audit scores (4 per video) and with 8.

    python bench/heads_loso.py --heads probe_mean,bilstm_attn
    python bench/heads_loso.py --heads pgd --pgd-crops 120

PGD needs the crops (the attack runs through the CLIP tower): per fold, it attacks
``--pgd-crops`` training crops (half real, half fake) against that fold's probe, embeds
the adversarial crops and refits the probe on clean + adversarial features. Prints one
JSON line per head and appends it to ``bench/results/heads_loso.jsonl``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

BLOCKS = (10, 11, 12)  # the shipped probe's blocks and penalty (recipes/clip_effnet_fused.toml)
L2 = 1e-4


def sequences(meta: list[dict], rows: np.ndarray) -> dict[tuple[str, str], list[int]]:
    """(item_key, view) -> bank row indices in frame order."""
    out: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for i in rows:
        out.setdefault((meta[i]["item_key"], meta[i]["view"]), []).append((meta[i]["pos"], i))
    return {k: [i for _, i in sorted(v)] for k, v in out.items()}


def fold_rows(meta, held, pool):
    src = np.array([m["source"] for m in meta])
    view = np.array([m["view"] for m in meta])
    out = np.isin(src, held + pool)
    return np.where(~out)[0], np.where(out & (view == "orig"))[0]


def auc_at(label_of: dict, scores: dict) -> float:
    from deepaudit.models.metrics import roc_auc

    keys = sorted(scores)
    return roc_auc([label_of[k] for k in keys], [scores[k] for k in keys])


def run_head(name: str, bank: dict, feats, crops_of=None, pgd: dict | None = None,
             seed: int = 0) -> dict:
    import torch
    from clip_loso import FOLDS

    from deepaudit.models.clip_branch import ClipProbe, balanced_weights, fit_probe
    from deepaudit.models.fused import evenly_spaced
    from deepaudit.models.temporal_attention import (
        AttentionHead,
        attention_scores,
        fit_attention_head,
    )

    meta, cls = bank["meta"], bank["cls"]
    lab = np.array([m["label"] for m in meta])
    src = np.array([m["source"] for m in meta])
    folds, t0 = {}, time.perf_counter()
    for fold, (held, pool) in FOLDS.items():
        train, test = fold_rows(meta, held, pool)
        test_seqs = {k[0]: v for k, v in sequences(meta, test).items()}
        label_of = {k: int(lab[v[0]]) for k, v in test_seqs.items()}
        by_k = {}
        if name == "bilstm_attn":
            seqs = sequences(meta, train)
            keys = list(seqs)
            y = np.array([lab[seqs[k][0]] for k in keys])
            w = balanced_weights(y, np.array([src[seqs[k][0]] for k in keys]))
            torch.manual_seed(seed)
            head = fit_attention_head(AttentionHead(BLOCKS), [feats[seqs[k]] for k in keys],
                                      y, w, seed=seed)
            for k in (4, 8):
                tkeys = sorted(test_seqs)
                picked = [[test_seqs[t][j] for j in evenly_spaced(len(test_seqs[t]), k)]
                          for t in tkeys]
                logits, _, _ = attention_scores(head, [feats[p] for p in picked])
                by_k[k] = auc_at(label_of, dict(zip(tkeys, logits.tolist())))
        else:
            probe = fit_probe(ClipProbe(BLOCKS), cls[train], lab[train],
                              balanced_weights(lab[train], src[train]), l2=L2)
            if name == "pgd":
                from deepaudit.training.adversarial import refit_probe

                extra = adversarial_rows(probe, meta, train, lab, crops_of, pgd, seed)
                probe = refit_probe(probe, cls[train], lab[train],
                                    balanced_weights(lab[train], src[train]),
                                    extra["cls"], extra["labels"], L2)
            with torch.no_grad():
                logits = probe(torch.from_numpy(cls[test].astype(np.float32))).numpy()
            frame = dict(zip(test.tolist(), logits.tolist()))
            for k in (4, 8):
                by_k[k] = auc_at(label_of, {
                    t: float(np.mean([frame[v[j]] for j in evenly_spaced(len(v), k)]))
                    for t, v in test_seqs.items()})
        folds[fold] = {"auc": by_k, "n_items": len(label_of),
                       "n_fake": int(sum(label_of.values()))}
        print(f"  {name} {fold}: {by_k}", flush=True)
    aucs = [f["auc"][4] for f in folds.values()]
    return {"head": name, "k": 4, "mean_auc": float(np.mean(aucs)),
            "min_auc": float(np.min(aucs)),
            "mean_auc_k8": float(np.mean([f["auc"][8] for f in folds.values()])),
            "by_source": {f: round(v["auc"][4], 4) for f, v in folds.items()},
            "items": {f: [v["n_items"], v["n_fake"]] for f, v in folds.items()},
            "pgd": pgd if name == "pgd" else None, "blocks": list(BLOCKS), "l2": L2,
            "seconds": round(time.perf_counter() - t0, 1)}


def adversarial_rows(probe, meta, train, lab, crops_of, pgd: dict, seed: int) -> dict:
    """CLS tokens of PGD-attacked training crops (half real, half fake), the attack run
    through the tower against ``probe`` (training/adversarial.py)."""
    from deepaudit.models.adversarial import PGDConfig
    from deepaudit.training.adversarial import adversarial_features, pick_rows

    rows = pick_rows(meta, [i for i in train if meta[i]["view"] in ("orig", "sbi")],
                     pgd["crops"], seed)
    cls, labels = adversarial_features(probe, meta, rows, crops_of,
                                       PGDConfig(eps=pgd["eps"], steps=pgd["steps"], seed=seed))
    return {"cls": cls, "labels": labels}


def main(
    heads: Annotated[str, typer.Option(help="Comma-separated: probe_mean, bilstm_attn, pgd.")]
        = "probe_mean,bilstm_attn",
    train: Annotated[str, typer.Option(help="Training collection.")] = "../shared/data/train",
    pgd_eps: Annotated[float, typer.Option(help="PGD L-inf radius, in 0-255 pixel units.")]
        = 2.0,
    pgd_steps: Annotated[int, typer.Option(help="PGD steps.")] = 2,
    pgd_crops: Annotated[int, typer.Option(help="Training crops attacked per fold.")] = 120,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the heads' training and of PGD.")] = 0,
    record: Annotated[bool, typer.Option(help="Append to bench/results/.")] = True,
    card: Annotated[str | None, typer.Option(
        help="Write the bilstm_attn result into this model card's "
             "metrics.leave_one_source_out (a clip_bilstm_attn card).")] = None,
) -> None:
    import torch
    from clip_loso import load_bank
    from record import append_record

    from deepaudit.models.clip_branch import probe_inputs

    torch.set_num_threads(threads)
    bank = load_bank(train, augment=True)
    feats = probe_inputs(torch.from_numpy(bank["cls"].astype(np.float32)), BLOCKS).numpy()
    crops_of = None
    names = heads.split(",")
    if "pgd" in names:
        crops_of = view_crops(train)
    for name in names:
        pgd = {"eps": pgd_eps, "steps": pgd_steps, "crops": pgd_crops} if name == "pgd" else None
        res = {**run_head(name, bank, feats, crops_of, pgd, seed), "seed": seed}
        print(json.dumps(res), flush=True)
        if record:
            append_record(Path(__file__).parent / "results" / "heads_loso.jsonl", res)
        if card and name == "bilstm_attn":
            write_card(card, res)


def write_card(path: str, res: dict) -> None:
    p = Path(path).with_suffix(".json")
    data = json.loads(p.read_text())
    data.setdefault("metrics", {})["leave_one_source_out"] = {
        "mean_auc": res["mean_auc"], "min_auc": res["min_auc"], "by_source": res["by_source"],
        "head": "bilstm_attn", "frames_per_video": res["k"], "seed": res["seed"],
        "scope": "CLIP branch with the BiLSTM-attention head; the fused score's CNN weight is 0",
        "protocol": "bench/heads_loso.py: train on all training sources but one, score the "
                    "held-out source against reals never seen (its own, or CelebA and "
                    "CelebA-HQ for fake-only sources)",
    }
    p.write_text(json.dumps(data, indent=2) + "\n")


def view_crops(train: str):
    """meta row -> the uint8 crop its bank features came from (the same seeded view)."""
    from clip_loso import select_items

    from deepaudit.infra.storage import StorageConfig
    from deepaudit.training.adversarial import view_crop
    from deepaudit.training.clip_features import BankConfig
    from deepaudit.training.crop_cache import CropCacheConfig, build_crop_cache, load_crops
    from deepaudit.training.datasets import load_inputs

    labelled = load_inputs([train], StorageConfig())
    cache = build_crop_cache(labelled.table, CropCacheConfig(frames=16, size=224))
    items = {r["item_key"]: r for r in select_items(cache.items)}

    def crop(m: dict) -> np.ndarray:
        key = m["item_key"]
        return view_crop(m, items[key], load_crops(cache.directory, [key]),
                         BankConfig(augment=True))

    return crop


if __name__ == "__main__":
    typer.run(main)
