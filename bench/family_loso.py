"""Leave one family out: the table every detector choice is made on (issue 32).

The successor of bench/clip_loso.py. Folds come from the training collection's
``family`` column (training/families.py): each family with fakes is held out in turn
and scored against reals never trained on (its own, and the reals-only families of a
matching domain); the rest trains the candidate, split as the recipe splits it, so the
threshold at 5 % validation false positives means what the shipped one does. Each line
reports every fold's ROC AUC, their mean and worst, and the false-positive rate at that
threshold on held-out real talking-head footage.

Candidates are the CLIP branch's heads on the feature bank the recipe trains on (frozen
float CLIP tower, cached per crop): the linear probe today's default ships, with other
blocks or weightings, and the probe trained with the last blocks' LayerNorms
(models/ln_tune.py; the bank then also caches each view's tokens after block 10).
``--video-scorers`` compares ways to score a video from its frames on the folds whose
fakes include videos.

    python bench/family_loso.py --only probe,ln12
    python bench/family_loso.py --only probe --video-scorers
    python bench/family_loso.py --only probe --card models/weights/clip_effnet_fused.json

Prints one JSON line per candidate and appends it to ``bench/results/family_loso.jsonl``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

BLOCKS = (10, 11, 12)
CANDIDATES: dict[str, dict] = {
    # Today's probe: CLS of blocks 10-12, L2 1e-4, weights balanced by source.
    "probe": dict(kind="probe", blocks=BLOCKS, l2=1e-4, balance="source"),
    "probe_family": dict(kind="probe", blocks=BLOCKS, l2=1e-4, balance="family"),
    "probe_b12": dict(kind="probe", blocks=(12,), l2=1e-4, balance="source"),
    "probe_b8-12": dict(kind="probe", blocks=(8, 10, 12), l2=1e-4, balance="source"),
    "probe_l2e-3": dict(kind="probe", blocks=BLOCKS, l2=1e-3, balance="source"),
    "probe_b6-12": dict(kind="probe", blocks=(6, 8, 10, 12), l2=1e-4, balance="source"),
    "probe_b4-12": dict(kind="probe", blocks=(4, 6, 8, 10, 12), l2=1e-4, balance="source"),
    "probe_all": dict(kind="probe", blocks=tuple(range(1, 13)), l2=1e-4, balance="source"),
    "probe_b8-12_l2e-5": dict(kind="probe", blocks=(8, 10, 12), l2=1e-5, balance="source"),
    "probe_b4-12_l2e-5": dict(kind="probe", blocks=(4, 6, 8, 10, 12), l2=1e-5,
                              balance="source"),
    # The probe on the CLS tokens and the mean of the patch tokens after each block.
    "gap": dict(kind="gap", blocks=BLOCKS, l2=1e-4, balance="source"),
    "gap_family": dict(kind="gap", blocks=BLOCKS, l2=1e-4, balance="family"),
    # The seeds' BiLSTM with temporal attention over the probe's inputs (clip_bilstm_attn).
    "attn": dict(kind="attn", blocks=BLOCKS, l2=1e-4, balance="source"),
    "attn_all": dict(kind="attn", blocks=tuple(range(1, 13)), l2=1e-4, balance="source"),
    # Trained on views of which half were downscaled and back (scored on clean views).
    "probe_lowres": dict(kind="probe", blocks=BLOCKS, l2=1e-4, balance="source", lowres=0.5),
    "probe_all_lowres": dict(kind="probe", blocks=tuple(range(1, 13)), l2=1e-4,
                             balance="source", lowres=0.5),
    "probe_all_family_lowres": dict(kind="probe", blocks=tuple(range(1, 13)), l2=1e-4,
                                    balance="family", lowres=0.5),
    "probe_family_lowres": dict(kind="probe", blocks=BLOCKS, l2=1e-4, balance="family",
                                lowres=0.5),
    # The last block's LayerNorms tuned with the probe (3,072 norm values).
    "ln12": dict(kind="ln", blocks=BLOCKS, l2=1e-4, balance="source", tuned=(12,),
                 epochs=3, lr=1e-3),
    "ln12_family": dict(kind="ln", blocks=BLOCKS, l2=1e-4, balance="family", tuned=(12,),
                        epochs=3, lr=1e-3),
    "ln12_all_lr1e-2": dict(kind="ln", blocks=tuple(range(1, 13)), l2=1e-4, balance="source",
                            tuned=(12,), epochs=3, lr=1e-2),
    "ln11-12": dict(kind="ln", blocks=BLOCKS, l2=1e-4, balance="source", tuned=(11, 12),
                    epochs=2, lr=1e-3),
}
CAP = 400  # items per (source, label), as the recipe's clip_max_per_source
K = 4  # frames per video a CPU audit scores
TALKING = "talking-head,lip-sync,real-talking"


def load(train: str, tokens: bool, lowres: float = 0.0,
         perturb: str | None = None) -> tuple[list[dict], dict]:
    """Usable, capped items of the training collection (with their family) and the
    recipe's feature bank of them (with each view's tokens after block 10 if asked;
    ``lowres``: the bank whose training views are partly downscaled; ``perturb``: a bank
    of the items' untouched views with that perturbation, e.g. ``resize:0.5``, to score
    held-out items on)."""
    from deepaudit.infra.storage import StorageConfig
    from deepaudit.training.clip_features import BankConfig, build_bank
    from deepaudit.training.crop_cache import CropCacheConfig, build_crop_cache, load_crops
    from deepaudit.training.datasets import load_inputs
    from deepaudit.training.fused import cap_items
    from deepaudit.training.ln_tune import TOKENS_AFTER

    labelled = load_inputs([train], StorageConfig())
    cache = build_crop_cache(labelled.table, CropCacheConfig(frames=16, size=224))
    items = sorted((r for r in cache.items.to_pylist() if r["status"] == "ok"),
                   key=lambda r: (r["media_id"], r["uri"]))
    items = cap_items(items, CAP, 0)
    crops = load_crops(cache.directory, [r["item_key"] for r in items])
    t0 = time.perf_counter()
    cfg = BankConfig(augment=False, perturb=perturb) if perturb else BankConfig(lowres=lowres)
    bank = build_bank(items, crops, cache.key, cfg,
                      tokens_after=TOKENS_AFTER if tokens else None,
                      on_progress=lambda n: print(f"  embedded {n}", flush=True)
                      if n % 320 == 0 else None)
    print(f"bank: {len(bank['meta'])} views of {len(items)} items, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return items, bank


def item_scores(meta: list[dict], logits: np.ndarray, rows: np.ndarray, k: int | None,
                pool: str = "mean") -> dict[str, float]:
    """Per item: its frame logits over ``k`` evenly spaced bank frames, pooled."""
    from deepaudit.models.fused import evenly_spaced

    per: dict[str, list] = {}
    for i in rows:
        per.setdefault(meta[i]["item_key"], []).append((meta[i]["pos"], float(logits[i])))
    out = {}
    for key, frames in per.items():
        frames.sort()
        v = np.array([frames[j][1] for j in evenly_spaced(len(frames), k)])
        out[key] = float(v.max() if pool == "max" else
                         np.sort(v)[-max(1, len(v) // 2):].mean() if pool == "top_half"
                         else v.mean())
    return out


class Context:
    """What every fold reads: the items, bank columns and, for tuned candidates, the
    tower and the tail's inputs (computed once)."""

    def __init__(self, items: list[dict], bank: dict) -> None:
        from deepaudit.training.families import family_of

        self.items = items
        self.by_key = {i["item_key"]: i for i in items}
        self.meta, self.cls = bank["meta"], bank["cls"]
        self.tokens = bank.get("tokens")
        self.lab = np.array([m["label"] for m in self.meta])
        self.view = np.array([m["view"] for m in self.meta])
        self.key = np.array([m["item_key"] for m in self.meta])
        # From the items, not the bank's meta (which keeps the names it was built with).
        self.source = np.array([self.by_key[m["item_key"]]["source"] for m in self.meta])
        self.family = np.array([family_of(self.by_key[m["item_key"]]) for m in self.meta])
        self._tower, self._inputs = None, {}

    def gap_features(self, blocks) -> np.ndarray:
        """The probe's input on the CLS token and the mean patch token after each of
        ``blocks`` (10-12: from the cached tokens), ``[n, 2 * len(blocks) * 768]``."""
        import torch

        from deepaudit.models.clip_branch import probe_inputs

        key = ("gap", tuple(blocks))
        if key not in self._inputs:
            means = {10: self.tokens[:, 1:].astype(np.float32).mean(1)}
            after11 = self.tail_inputs(12)
            means[11] = after11[:, 1:].astype(np.float32).mean(1)
            out12 = np.empty((len(after11), 768), np.float32)
            with torch.inference_mode():
                block = self.tower.encoder.layers[11]
                for s in range(0, len(after11), 64):
                    h = block(torch.from_numpy(after11[s:s + 64].astype(np.float32)))
                    out12[s:s + 64] = h[:, 1:].mean(1).numpy()
            means[12] = out12
            cls = torch.from_numpy(self.cls.astype(np.float32))
            pm = torch.from_numpy(np.stack([means[b] for b in blocks], 1))
            self._inputs[key] = torch.cat([probe_inputs(cls, blocks),
                                           probe_inputs(pm, range(1, len(blocks) + 1))],
                                          1).numpy()
        return self._inputs[key]

    def probe_features(self, blocks) -> np.ndarray:
        """The probe's input (standardised, L2-normalised CLS tokens) of every row."""
        import torch

        from deepaudit.models.clip_branch import probe_inputs

        key = ("probe", tuple(blocks))
        if key not in self._inputs:
            self._inputs[key] = probe_inputs(torch.from_numpy(self.cls.astype(np.float32)),
                                             blocks).numpy()
        return self._inputs[key]

    def groups(self, spec: dict) -> np.ndarray:
        """What the training weights balance: each row's family or source."""
        return self.family if spec["balance"] == "family" else self.source

    @property
    def tower(self):
        if self._tower is None:
            from deepaudit.models.clip_vit import load_tower

            self._tower = load_tower()
        return self._tower

    def tail_inputs(self, first: int) -> np.ndarray:
        from deepaudit.training.ln_tune import tail_inputs

        if self.tokens is None:
            raise typer.BadParameter("tuned candidates need the bank's tokens: run with "
                                     "--tokens")
        if first not in self._inputs:
            t0 = time.perf_counter()
            self._inputs[first] = tail_inputs(self.tower, self.tokens, first)
            print(f"  tail inputs for block {first}: {time.perf_counter() - t0:.0f} s",
                  flush=True)
        return self._inputs[first]


