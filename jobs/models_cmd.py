"""``deepaudit models``: the registered architectures, the weights that ship, and what the
model card measured on sources the model never trained on."""

from __future__ import annotations

import textwrap

from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from deepaudit.pipeline.model_card import ood_figures

AUC_HEADER = "ROC AUC on unseen sources"


def _figures_text(figures: dict[str, float]) -> str:
    if not figures:
        return "not measured"
    return ", ".join(f"{k} {v:.2f}" for k, v in figures.items())


def _print_table(out: Console, rows: list[tuple[str, ...]]) -> bool:
    """One table when it fits with every cell but the AUC figures on one line; False (and
    nothing printed) when the terminal is narrower than that."""
    t = Table("name", "input", "frames", "threshold", "weights")
    for column in t.columns:
        column.no_wrap = True  # a name is what the user copies: never cut or wrapped
    t.add_column(AUC_HEADER)
    for row in rows:
        t.add_row(*row)
    if out.width < Measurement.get(out, out.options.update_width(10_000), t).minimum:
        return False
    out.print(t)
    return True


def _print_list(out: Console, rows: list[tuple[str, ...]]) -> None:
    """The narrow layout (an 80-column terminal, a pipe): one block per model, the name
    alone on its first line, the rest wrapped between words."""
    def indented(text: str) -> str:
        return textwrap.fill(text, max(out.width, 20), initial_indent="  ",
                             subsequent_indent="  ", break_long_words=False,
                             break_on_hyphens=False)

    for name, size, frames, threshold, weights, figures in rows:
        weights = weights if weights == "untrained" else f"weights {weights}"
        lines = [indented(f"{size} px, {frames} frames, threshold {threshold}, {weights}")]
        if figures != "-":
            lines.append(indented(f"{AUC_HEADER}: {figures}"))
        out.print(f"[bold]{escape(name)}[/bold]\n" + escape("\n".join(lines)), soft_wrap=True)


def models_command() -> None:
    """List registered model architectures, the weights that ship with deepaudit, and
    each one's ROC AUC on media from sources it never trained on (from its model card)."""
    from deepaudit.models.checkpoint import resolve_model
    from deepaudit.models.registry import list_models

    rows, caveats = [], {}
    default = resolve_model(None).name
    for name in list_models():
        h = resolve_model(name)
        trained = h.trained
        rows.append((f"{name} (default)" if name == default else name,
                     str(h.config.input_size), str(h.config.frames),
                     f"{h.config.threshold:.3f}", h.model_id if trained else "untrained",
                     _figures_text(ood_figures(h)) if trained else "-"))
        if trained and h.quality.get("caveat"):
            caveats[name] = h.quality["caveat"]
    out = Console()
    if not _print_table(out, rows):
        _print_list(out, rows)
    for name, caveat in caveats.items():
        out.print(f"[yellow]{escape(name)}:[/yellow] {escape(caveat)}", soft_wrap=True)
