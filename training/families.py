"""Leave one family out: the folds every detector choice is made on.

A training collection's items carry a ``family``, the kind of manipulation their source
stands for (``../shared/data/train/MANIFEST.tsv``; a source's reals carry its family
too). Folds are read from the items, never listed in code, so a family added to the data
becomes a fold:

* every family with fakes is held out in turn (families named in ``merge`` are held out
  together with another, e.g. the six text-to-image fakes with the GAN faces);
* its fakes are scored against reals never trained on in that fold: the family's own
  reals, plus every real of the reals-only families of a matching domain: those whose
  reals are mostly images when the held-out fakes include images ("real-photo"), mostly
  videos when they include videos ("real-talking");
* the fold trains on everything else, split like the recipe splits it
  (:func:`calibration_split`): the threshold comes from the held-out part of training,
  as the shipped threshold does, so false-positive rates at it mean what they mean for
  the shipped model.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def family_of(item: dict) -> str:
    """An item's family: its ``family`` column, else its source."""
    return item.get("family") or item["source"]


@dataclass(frozen=True)
class Fold:
    name: str  # the held-out family
    families: tuple[str, ...]  # held-out fake families (``name`` and any merged into it)
    pools: tuple[str, ...]  # reals-only families whose reals are scored with it

    def held_out(self, item: dict) -> bool:
        """In this fold's test set: the held-out families' items, and the pools' reals."""
        fam = family_of(item)
        return fam in self.families or (fam in self.pools and item["label"] == 0)


def parse_merge(rules: Sequence[str]) -> dict[str, str]:
    """``["text-to-image=gan-face"]`` -> ``{"text-to-image": "gan-face"}``."""
    out = {}
    for rule in rules:
        src, sep, dst = rule.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise ValueError(f"--merge takes FAMILY=INTO, got {rule!r}")
        out[src.strip()] = dst.strip()
    return out


def family_folds(items: Sequence[dict], merge: dict[str, str] | None = None) -> list[Fold]:
    """One fold per family with fakes (merged families join their target's fold), in
    order of first appearance in the sorted family names."""
    merge = merge or {}
    fakes = Counter(family_of(i) for i in items if i["label"] == 1)
    reals = Counter(family_of(i) for i in items if i["label"] == 0)
    for src, dst in merge.items():
        if src not in fakes or dst not in fakes:
            raise ValueError(f"--merge {src}={dst}: both must be families with fakes; they "
                             f"are {', '.join(sorted(fakes))}")
    kinds = {fam: Counter(i["media_type"] for i in items if family_of(i) == fam)
             for fam in reals}
    pools = {fam: kinds[fam].most_common(1)[0][0] for fam in reals if fam not in fakes}
    folds = []
    for fam in sorted(fakes):
        if fam in merge:
            continue
        members = (fam, *sorted(f for f, d in merge.items() if d == fam))
        media = {i["media_type"] for i in items if i["label"] == 1 and family_of(i) in members}
        folds.append(Fold(fam, members, tuple(sorted(p for p, k in pools.items() if k in media))))
    return folds


def calibration_split(items: Sequence[dict], fraction: float = 0.2,
                      seed: int = 0) -> tuple[set[str], set[str]]:
    """(fit, calibration) item keys: ``fraction`` of the groups, by a seeded hash of the
    group, go to calibration, as the recipe's validation split does (never frames of
    one group on both sides)."""
    fit, cal = set(), set()
    for it in items:
        h = hashlib.sha256(f"{seed}:{it['group']}".encode()).digest()
        (cal if int.from_bytes(h[:8], "little") / 2**64 < fraction else fit).add(
            it["item_key"])
    return fit, cal


def summarise(by_family: dict[str, float | None]) -> dict:
    """Mean and worst of the folds' AUCs (folds without an AUC left out)."""
    vals = {k: v for k, v in by_family.items() if v is not None}
    if not vals:
        return {"mean_auc": None, "min_auc": None, "worst_family": None}
    worst = min(vals, key=vals.get)
    return {"mean_auc": float(np.mean(list(vals.values()))), "min_auc": vals[worst],
            "worst_family": worst}
