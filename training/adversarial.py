"""Adversarial training of the CLIP branch's probe (recipe keys ``adv_eps``, ``adv_steps``,
``adv_crops``): attack training crops with PGD through the frozen tower against the
fitted probe, embed the attacked crops, and refit the probe on clean and attacked
features. The tower is frozen, so one round of attacks is the whole cost (about 0.8 s
per crop for two steps on two CPU cores); models/adversarial.py has the attack.
"""

from __future__ import annotations

import numpy as np

from deepaudit.models.adversarial import PGDConfig, clip_probe_logits, pgd_attack
from deepaudit.models.clip_branch import CLIP_PREPROCESS, ClipEmbedder, ClipProbe
from deepaudit.models.fused import shared_tower
from deepaudit.training.clip_features import BankConfig, views


def pick_rows(meta: list[dict], rows, n: int, seed: int) -> list[int]:
    """Up to ``n`` bank rows of ``rows``, half of each label, deterministic."""
    rng = np.random.default_rng(seed)
    out = []
    for label in (0, 1):
        pool = [int(i) for i in rows if meta[i]["label"] == label]
        out += sorted(rng.choice(pool, min(n // 2, len(pool)), replace=False).tolist())
    return out


def view_crop(meta_row: dict, item: dict, crops: dict, cfg: BankConfig) -> np.ndarray:
    """The uint8 crop a bank row's features came from (views are seeded per item)."""
    for m, crop in views([item], crops, cfg):
        if m["pos"] == meta_row["pos"] and m["view"] == meta_row["view"]:
            return crop
    raise KeyError(f"no {meta_row['view']} view at frame {meta_row['pos']} of "
                   f"{meta_row['item_key']}")


def adversarial_features(probe: ClipProbe, meta: list[dict], rows: list[int],
                         crop_of, pgd: PGDConfig, batch: int = 8,
                         on_progress=None) -> tuple[np.ndarray, np.ndarray]:
    """CLS tokens ``[n, 12, 768]`` (float16) and labels of the bank ``rows`` after a PGD
    attack against ``probe`` (each crop pushed away from its own label).
    ``crop_of(meta_row)`` gives the crop behind a row."""
    import torch

    tower = shared_tower(torch.device("cpu"))
    logits_fn = clip_probe_logits(tower, probe, CLIP_PREPROCESS.normaliser("cpu"))
    embed = ClipEmbedder()
    feats, labels = [], []
    for start in range(0, len(rows), batch):
        idx = rows[start:start + batch]
        crops = np.stack([crop_of(meta[i]) for i in idx])
        y = np.array([meta[i]["label"] for i in idx])
        adv = pgd_attack(logits_fn, crops, y, pgd)
        feats.append(embed.cls_tokens(adv).astype(np.float16))
        labels.append(y)
        if on_progress:
            on_progress(start + len(idx))
    if not feats:
        return np.zeros((0, 12, 768), np.float16), np.zeros(0, np.int64)
    return np.concatenate(feats), np.concatenate(labels)


ADV_SHARE = 1 / 3  # of the refitted probe's training weight


def refit_probe(probe: ClipProbe, cls: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                adv_cls: np.ndarray, adv_labels: np.ndarray, l2: float) -> ClipProbe:
    """A new probe on clean + attacked features, the attacked ones carrying ADV_SHARE of
    the weight."""
    from deepaudit.models.clip_branch import fit_probe

    adv_w = np.full(len(adv_labels),
                    weights.sum() * ADV_SHARE / (1 - ADV_SHARE) / max(len(adv_labels), 1))
    return fit_probe(ClipProbe(probe.blocks), np.concatenate([cls, adv_cls]),
                     np.concatenate([labels, adv_labels]), np.concatenate([weights, adv_w]),
                     l2=l2)
