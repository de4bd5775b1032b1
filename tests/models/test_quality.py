"""The one line a model's quality is shown as (models/quality.py), in the run summary
table and the HTML report alike."""

from __future__ import annotations

import pytest
from rich.console import Console

from deepaudit.models.quality import model_quality, quality_text
from deepaudit.pipeline.report import _summary_section
from deepaudit.pipeline.terminal import print_summary


def test_quality_text_from_a_card_an_old_summary_and_none():
    card = {"metrics": {"out_of_domain": {"roc_auc": 0.87},
                        "leave_one_source_out": {"mean_auc": 0.78, "scope": "6 sources"}}}
    assert quality_text(model_quality(card)) == (
        "ROC AUC 0.87 on unseen sources; leave-one-source-out mean 0.78 (6 sources)")
    assert quality_text({"ood_auc": 0.7}) == "ROC AUC 0.70 on unseen sources"  # no "summary"
    assert quality_text({"ood_auc": None}) == "not measured"
    assert quality_text(None) == "-"


def test_summary_table_and_report_show_the_same_line():
    quality = model_quality({"metrics": {"out_of_domain": {"roc_auc": 0.9},
                                         "leave_one_source_out": {"mean_auc": 0.7}}})
    summary = {"run_id": "r", "state": "completed", "model": "m@1", "model_trained": True,
               "model_quality": quality, "rows_in": 1, "rows_out": 1,
               "status": {"ok": 1}, "verdicts": {"fake": 1}, "error_codes": {}, "wall_s": 1.0,
               "throughput_items_per_s": 1.0, "cluster": {"where": "local", "gpus": 0},
               "evidence": None, "output": "out", "items": {}}
    console = Console(record=True, width=200)
    print_summary(summary, console)
    line = quality_text(quality)
    assert "leave-one-source-out mean 0.70" in line
    assert line in console.export_text() and line in _summary_section(summary)


@pytest.mark.parametrize("figure", ["out_of_domain", "leave_one_source_out"])
@pytest.mark.parametrize(("auc", "printed", "caveat"), [
    (0.797, "0.80", False),   # prints 0.80: not "0.80 (below 0.80)"
    (0.795, "0.80", False),   # 0.795 is stored just above the half: rounds up, like print
    (0.7949, "0.79", True),
    (0.80, "0.80", False),
    (0.7851, "0.79", True),
])
def test_the_caveat_compares_the_figure_as_printed(figure, auc, printed, caveat):
    metrics = ({"out_of_domain": {"roc_auc": auc}} if figure == "out_of_domain" else
               {"out_of_domain": {"roc_auc": 0.9},
                "leave_one_source_out": {"mean_auc": auc}})
    quality = model_quality({"metrics": metrics})
    assert f"{auc:.2f}" == printed and printed in quality["summary"]
    assert (quality["caveat"] is not None) == caveat, quality["caveat"]
    if caveat:
        assert f"is {printed} (below 0.80)" in quality["caveat"]


def test_the_shipped_cards_never_read_below_the_bar_at_the_bar():
    """Issue 31: clip_bilstm_attn's leave-one-source-out mean 0.797 read "0.80 (below 0.80)"."""
    from deepaudit.models.checkpoint import resolve_model
    from deepaudit.models.registry import list_models

    for name in list_models():
        caveat = resolve_model(name).quality.get("caveat") or ""
        assert "0.80 (below 0.80)" not in caveat, (name, caveat)


def test_the_leave_one_family_out_line_names_the_worst_family():
    lofo = {"mean_auc": 0.86, "min_auc": 0.66, "worst_family": "lip-sync",
            "by_family": {"lip-sync": 0.66, "ffpp": 0.9}}
    q = model_quality({"metrics": {"out_of_domain": {"roc_auc": 0.9},
                                   "leave_one_family_out": lofo}})
    assert "leave-one-family-out mean 0.86, worst 0.66 (lip-sync)" in q["summary"]
    assert "lip-sync" in q["caveat"] and "0.66" in q["caveat"]
    # At the bar (as printed) nothing is named.
    ok = model_quality({"metrics": {"out_of_domain": {"roc_auc": 0.9},
                                    "leave_one_family_out": {**lofo, "min_auc": 0.697}}})
    assert ok["caveat"] is None
    # A low mean and a weak family: one caveat that says both.
    both = model_quality({"metrics": {"out_of_domain": {"roc_auc": 0.9},
                                      "leave_one_family_out": {**lofo, "mean_auc": 0.75}}})
    assert "families held out one at a time is 0.75" in both["caveat"]
    assert "lip-sync" in both["caveat"]