def fit_fold(spec: dict, ctx: Context, fit: np.ndarray):
    """Train ``spec`` on bank rows ``fit`` of ``ctx``; returns logits(ev, rows) for rows
    of any bank ``ev`` of the same items (the clean bank scores held-out items)."""
    import torch

    from deepaudit.models.clip_branch import ClipProbe, balanced_weights, fit_probe

    w = balanced_weights(ctx.lab[fit], ctx.groups(spec)[fit])
    if spec["kind"] == "attn":
        head = _fit_attention(spec, ctx, fit)
        return lambda ev, rows: _attention_frame_logits(head, spec, ev, rows)
    if spec["kind"] == "gap":
        from torch import nn

        from deepaudit.models.clip_branch import fit_linear

        feats = ctx.gap_features(spec["blocks"])
        lin = fit_linear(nn.Linear(feats.shape[1], 1), torch.from_numpy(feats[fit]),
                         ctx.lab[fit], w, l2=spec["l2"])

        def gap_logits(ev: Context, rows: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                x = torch.from_numpy(ev.gap_features(spec["blocks"])[rows])
                return lin(x).squeeze(-1).numpy()
        return gap_logits
    if spec["kind"] == "probe":
        probe = fit_probe(ClipProbe(spec["blocks"]), ctx.cls[fit], ctx.lab[fit], w,
                          l2=spec["l2"])

        def logits(ev: Context, rows: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return probe(torch.from_numpy(ev.cls[rows].astype(np.float32))).numpy()
        return logits
    from deepaudit.training.ln_tune import LnTuneConfig, fit_tuned, tuned_logits

    cfg = LnTuneConfig(tuned=tuple(spec["tuned"]), epochs=spec["epochs"], lr=spec["lr"],
                       l2=spec["l2"], anchor=spec.get("anchor", 0.0))
    inputs = ctx.tail_inputs(cfg.tuned[0])
    tail, probe = fit_tuned(ctx.tower, inputs[fit], ctx.cls[fit], ctx.lab[fit], w,
                            spec["blocks"], cfg,
                            on_progress=lambda e: print(f"    {e}", flush=True))

    def logits(ev: Context, rows: np.ndarray) -> np.ndarray:
        return tuned_logits(ctx.tower, tail, probe, ev.tail_inputs(cfg.tuned[0])[rows],
                            ev.cls[rows])
    return logits


def run_candidate(name: str, spec: dict, ctx: Context, folds, talking: set[str],
                  video_scorers: bool = False, train_ctx: Context | None = None) -> dict:
    """``spec`` by every fold: trained on ``train_ctx``'s views (default: ``ctx``'s),
    always scored on ``ctx``'s clean views."""
    from deepaudit.models.metrics import roc_auc, threshold_at_fpr
    from deepaudit.training.families import calibration_split, family_of, summarise

    t0 = time.perf_counter()
    by_family, talking_fpr, counts, video = {}, {}, {}, {}
    for fold in folds:
        test_items = [i for i in ctx.items if fold.held_out(i)]
        test_keys = {i["item_key"] for i in test_items}
        train_items = [i for i in ctx.items if i["item_key"] not in test_keys]
        fit_keys, cal_keys = calibration_split(train_items)
        tc = train_ctx or ctx
        fit = np.where(np.isin(tc.key, list(fit_keys)))[0]
        orig = ctx.view == "orig"
        cal = np.where(np.isin(ctx.key, list(cal_keys)) & orig)[0]
        test = np.where(np.isin(ctx.key, list(test_keys)) & orig)[0]
        logits_of = fit_fold(spec, tc, fit)
        full = np.zeros(len(ctx.meta), np.float32)
        full[cal], full[test] = logits_of(ctx, cal), logits_of(ctx, test)
        s_test = item_scores(ctx.meta, full, test, K)
        s_cal = item_scores(ctx.meta, full, cal, K)
        keys = sorted(s_test)
        y = [ctx.by_key[k]["label"] for k in keys]
        by_family[fold.name] = roc_auc(y, [s_test[k] for k in keys])
        ck = sorted(s_cal)
        t = threshold_at_fpr([ctx.by_key[k]["label"] for k in ck], [s_cal[k] for k in ck],
                             0.05)
        real_talk = [k for k in keys if ctx.by_key[k]["label"] == 0
                     and ctx.by_key[k]["media_type"] == "video"
                     and family_of(ctx.by_key[k]) in talking]
        if real_talk:
            talking_fpr[fold.name] = [sum(s_test[k] >= t for k in real_talk), len(real_talk)]
        counts[fold.name] = [len(keys), int(sum(y))]
        if video_scorers and train_ctx is None:
            res = score_videos(spec, ctx, fit, test, keys)
            if res:
                video[fold.name] = res
        print(f"  {name} {fold.name}: AUC {by_family[fold.name]} "
              f"{talking_fpr.get(fold.name, '')}", flush=True)
    flagged = sum(v[0] for v in talking_fpr.values())
    n_talk = sum(v[1] for v in talking_fpr.values())
    out = {
        "candidate": name, "spec": {k: list(v) if isinstance(v, tuple) else v
                                    for k, v in spec.items()},
        "frames_per_video": K, **summarise(by_family),
        "by_family": {k: None if v is None else round(v, 4) for k, v in by_family.items()},
        "talking_real_fpr": round(flagged / n_talk, 4) if n_talk else None,
        "talking_real_flagged": talking_fpr,
        "items": counts, "seconds": round(time.perf_counter() - t0, 1),
    }
    if video_scorers:
        out["video_scorers"] = summarise_videos(video)
    return out


def score_videos(spec: dict, ctx: Context, fit: np.ndarray, test: np.ndarray,
                 keys: list[str]) -> dict | None:
    """Video-only AUC of several ways to score a video from its frames (frame logits of
    the fold's probe, or heads trained on the fold's training rows)."""
    import torch

    from deepaudit.models.clip_branch import ClipProbe, balanced_weights, fit_probe
    from deepaudit.models.metrics import roc_auc

    vids = [k for k in keys if ctx.by_key[k]["media_type"] == "video"]
    y = [ctx.by_key[k]["label"] for k in vids]
    if len(set(y)) < 2:
        return None
    probe = fit_probe(ClipProbe(spec["blocks"]), ctx.cls[fit], ctx.lab[fit],
                      balanced_weights(ctx.lab[fit], ctx.groups(spec)[fit]), l2=spec["l2"])
    with torch.no_grad():
        full = np.zeros(len(ctx.meta), np.float32)
        full[test] = probe(torch.from_numpy(ctx.cls[test].astype(np.float32))).numpy()
    rows = test[np.isin(ctx.key[test], vids)]
    out = {"n": [len(vids), int(sum(y))]}
    for name, k, pool in (("mean4", K, "mean"), ("top_half4", K, "top_half"),
                          ("max4", K, "max"), ("mean8", None, "mean")):
        s = item_scores(ctx.meta, full, rows, k, pool)
        out[name] = roc_auc(y, [s[v] for v in vids])
    out["attention4"] = _attention_auc(spec, ctx, fit, rows, vids, y)
    out["temporal4"] = _temporal_auc(spec, ctx, probe, fit, rows, vids, y, full)
    return out


def _sequences(ctx: Context, rows: np.ndarray, k: int | None) -> dict[str, list[int]]:
    from deepaudit.models.fused import evenly_spaced

    per: dict[tuple, list] = {}
    for i in rows:
        per.setdefault((ctx.key[i], ctx.view[i]), []).append((ctx.meta[i]["pos"], i))
    out = {}
    for (key, view), frames in per.items():
        frames.sort()
        out[(key, view)] = [frames[j][1] for j in evenly_spaced(len(frames), k)]
    return out


def _fit_attention(spec: dict, ctx: Context, fit: np.ndarray):
    """The BiLSTM-attention head on the fold's training sequences (one per item and
    view, all its bank frames), weighted as the recipe weighs them."""
    import torch

    from deepaudit.models.clip_branch import balanced_weights
    from deepaudit.models.temporal_attention import AttentionHead, fit_attention_head

    feats = ctx.probe_features(spec["blocks"])
    seqs = _sequences(ctx, fit, None)
    names = list(seqs)
    lab = np.array([ctx.lab[seqs[n][0]] for n in names])
    w = balanced_weights(lab, np.array([ctx.groups(spec)[seqs[n][0]] for n in names]))
    torch.manual_seed(0)
    return fit_attention_head(AttentionHead(spec["blocks"]), [feats[seqs[n]] for n in names],
                              lab, w / w.mean(), seed=0)


def _attention_frame_logits(head, spec: dict, ev: Context, rows: np.ndarray) -> np.ndarray:
    """Per bank row: its item's attention logit over the item's first-K spread frames
    (so item_scores' mean over those frames is that logit)."""
    from deepaudit.models.temporal_attention import attention_scores

    feats = ev.probe_features(spec["blocks"])
    seqs = {key: r for (key, _), r in _sequences(ev, rows, K).items()}
    keys = list(seqs)
    logits, _, _ = attention_scores(head, [feats[seqs[k]] for k in keys])
    item = dict(zip(keys, logits.tolist()))
    return np.array([item.get(ev.key[i], 0.0) for i in rows], np.float32)


def _attention_auc(spec, ctx, fit, rows, vids, y) -> float | None:
    from deepaudit.models.metrics import roc_auc
    from deepaudit.models.temporal_attention import attention_scores

    head = _fit_attention(spec, ctx, fit)
    feats = ctx.probe_features(spec["blocks"])
    test = {key: r for (key, _), r in _sequences(ctx, rows, K).items()}
    logits, _, _ = attention_scores(head, [feats[test[v]] for v in vids])
    return roc_auc(y, list(logits))


def _temporal_auc(spec, ctx, probe, fit, rows, vids, y, full) -> float | None:
    """The mean frame logit plus a learnt multiple of how much the probe's input moves
    between consecutive scored frames (fitted on the fold's training videos)."""
    import torch

    from deepaudit.models.clip_branch import probe_inputs
    from deepaudit.models.metrics import roc_auc

    feats = probe_inputs(torch.from_numpy(ctx.cls.astype(np.float32)), spec["blocks"]).numpy()
    with torch.no_grad():
        fit_logits = probe(torch.from_numpy(ctx.cls[fit].astype(np.float32))).numpy()
    logit_of = dict(zip(fit.tolist(), fit_logits.tolist()))

    def motion(r: list[int]) -> float:
        return float(np.mean(np.linalg.norm(np.diff(feats[r], axis=0), axis=1))) \
            if len(r) > 1 else 0.0

    train = [(r, ctx.lab[r[0]]) for (key, view), r in _sequences(ctx, fit, K).items()
             if view == "orig" and len(r) > 1]
    if len({lab for _, lab in train}) < 2:
        return None
    m = np.array([motion(r) for r, _ in train])
    mu, sd = m.mean(), m.std() + 1e-9
    base = np.array([np.mean([logit_of[i] for i in r]) for r, _ in train])
    lab = torch.tensor([float(lab) for _, lab in train])
    beta = torch.zeros(2, requires_grad=True)
    opt = torch.optim.LBFGS([beta], max_iter=100, line_search_fn="strong_wolfe")
    z, b0 = torch.from_numpy((m - mu) / sd).float(), torch.from_numpy(base).float()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            b0 + beta[0] * z + beta[1], lab) + 1e-2 * beta[0] ** 2
        loss.backward()
        return loss

    opt.step(closure)
    test = {key: r for (key, _), r in _sequences(ctx, rows, K).items()}
    scores = [float(np.mean(full[test[v]])) + float(beta[0]) * (motion(test[v]) - mu) / sd
              for v in vids]
    return roc_auc(y, scores)


def summarise_videos(video: dict) -> dict:
    names = [n for n in next(iter(video.values())) if n != "n"] if video else []
    table = {n: {f: None if r[n] is None else round(r[n], 4) for f, r in video.items()}
             for n in names}
    means = {n: float(np.mean([v for v in t.values() if v is not None])) for n, t in
             table.items()}
    return {"by_scorer": table, "mean_by_scorer": {n: round(v, 4) for n, v in means.items()},
            "n_videos": {f: r["n"] for f, r in video.items()}}


def main(
    train: Annotated[str, typer.Option(help="Training collection.")] = "../shared/data/train",
    only: Annotated[Optional[str], typer.Option(help="Comma-separated candidate names.")]
        = None,
    merge: Annotated[list[str], typer.Option(
        help="FAMILY=INTO: hold FAMILY out together with INTO (repeatable).")]
        = ["text-to-image=gan-face"],  # noqa: B006 (typer reads the default)
    talking: Annotated[str, typer.Option(
        help="Families whose real clips are talking-head footage (for the FPR).")] = TALKING,
    tokens: Annotated[bool, typer.Option(
        help="Also cache each view's tokens after block 10 (tuned candidates need them).")]
        = False,
    video_scorers: Annotated[bool, typer.Option(
        help="Also compare video scorers on the folds with video fakes.")] = False,
    folds_only: Annotated[Optional[str], typer.Option(
        "--folds", help="Comma-separated folds to run (exploration; the table needs all).")]
        = None,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
    record: Annotated[bool, typer.Option(help="Append to bench/results/.")] = True,
    card: Annotated[Optional[str], typer.Option(
        help="Write the (first) candidate's table into this model card's "
             "metrics.leave_one_family_out.")] = None,
    eval_perturb: Annotated[Optional[str], typer.Option(
        help="Score the held-out (and calibration) items on their views with this "
             "perturbation, e.g. resize:0.5: both classes lose the same detail, so a "
             "candidate that leans on resolution differences between them is found out. "
             "Training views stay as they are.")] = None,
) -> None:
    import torch
    from record import append_record  # bench/record.py

    from deepaudit.training.families import family_folds, parse_merge

    torch.set_num_threads(threads)
    if card and eval_perturb:
        raise typer.BadParameter("--card records the clean table: leave out --eval-perturb")
    names = only.split(",") if only else list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise typer.BadParameter(f"unknown candidates {unknown}; known: {list(CANDIDATES)}")
    need_tokens = tokens or any(CANDIDATES[n]["kind"] in ("ln", "gap") for n in names)
    items, bank = load(train, need_tokens)
    folds = family_folds(items, parse_merge(merge))
    if folds_only:
        folds = [f for f in folds if f.name in folds_only.split(",")]
    print("folds: " + "; ".join(f"{f.name} (+{','.join(f.pools)})" for f in folds), flush=True)
    ctx = Context(items, bank)
    scored = Context(*load(train, False, perturb=eval_perturb)) if eval_perturb else None
    others: dict[float, Context] = {}
    results = []
    for name in names:
        spec = CANDIDATES[name]
        train_ctx = None
        if spec.get("lowres"):
            if spec["lowres"] not in others:
                others[spec["lowres"]] = Context(*load(train, False, spec["lowres"]))
            train_ctx = others[spec["lowres"]]
        if scored is not None:
            train_ctx = train_ctx or ctx
        res = run_candidate(name, spec, scored or ctx, folds, set(talking.split(",")),
                            video_scorers, train_ctx)
        if eval_perturb:
            res["eval_perturb"] = eval_perturb
        results.append(res)
        print(json.dumps(res), flush=True)
        if record:
            append_record(Path(__file__).parent / "results" / "family_loso.jsonl", res)
    if card:
        write_card(card, results[0])


def write_card(path: str, res: dict) -> None:
    """Record ``res`` as the card's leave-one-family-out measurement."""
    p = Path(path).with_suffix(".json")
    data = json.loads(p.read_text())
    data.setdefault("metrics", {})["leave_one_family_out"] = {
        "mean_auc": res["mean_auc"], "min_auc": res["min_auc"],
        "worst_family": res["worst_family"], "by_family": res["by_family"],
        "talking_real_fpr": res["talking_real_fpr"], "candidate": res["candidate"],
        "frames_per_video": res["frames_per_video"],
        "protocol": "bench/family_loso.py: hold out each family with fakes (family column "
                    "of the training manifest), train on the rest (80 %, the recipe's "
                    "split; threshold at 5 % false positives on the other 20 %), score the "
                    "held-out fakes against the family's own reals and every real of the "
                    "reals-only families of a matching domain",
    }
    p.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    typer.run(main)
