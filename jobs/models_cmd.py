"""``deepaudit models``: the registered architectures, the weights that ship, and what the
model card measured on sources the model never trained on."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deepaudit.pipeline.model_card import ood_figures


def _figures_text(figures: dict[str, float]) -> str:
    if not figures:
        return "not measured"
    return ", ".join(f"{k} {v:.2f}" for k, v in figures.items())


def models_command() -> None:
    """List registered model architectures, the weights that ship with deepaudit, and
    each one's ROC AUC on media from sources it never trained on (from its model card)."""
    from deepaudit.models.checkpoint import resolve_model
    from deepaudit.models.registry import list_models

    t = Table("name", "input", "frames", "threshold", "weights",
              "ROC AUC on unseen sources")
    caveats = {}
    default = resolve_model(None).name
    for name in list_models():
        h = resolve_model(name)
        trained = h.trained
        t.add_row(f"{name} (default)" if name == default else name,
                  str(h.config.input_size), str(h.config.frames), f"{h.config.threshold:.3f}",
                  h.model_id if trained else "untrained",
                  _figures_text(ood_figures(h)) if trained else "-")
        if trained and h.quality.get("caveat"):
            caveats[name] = h.quality["caveat"]
    out = Console()
    out.print(t)
    for name, caveat in caveats.items():
        out.print(f"[yellow]{escape(name)}:[/yellow] {escape(caveat)}", soft_wrap=True)
