"""Frozen CLIP features of cached training crops: the input of the CLIP branch's probe.

The CLIP tower is frozen, so each crop is embedded once and the features are cached
(``<cache>/clip_features/<key>.npz``); probes, leave-one-source-out runs and the fused
recipe then cost seconds. Per crop we keep the CLS token after every block (12 x 768,
float16): probes on intermediate blocks carry low-level cues the last block loses.

Views of a training crop (seeded by the item's media id, so a rebuild, or a fresh copy
of the data, gives the same bank):

* ``orig``: the crop after one JPEG round trip at a random quality, which removes the
  file-format tell of the PNG-only fakes (the training collection's README, confound 1);
* ``sbi``: for real crops, a self-blended fake of the same face (also re-encoded), so
  every real source appears as fake too and "looks like source X" carries no label.

Evaluation crops (``augment=False``) are embedded as they are, or after a fixed
perturbation (``perturb="jpeg:50"``) for the robustness figure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from deepaudit.models.augment import jpeg_roundtrip
from deepaudit.models.clip_vit import CONVERTED_SHA256, LAYERS, cache_dir
from deepaudit.models.fused import evenly_spaced
from deepaudit.models.perturb import Perturbation, apply_perturbation
from deepaudit.models.sbi import self_blend

log = logging.getLogger(__name__)
BANK_FORMAT = "deepaudit-clip-bank/2"  # /2: views seeded by media_id, not item_key


@dataclass(frozen=True)
class BankConfig:
    frames: int = 8  # crops embedded per video, evenly spaced over the cached ones
    augment: bool = True  # training views (JPEG re-encode, SBI of reals)
    sbi_frames: int = 4  # SBI views per real video (each real image gets one)
    jpeg_min: int = 60
    jpeg_max: int = 95
    perturb: str | None = None  # evaluation only: e.g. "jpeg:50"
    seed: int = 0
    # Share of training views first downscaled to 25-60 % and back: a face's sharpness
    # then says nothing about its label (fakes are larger than reals in some sources).
    lowres: float = 0.0


def bank_key(crop_key: str, cfg: BankConfig) -> str:
    settings = asdict(cfg)
    if not settings["lowres"]:  # banks made before the setting keep their key
        del settings["lowres"]
    blob = json.dumps({"format": BANK_FORMAT, "crops": crop_key, "cfg": settings,
                       "tower": CONVERTED_SHA256}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def bank_path(crop_key: str, cfg: BankConfig):
    return cache_dir() / "clip_features" / f"{bank_key(crop_key, cfg)}.npz"


def _read(path) -> tuple[list[dict], np.ndarray]:
    if not path.is_file():
        return [], np.zeros((0, LAYERS, 768), np.float16)
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["meta"])), z["cls"]


def views(items: list[dict], crops: dict, cfg: BankConfig):
    """Yield ``(row_meta, crop)`` for every view of every item; an item's views depend
    only on the seed and its key, so any subset embeds the same."""
    perturbation = Perturbation.parse(cfg.perturb) if cfg.perturb else None
    for item in items:
        # Seeded by the media id (a path inside the input), never by the item key, which
        # holds the file's mtime: a fresh copy of the data must give the same views.
        digest = hashlib.sha256(item["media_id"].encode()).digest()
        rng = np.random.default_rng([cfg.seed, int.from_bytes(digest[:8], "little")])
        arr, _ = crops[item["item_key"]]
        positions = evenly_spaced(len(arr), cfg.frames)
        sbi_positions = set(evenly_spaced(len(arr), cfg.sbi_frames)) if cfg.augment else set()
        for pos in positions:
            crop = arr[pos]
            base = {"item_key": item["item_key"], "pos": pos, "source": item["source"],
                    "group": item["group"], "media_type": item["media_type"],
                    "media_id": item["media_id"]}
            if cfg.augment:
                q = int(rng.integers(cfg.jpeg_min, cfg.jpeg_max + 1))
                view = _lowres(crop, cfg.lowres, rng)
                yield {**base, "view": "orig", "label": item["label"]}, jpeg_roundtrip(view, q)
                if item["label"] == 0 and pos in sbi_positions:
                    fake = _lowres(self_blend(crop, rng), cfg.lowres, rng)
                    q = int(rng.integers(cfg.jpeg_min, cfg.jpeg_max + 1))
                    yield {**base, "view": "sbi", "label": 1}, jpeg_roundtrip(fake, q)
            else:
                if perturbation is not None:
                    crop = apply_perturbation(crop, perturbation)
                yield {**base, "view": "orig", "label": item["label"]}, crop


def tokens_path(crop_key: str, cfg: BankConfig, after: int):
    """Where the residual stream after block ``after`` of a bank's rows is cached."""
    return bank_path(crop_key, cfg).with_suffix(f".tokens{after}.npy")


