"""What a verdict's reader should know about the model that made it: its measured quality
from the card, a caveat when that is low or unknown, and the one line every surface (the
run summary table, the HTML report) shows for it. Imports no torch, so the report stays
light."""

from __future__ import annotations

from typing import Any

# Below this ROC AUC on media from sources the model never trained on, every verdict
# surface carries a caveat.
QUALITY_BAR = 0.80


def shown(auc: float) -> str:
    """An AUC as every surface prints it (two decimals). The caveat compares this printed
    figure with the bar, so a line never reads "0.80 (below 0.80)"."""
    return f"{auc:.2f}"


def below_bar(auc: float) -> bool:
    """Whether ``auc``, as printed, is below :data:`QUALITY_BAR`."""
    return float(shown(auc)) < QUALITY_BAR


def model_quality(card: dict[str, Any] | None, trained: bool = True) -> dict[str, Any]:
    """What a verdict's reader should know about the model: its measured out-of-domain ROC
    AUC (``card["metrics"]["out_of_domain"]``), its leave-one-source-out mean AUC on the
    training collection (``card["metrics"]["leave_one_source_out"]``), a one-line
    ``summary`` of both, and a one-line caveat when either is below :data:`QUALITY_BAR`
    or the out-of-domain AUC was never measured."""
    metrics = (card or {}).get("metrics") or {}
    ood = metrics.get("out_of_domain") or {}
    auc = ood.get("roc_auc")
    loso_block = metrics.get("leave_one_source_out") or {}
    loso = loso_block.get("mean_auc")
    parts = ["not measured" if auc is None else f"ROC AUC {shown(auc)} on unseen sources"]
    if loso is not None:
        scope = loso_block.get("scope")
        parts.append(f"leave-one-source-out mean {shown(loso)}" + (f" ({scope})" if scope else ""))
    out = {"ood_auc": auc, "ood_data": ood.get("data"), "loso_auc": loso, "bar": QUALITY_BAR,
           "summary": "; ".join(parts), "caveat": None}
    if not trained:
        out["caveat"] = "untrained model: its scores are not evidence"
    elif auc is None:
        out["caveat"] = ("no accuracy on unseen sources was measured for this model: treat "
                         "its verdicts as unverified leads")
    elif below_bar(auc):
        out["caveat"] = (f"this model's ROC AUC on media from sources it never trained on is "
                         f"{shown(auc)} (below {shown(QUALITY_BAR)}): a verdict is a lead for "
                         "human review, not a finding")
    elif loso is not None and below_bar(loso):
        # The out-of-domain set is small; the held-out-source mean is the sterner estimate.
        out["caveat"] = (f"this model's mean ROC AUC on training sources held out one at a "
                         f"time is {shown(loso)} (below {shown(QUALITY_BAR)}): a verdict is a lead "
                         "for human review, not a finding")
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
