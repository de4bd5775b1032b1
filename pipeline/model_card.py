"""The model card in brief, as each verdict file's Parquet metadata carries it, and its
out-of-domain figures (``deepaudit models``, the audit and serve show them)."""

from __future__ import annotations

from typing import Any

# The Parquet key-value metadata key of each verdict file's model card summary (JSON).
CARD_METADATA_KEY = "deepaudit.model_card"


def ood_figures(handle) -> dict[str, float]:
    """The card's out-of-domain ROC AUC figures, as the card holds them: ``overall``
    (what every verdict surface shows, :attr:`ModelHandle.quality`), then each other
    top-level ``*auc`` figure of ``metrics.out_of_domain`` (``image``, ``video``, ...), and
    the leave-one-family-out (or, older cards, leave-one-source-out) mean when the card
    has one."""
    quality = handle.quality
    out = {} if quality.get("ood_auc") is None else {"overall": float(quality["ood_auc"])}
    ood = ((handle.card or {}).get("metrics") or {}).get("out_of_domain") or {}
    for key, value in ood.items():
        if key != "roc_auc" and "auc" in key and isinstance(value, (int, float)) \
                and not isinstance(value, bool):
            out[key.removesuffix("_roc_auc").removesuffix("_auc") or key] = float(value)
    if quality.get("loso_auc") is not None:  # on the training collection, held out in turn
        held_out = "family" if (handle.card or {}).get("metrics", {}).get(
            "leave_one_family_out") else "source"
        out[f"leave-one-{held_out}-out"] = float(quality["loso_auc"])
    return out


def card_summary(handle) -> dict[str, Any]:
    """The model card in brief, as written into each verdict file's Parquet metadata."""
    card = handle.card or {}
    quality = handle.quality
    return {
        "model": handle.model_id,
        "model_sha256": handle.sha256,
        "trained": handle.trained,
        "threshold": handle.config.threshold,
        "frames": handle.config.frames,
        "branch_frames": handle.config.branch_frames,
        "created_at": card.get("created_at"),
        "training_data": card.get("training_data"),
        "out_of_domain_auc": ood_figures(handle),
        "out_of_domain_data": quality.get("ood_data"),
        "quality_bar": quality.get("bar"),
        "summary": quality.get("summary"),
        "caveat": quality.get("caveat"),
    }