def _lowres(crop: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """With probability ``share``, the crop downscaled to 25-60 % of its side and back
    (no random draw at all when ``share`` is 0: older banks' views stay the same)."""
    if not share or rng.random() >= share:
        return crop
    import cv2

    side = crop.shape[0]
    small = max(8, int(round(side * rng.uniform(0.25, 0.6))))
    down = cv2.resize(crop, (small, small), interpolation=cv2.INTER_AREA)
    return cv2.resize(down, (side, side), interpolation=cv2.INTER_LINEAR)


def build_bank(items: list[dict], crops: dict, crop_key: str, cfg: BankConfig,
               embed: Callable[[np.ndarray], np.ndarray] | None = None,
               batch: int = 16, on_progress: Callable[[int], None] | None = None,
               tokens_after: int | None = None) -> dict:
    """The feature bank of ``items`` (dicts with item_key, label, source, group,
    media_type, media_id): ``{"meta": [...], "cls": [n, 12, 768] float16}``.

    Banks are cached per crop cache and :class:`BankConfig`; only items not yet in the
    cache are embedded (``crops`` needs to hold just those: ``load_crops`` output).
    ``tokens_after``: also the whole token sequence after that block (``"tokens"``,
    ``[n, 197, 768]`` float16, cached beside the bank), for tuning the blocks after it;
    ``embed`` then returns ``(cls, tokens)``."""
    path = bank_path(crop_key, cfg)
    meta, cls = _read(path)
    tok_path = tokens_path(crop_key, cfg, tokens_after) if tokens_after else None
    tokens = None
    if tok_path is not None:
        tokens = np.load(tok_path) if tok_path.is_file() else None
        if tokens is None or len(tokens) != len(meta):  # embed everything again
            meta, cls, tokens = [], cls[:0], None
    have = {m["item_key"] for m in meta}
    todo = [i for i in items if i["item_key"] not in have]
    if todo:
        if embed is None:
            from deepaudit.models.clip_branch import ClipEmbedder
            embedder = ClipEmbedder()
            embed = (embedder.cls_tokens if tokens_after is None else
                     lambda x: embedder.cls_and_tokens(x, tokens_after))
        new_meta, feats, toks, pending, t0 = [], [], [], [], time.perf_counter()

        def flush() -> None:
            out = embed(np.stack([c for _, c in pending]))
            if tokens_after is not None:
                out, tok = out
                toks.append(np.asarray(tok, np.float16))
            feats.append(np.asarray(out).astype(np.float16))
            new_meta.extend(m for m, _ in pending)
            pending.clear()
            if on_progress:
                on_progress(len(new_meta))

        for view in views(todo, crops, cfg):
            pending.append(view)
            if len(pending) == batch:
                flush()
        if pending:
            flush()
        log.info("embedded %d crops in %.0f s", len(new_meta), time.perf_counter() - t0)
        meta = meta + new_meta
        cls = np.concatenate([cls, *feats]) if feats else cls
        path.parent.mkdir(parents=True, exist_ok=True)
        if tok_path is not None:
            parts = ([] if tokens is None else [tokens]) + toks
            tokens = np.concatenate(parts) if parts else None
            tmp_tok = tok_path.with_name(tok_path.name + ".tmp.npy")
            np.save(tmp_tok, tokens)
            tmp_tok.replace(tok_path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, meta=json.dumps(meta), cls=cls)
        tmp.replace(path)
    wanted = {i["item_key"] for i in items}
    # Rows in a fixed order (not the order in which runs filled the cache), so a probe
    # fitted on them does not depend on the cache's history.
    keep = sorted((j for j, m in enumerate(meta) if m["item_key"] in wanted),
                  key=lambda j: (meta[j]["media_id"], meta[j]["pos"], meta[j]["view"]))
    out = {"meta": [meta[j] for j in keep], "cls": cls[keep]}
    if tokens is not None:
        out["tokens"] = tokens[keep]
    return out
