"""Patch tokens of cached training crops for the learnt localisation head (models/mask_head.py).

The CLIP tower is frozen, so each view is embedded once and its patch tokens after the
configured blocks are cached (``<cache>/patch_features/<key>.npz``, keyed by the crop
cache key, :class:`PatchConfig` and the tower's hash). Per selected item we take one
frame (the middle one) and make, all seeded by the item key:

* reals: ``orig`` (the crop after a JPEG round trip, target all zero) and ``sbi`` (a
  self-blended fake of it, JPEG round trip too, target the blended region);
* fakes (only when ``max_fakes_per_source`` > 0, for the bench's detection AUC):
  ``orig``, with no target (``has_mask`` false).

Targets are kept at ``mask_size`` (56 px: IoU is measured there) and area-averaged to
the 14 x 14 token grid for training.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from deepaudit.models.augment import jpeg_roundtrip
from deepaudit.models.clip_vit import CONVERTED_SHA256, cache_dir
from deepaudit.models.mask_head import GRID, MaskHead, downsample, fit_mask_head, iou
from deepaudit.models.sbi import self_blend

PATCH_FORMAT = "deepaudit-patch-bank/2"  # /2: seeded by media_id, not item_key


@dataclass(frozen=True)
class PatchConfig:
    blocks: tuple[int, ...] = (8,)  # token blocks cached per view
    max_reals_per_source: int = 150  # one frame each, chosen by a hash of the item key
    max_fakes_per_source: int = 0
    mask_size: int = 56  # stored targets; IoU is measured at this size
    # Share of SBI views blended only inside a random blob of the face mask: SBI face
    # masks are nearly one centred ellipse (a constant guess scores IoU ~0.77 on them),
    # so only these views test localisation.
    partial: float = 0.0
    jpeg_min: int = 60
    jpeg_max: int = 95
    seed: int = 0


def _default_features() -> PatchConfig:
    return PatchConfig(blocks=(4,), partial=0.5)


@dataclass(frozen=True)
class MaskHeadConfig:
    # Defaults from bench/mask_head_loso.py: block 4 had the best held-out IoU of 4, 6,
    # 8, 12; half the SBI views partial, so the head cannot just learn the mean ellipse.
    block: int = 4
    hidden: int = 64
    epochs: int = 12
    lr: float = 2e-3
    val_fraction: float = 0.2  # groups held out to measure IoU
    features: PatchConfig = field(default_factory=_default_features)
    seed: int = 0


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def select_items(items: list[dict], cfg: PatchConfig) -> list[dict]:
    """At most ``max_reals_per_source`` reals and ``max_fakes_per_source`` fakes per
    source (deterministic: the lowest hashes of seed and media id; the item key holds the
    file's mtime, so a fresh copy of the data would pick others)."""
    out = []
    for label, cap in ((0, cfg.max_reals_per_source), (1, cfg.max_fakes_per_source)):
        by_source: dict[str, list[dict]] = {}
        for item in items:
            if item["label"] == label:
                by_source.setdefault(item["source"], []).append(item)
        for rows in by_source.values():
            out += sorted(rows, key=lambda r: _rank(cfg.seed, r["media_id"]))[:cap]
    return out


def bank_path(crop_key: str, cfg: PatchConfig):
    fields = asdict(cfg)
    if not fields["partial"]:
        del fields["partial"]  # banks made before the option keep their key
    blob = json.dumps({"format": PATCH_FORMAT, "crops": crop_key, "cfg": fields,
                       "tower": CONVERTED_SHA256}, sort_keys=True)
    return cache_dir() / "patch_features" / f"{hashlib.sha256(blob.encode()).hexdigest()[:16]}.npz"


def blob(size: int, rng: np.random.Generator) -> np.ndarray:
    """A soft random ellipse ``[size, size]`` in [0, 1]: centre within the central 60 %,
    semi-axes 10-30 % of the side, any angle, blurred edge."""
    import cv2

    m = np.zeros((size, size), np.float32)
    c = tuple(int(v) for v in rng.uniform(0.2, 0.8, 2) * size)
    axes = tuple(int(v) for v in rng.uniform(0.10, 0.30, 2) * size)
    cv2.ellipse(m, c, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    sigma = rng.uniform(0.01, 0.04) * size
    return cv2.GaussianBlur(m, (0, 0), sigma)


def partial_blend(crop: np.ndarray, fake: np.ndarray, mask: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The SBI blend kept only inside a random blob: ``crop + b * (fake - crop)`` is the
    same source blended through mask ``b * mask`` (exactly, up to uint8 rounding)."""
    for _ in range(8):  # a blob that overlaps the blend
        b = blob(crop.shape[0], rng)
        if (b * mask).max() >= 0.25:
            break
    out = crop.astype(np.float32) + b[..., None] * (fake.astype(np.float32) - crop)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), b * mask


def _views(items: list[dict], crops: dict, cfg: PatchConfig):
    """``(meta, crop, target [mask_size]^2 or None)`` per view; seeded by the media id."""
    for item in items:
        digest = hashlib.sha256(item["media_id"].encode()).digest()
        rng = np.random.default_rng([cfg.seed, int.from_bytes(digest[:8], "little")])
        arr, _ = crops[item["item_key"]]
        pos = len(arr) // 2
        crop = arr[pos]
        base = {k: item[k] for k in ("item_key", "source", "group", "media_type", "media_id")}
        base["pos"] = pos
        q = int(rng.integers(cfg.jpeg_min, cfg.jpeg_max + 1))
        zero = np.zeros((cfg.mask_size,) * 2, np.float32)
        yield ({**base, "view": "orig", "label": item["label"],
                "has_mask": item["label"] == 0}, jpeg_roundtrip(crop, q),
               zero if item["label"] == 0 else None)
        if item["label"] == 0:
            fake, mask = self_blend(crop, rng, return_mask=True)
            kind = "face"
            if cfg.partial and rng.random() < cfg.partial:
                fake, mask = partial_blend(crop, fake, mask, rng)
                kind = "partial"
            q = int(rng.integers(cfg.jpeg_min, cfg.jpeg_max + 1))
            peak = float(mask.max(initial=0.0))
            region = mask / peak if peak > 0 else mask
            yield ({**base, "view": "sbi", "label": 1, "has_mask": True, "region": kind},
                   jpeg_roundtrip(fake, q), downsample(region[None], cfg.mask_size)[0])


def _embedder(blocks: tuple[int, ...], device: str = "cpu", chunk: int = 16):
    import torch

    from deepaudit.models.clip_branch import CLIP_PREPROCESS
    from deepaudit.models.clip_vit import load_tower

    tower = load_tower(device)
    norm = CLIP_PREPROCESS.normaliser(device)

    def embed(batch: np.ndarray) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for c in norm(batch).split(chunk):
                h, taken = tower.tokens(c), []
                for k, layer in enumerate(tower.encoder.layers[:max(blocks)], start=1):
                    h = layer(h)
                    if k in blocks:
                        taken.append(h[:, 1:])
                out.append(torch.stack(taken, 1).half().cpu())
        return torch.cat(out).numpy()

    return embed


def build_patch_bank(items: list[dict], crops: dict, crop_key: str, cfg: PatchConfig,
                     embed: Callable[[np.ndarray], np.ndarray] | None = None,
                     batch: int = 16, on_progress: Callable[[int], None] | None = None,
                     device: str = "cpu") -> dict:
    """Patch tokens of ``items`` (already selected): ``{"meta": [...], "tokens": [n,
    len(blocks), 196, 768] float16, "masks": [n, mask_size, mask_size] float16}``.

    Cached per crop cache and config; only items not in the cache are embedded
    (``crops`` needs to hold just those). ``embed`` maps uint8 crops to tokens (tests)."""
    path = bank_path(crop_key, cfg)
    blocks = tuple(sorted(cfg.blocks))
    meta: list[dict] = []
    tokens = np.zeros((0, len(blocks), GRID * GRID, 768), np.float16)
    masks = np.zeros((0, cfg.mask_size, cfg.mask_size), np.float16)
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            meta, tokens, masks = json.loads(str(z["meta"])), z["tokens"], z["masks"]
    have = {m["item_key"] for m in meta}
    todo = [i for i in items if i["item_key"] not in have]
    if todo:
        embed = embed or _embedder(blocks, device)
        new_meta, feats, targets, pending = [], [], [], []

        def flush() -> None:
            feats.append(embed(np.stack([c for _, c, _ in pending])).astype(np.float16))
            for m, _, t in pending:
                new_meta.append(m)
                targets.append(np.zeros((cfg.mask_size,) * 2, np.float32) if t is None else t)
            pending.clear()
            if on_progress:
                on_progress(len(new_meta))

        for view in _views(todo, crops, cfg):
            pending.append(view)
            if len(pending) == batch:
                flush()
        if pending:
            flush()
        meta = meta + new_meta
        tokens = np.concatenate([tokens, *feats])
        masks = np.concatenate([masks, np.stack(targets).astype(np.float16)])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, meta=json.dumps(meta), tokens=tokens, masks=masks)
        tmp.replace(path)
    wanted = {i["item_key"] for i in items}
    keep = [j for j, m in enumerate(meta) if m["item_key"] in wanted]
    return {"meta": [meta[j] for j in keep], "tokens": tokens[keep], "masks": masks[keep],
            "blocks": blocks}


def block_tokens(bank: dict, block: int, rows=None) -> np.ndarray:
    """The bank's tokens of one block, ``[n, 196, 768]`` float16."""
    j = bank["blocks"].index(block)
    return bank["tokens"][:, j] if rows is None else bank["tokens"][np.asarray(rows), j]


def predict(head: MaskHead, tokens: np.ndarray, size: int, batch: int = 64) -> np.ndarray:
    """Region probabilities ``[n, size, size]`` of cached tokens."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(tokens), batch):
            t = torch.from_numpy(np.asarray(tokens[i:i + batch], np.float32))
            out.append(head.probabilities(t, size).numpy())
    return np.concatenate(out) if out else np.zeros((0, size, size), np.float32)


def fit_on_bank(bank: dict, rows: np.ndarray, cfg: MaskHeadConfig) -> MaskHead:
    """A head fitted on the bank's ``rows`` (views with a target)."""
    target = downsample(bank["masks"][rows].astype(np.float32), GRID)
    return fit_mask_head(block_tokens(bank, cfg.block, rows), target, block=cfg.block,
                         hidden=cfg.hidden, epochs=cfg.epochs, lr=cfg.lr, seed=cfg.seed)


def iou_metrics(head: MaskHead, bank: dict, rows: np.ndarray) -> dict:
    """IoU on the SBI views among ``rows`` (at the bank's mask size) and the share of
    un-blended views among them whose predicted region is empty."""
    meta = bank["meta"]
    sbi = np.array([r for r in rows if meta[r]["view"] == "sbi"], int)
    orig = np.array([r for r in rows if meta[r]["view"] == "orig" and meta[r]["has_mask"]], int)
    size = bank["masks"].shape[-1]
    out = {"n_sbi": len(sbi), "n_real": len(orig)}
    if len(sbi):
        scores = iou(predict(head, block_tokens(bank, head.block, sbi), size),
                     bank["masks"][sbi].astype(np.float32))
        out.update(iou_mean=round(float(scores.mean()), 4),
                   iou_ge_0_5=round(float((scores >= 0.5).mean()), 4))
        kinds = np.array([meta[r].get("region", "face") for r in sbi])
        if (kinds == "partial").any():
            for kind in ("face", "partial"):
                if (kinds == kind).any():
                    out[f"iou_{kind}"] = round(float(scores[kinds == kind].mean()), 4)
                    out[f"n_{kind}"] = int((kinds == kind).sum())
    if len(orig):
        p = predict(head, block_tokens(bank, head.block, orig), size)
        out["real_empty"] = round(float((p < 0.5).all(axis=(1, 2)).mean()), 4)
    return out


def train_mask_head(items: list[dict], crops: dict, cache_key: str,
                    cfg: MaskHeadConfig | None = None, device: str = "cpu",
                    on_progress: Callable[[int], None] | None = None,
                    embed: Callable[[np.ndarray], np.ndarray] | None = None,
                    ) -> tuple[MaskHead, dict]:
    """Train the localisation head on self-blended views of the real ``items`` (dicts
    with item_key, label, source, group, media_type, media_id; ``crops`` from
    ``load_crops``, holding at least the selected reals) and measure it on a held-out
    ``val_fraction`` of groups. Returns the head (fitted on the rest) and its metrics.
    ``embed``: uint8 crops -> ``[n, len(blocks), 196, 768]`` tokens (default: the tower)."""
    cfg = cfg or MaskHeadConfig()
    feats = cfg.features
    if cfg.block not in feats.blocks:
        feats = PatchConfig(**{**asdict(feats), "blocks": (cfg.block,)})
    t0 = time.perf_counter()
    chosen = select_items([i for i in items if i["label"] == 0], feats)
    bank = build_patch_bank(chosen, crops, cache_key, feats, embed=embed, device=device,
                            on_progress=on_progress)
    groups = np.array([_rank(cfg.seed, m["group"] or m["item_key"]) for m in bank["meta"]])
    val = np.array([int(g[:8], 16) / 16**8 < cfg.val_fraction for g in groups])
    train_rows = np.where(~val)[0]
    head = fit_on_bank(bank, train_rows, cfg)
    metrics = {"block": cfg.block, "hidden": cfg.hidden, "n_train_views": len(train_rows),
               **{f"val_{k}": v for k, v in iou_metrics(head, bank, np.where(val)[0]).items()},
               "iou_size": feats.mask_size, "seconds": round(time.perf_counter() - t0, 1)}
    return head, metrics
