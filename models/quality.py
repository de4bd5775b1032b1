"""What a verdict's reader should know about the model that made it: its measured quality
from the card, a caveat when that is low or unknown, and the one line every surface (the
run summary table, the HTML report) shows for it. Imports no torch, so the report stays
light."""

from __future__ import annotations

from typing import Any

# Below this ROC AUC on media from sources the model never trained on, every verdict
# surface carries a caveat.
QUALITY_BAR = 0.80
# Below this ROC AUC on one family of fakes held out of training, the caveat names it.
FAMILY_BAR = 0.70


def shown(auc: float) -> str:
    """An AUC as every surface prints it (two decimals). The caveat compares this printed
    figure with the bar, so a line never reads "0.80 (below 0.80)"."""
    return f"{auc:.2f}"


def below_bar(auc: float) -> bool:
    """Whether ``auc``, as printed, is below :data:`QUALITY_BAR`."""
    return float(shown(auc)) < QUALITY_BAR


def model_quality(card: dict[str, Any] | None, trained: bool = True) -> dict[str, Any]:
    """What a verdict's reader should know about the model: its measured out-of-domain ROC
    AUC (``card["metrics"]["out_of_domain"]``), its mean AUC on the training collection's
    families (``leave_one_family_out``) or sources (``leave_one_source_out``, older cards)
    held out one at a time, a one-line ``summary`` of these, and a one-line caveat when
    either is below :data:`QUALITY_BAR`, the out-of-domain AUC was never measured, or a
    held-out family scores below :data:`FAMILY_BAR` (the caveat names it)."""
    metrics = (card or {}).get("metrics") or {}
    ood = metrics.get("out_of_domain") or {}
    auc = ood.get("roc_auc")
    lofo = metrics.get("leave_one_family_out") or {}
    loso_block = lofo or metrics.get("leave_one_source_out") or {}
    held_out = "families" if lofo else "sources"
    loso = loso_block.get("mean_auc")
    parts = ["not measured" if auc is None else f"ROC AUC {shown(auc)} on unseen sources"]
    if lofo and loso is not None:
        worst, family = lofo.get("min_auc"), lofo.get("worst_family")
        parts.append(f"leave-one-family-out mean {shown(loso)}"
                     + (f", worst {shown(worst)} ({family})" if worst is not None else ""))
    elif loso is not None:
        scope = loso_block.get("scope")
        parts.append(f"leave-one-source-out mean {shown(loso)}" + (f" ({scope})" if scope else ""))
    out = {"ood_auc": auc, "ood_data": ood.get("data"), "loso_auc": loso, "bar": QUALITY_BAR,
           "worst_family": lofo.get("worst_family"), "worst_family_auc": lofo.get("min_auc"),
           "summary": "; ".join(parts), "caveat": None}
    if not trained:
        out["caveat"] = "untrained model: its scores are not evidence"
        return out
    if auc is None:
        out["caveat"] = ("no accuracy on unseen sources was measured for this model: treat "
                         "its verdicts as unverified leads")
    elif below_bar(auc):
        out["caveat"] = (f"this model's ROC AUC on media from sources it never trained on is "
                         f"{shown(auc)} (below {shown(QUALITY_BAR)}): a verdict is a lead for "
                         "human review, not a finding")
    elif loso is not None and below_bar(loso):
        # The out-of-domain set is small; the held-out mean is the sterner estimate.
        out["caveat"] = (f"this model's mean ROC AUC on training {held_out} held out one at a "
                         f"time is {shown(loso)} (below {shown(QUALITY_BAR)}): a verdict is a lead "
                         "for human review, not a finding")
    worst = lofo.get("min_auc")
    if worst is not None and float(shown(worst)) < FAMILY_BAR:
        weak = (f"on {lofo.get('worst_family')} fakes, held out of training, it scores ROC AUC "
                f"{shown(worst)}: its verdicts on that kind of fake are close to guesses")
        out["caveat"] = f"{out['caveat']}; {weak}" if out["caveat"] else weak
    return out


def quality_text(quality: dict[str, Any] | None) -> str:
    """One plain line for a ``model_quality`` dict (a run summary's, or
    :func:`model_quality`'s): its ``summary``, or for summaries written before that key
    existed, the out-of-domain AUC; ``-`` for none. The summary table and the HTML report
    both show it."""
    if not quality:
        return "-"
    auc = quality.get("ood_auc")
    return quality.get("summary") or (
        "not measured" if auc is None else f"ROC AUC {shown(auc)} on unseen sources")
