"""Issue 24 item 5: the README's model table quotes the shipped default model card's
out-of-domain figures, whatever they are (the card is the one source of truth)."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from deepaudit.jobs.cli import app
from deepaudit.models.checkpoint import resolve_model
from deepaudit.pipeline.model_card import ood_figures

README = Path(__file__).resolve().parents[1] / "README.md"


def _metrics_block() -> str:
    m = re.search(r"<!-- MODEL-METRICS -->(.*?)<!-- /MODEL-METRICS -->",
                  README.read_text(encoding="utf-8"), re.S)
    assert m, "README.md lost its <!-- MODEL-METRICS --> block"
    return m.group(1)


def test_readme_quotes_the_default_cards_out_of_domain_figures():
    handle = resolve_model(None)
    figures = ood_figures(handle)
    assert handle.trained and "overall" in figures, "the shipped card measured nothing"
    block = _metrics_block()
    assert handle.name in block
    missing = {k: f"{v:.2f}" for k, v in figures.items() if f"{v:.2f}" not in block}
    assert not missing, f"README's model table lacks the card's figures {missing}"


def test_models_lists_the_cards_out_of_domain_figures():
    handle = resolve_model(None)
    r = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"}).invoke(
        app, ["models"])
    assert r.exit_code == 0, r.output
    (line,) = [ln for ln in r.output.splitlines() if f"{handle.name} (default)" in ln]
    for name, value in ood_figures(handle).items():
        assert f"{name} {value:.2f}" in line, line
    if handle.quality["caveat"]:
        assert handle.quality["caveat"][:40] in " ".join(r.output.split())


def test_readme_counts_the_evidence_strips_panels():
    from deepaudit.pipeline.evidence import COLUMNS

    words = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
    text = " ".join(README.read_text(encoding="utf-8").split())
    assert f"{words[len(COLUMNS)]} panels each" in text, COLUMNS
