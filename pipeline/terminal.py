"""What the commands print on a terminal: the audit's summary table and its top flagged
items, the progress bar's rate, ``check``'s per-file lines, ``evaluate``'s metric tables
and the demo's verdict table. The commands in ``jobs/`` call these; nothing here runs an
audit."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.markup import escape
from rich.style import Style
from rich.table import Table
from rich.text import Text

from deepaudit.models.quality import quality_text

MAX_PRINTED_GROUPS = 20


def print_table(table, min_width: int = 0) -> None:
    """Print a rich table on stdout whole: as wide as it needs (at least ``min_width``),
    also when stdout is a pipe or a file, where rich would assume 80 columns and cut."""
    from rich.console import Console
    from rich.measure import Measurement

    console = Console()
    need = Measurement.get(console, console.options.update_width(10_000), table).maximum
    width = max(console.width, min_width, need) if not console.is_terminal else max(
        console.width, min_width)
    Console(width=width).print(table)


def _quality_line(quality: dict | None) -> str:
    """The model's measured quality (:func:`quality_text`), and its caveat in yellow."""
    caveat = (quality or {}).get("caveat")
    return escape(quality_text(quality)) + (f"\n[yellow]{escape(caveat)}[/yellow]"
                                            if caveat else "")


def print_summary(summary: dict, out: Console | None = None) -> None:
    """The run summary as a table."""
    out = out or Console()
    e = lambda v: escape(str(v))  # noqa: E731 - ids, paths, codes and errors are data
    t = Table(title=f"deepaudit run {e(summary['run_id'])} ({summary['state']})",
              show_header=False)
    t.add_column(style="bold")
    t.add_column()
    trained = "" if summary["model_trained"] else "  [red]UNTRAINED: verdicts withheld[/red]"
    rows = [
        ("model", f"{e(summary['model'])}{trained}"),
        ("model quality", _quality_line(summary.get("model_quality"))),
        ("items in / out", f"{summary['rows_in']} / {summary['rows_out']}"),
        *_skipped_row(summary),
        *_items_row(summary),
        ("status", ", ".join(f"{k} {v}" for k, v in summary["status"].items())),
        ("verdicts", ", ".join(f"{k} {v}" for k, v in summary["verdicts"].items())),
        ("error codes", ", ".join(f"{e(k)} {v}" for k, v in summary["error_codes"].items())
         or "-"),
        ("wall time", f"{summary['wall_s']:.1f} s"),
        ("throughput", f"{summary['throughput_items_per_s']:.3f} items/s"),
        ("cluster", f"{e(summary['cluster']['where'])}, {summary['cluster']['gpus']:.0f} GPU"),
        ("evidence", _evidence_line(summary.get("evidence"))),
        ("output", e(summary["output"])),
    ]
    if summary.get("interrupted"):
        i = summary["interrupted"]
        rows.append(("interrupted", f"[yellow]{i['signal']}: {i['done']} done, "
                     f"{i['not_done']} not done[/yellow]"))
    if summary.get("lost_rows") or summary.get("retried_alone"):
        at = [k for k, _ in rows].index("error codes") + 1
        rows.insert(at, ("lost", f"{summary.get('lost_rows', 0)} (after running "
                         f"{summary.get('retried_alone', 0)} item(s) again, each alone)"))
    if summary.get("run_error"):
        rows.append(("run error", f"[red]{e(summary['run_error'])}[/red]"))
    for k, v in rows:
        t.add_row(k, str(v))
    out.print(t)


def print_top_flagged(summary: dict, n: int, out: Console | None = None) -> None:
    """The ``n`` flagged items with the highest p_fake: id, p_fake and evidence path."""
    top = (summary.get("top_flagged") or [])[:n]
    if not top:
        return
    out = out or Console()
    t = Table("media_id", "p_fake", "evidence", title=f"top {len(top)} flagged (of "
              f"{summary['verdicts'].get('fake', 0)})", title_justify="left")
    for r in top:
        t.add_row(escape(str(r["media_id"])), f"{r['p_fake']:.3f}",
                  escape(str(r["evidence"] or "-")))
    out.print(t)


def _evidence_line(ev: dict | None) -> str:
    if not ev or not ev.get("enabled"):
        return "off"
    missing = ev["flagged_without_evidence"]
    over = f" ({missing} flagged over the cap)" if missing else ""
    return f"{ev['written']} written to {escape(str(ev['dir']))}{over}"


def _skipped_row(summary: dict) -> list[tuple[str, str]]:
    """Input files the run did not audit: not media, or filtered out by the options."""
    sk = summary.get("skipped") or {}
    parts = [f"{sk['not_media']} not media" if sk.get("not_media") else "",
             f"{sk['excluded']} by --include/--exclude/--media-type" if sk.get("excluded")
             else ""]
    parts = [p for p in parts if p]
    return [("skipped", ", ".join(parts))] if parts else []


def _items_row(summary: dict) -> list[tuple[str, str]]:
    """The incremental counts: what the ledger made this run audit or skip."""
    items = summary.get("items")
    if not items or not items.get("ledger"):
        return []
    keys = ("new", "changed", "new_model", "retry", "skipped", "gave_up", "recovered",
            "audited", "failed")
    return [("items", ", ".join(f"{k} {items[k]}" for k in keys if k in items))]


class RateEta:
    """Items per second and the time left, measured from the first rows written (Ray's
    start-up is not part of the rate): shown once a few items or seconds have passed, so
    the estimate does not jump about on the first batch."""

    def __init__(self, clock=None) -> None:
        import time

        self.clock = clock or time.monotonic
        self.first: tuple[float, int] | None = None  # (when, done) of the first rows

    def text(self, done: int, total: int | None) -> str:
        now = self.clock()
        if done and self.first is None:
            self.first = (now, done)
        if self.first is None:
            return "starting"
        t0, d0 = self.first
        if done - d0 < 3 and now - t0 < 10 and not (total and done >= total):
            return "measuring"
        if done == d0:  # everything came in the first rows: no rate to tell
            return ""
        rate = (done - d0) / max(now - t0, 1e-6)
        if rate <= 0:
            return "0 items/s"
        left = f", ETA {_clock((total - done) / rate)}" if total and total > done else ""
        return f"{rate:.2f} items/s{left}"


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def run_with_progress(run: Callable[..., dict], show: bool, console: Console) -> dict:
    """``run(on_rows=...)`` under a progress bar on ``console`` (shown once the first
    ``on_rows`` call says the inputs were read); ``run()`` alone when ``show`` is off."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TimeElapsedColumn,
    )
    from rich.text import Text

    if not show:
        return run()
    eta = RateEta()

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            return Text(eta.text(int(task.completed), task.total), style="progress.remaining")

    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        RateColumn(),
        console=console,
        transient=False,
    )
    task = progress.add_task("auditing", total=None)

    def on_rows(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)
        if not progress.live.is_started:  # the inputs were read and checked: show the bar
            progress.start()

    try:
        return run(on_rows=on_rows)
    finally:
        if progress.live.is_started:
            progress.stop()


def print_check(result: dict) -> None:
    """``check``: one block per file, full paths (no table: paths must stay copyable)."""
    out = Console(highlight=False, soft_wrap=True)
    for f in result["files"]:
        verdict = (f["verdict"] or ("withheld" if f["status"] == "ok" else f["status"])).upper()
        style = {"FAKE": "bold red", "REAL": "green"}.get(verdict, "yellow")
        p = f"p_fake={f['p_fake']:.3f}" if f["p_fake"] is not None else "p_fake=-"
        out.print(f"[{style}]{verdict:8}[/{style}] {p}  {escape(f['file'])}")
        out.print(f"         faces {f['n_faces']}, frames with a face "
                  f"{f['n_frames_with_face'] or 0} of {f['n_frames_sampled'] or 0} sampled")
        if f["evidence"]:
            out.print(f"         evidence {escape(f['evidence'])}")
        if f["error"]:
            out.print(f"         [yellow]{escape(f['error'])}[/yellow]")
    tail = f"{result['flagged']} of {len(result['files'])} flagged fake"
    if result["unscored"]:
        tail += f", {result['unscored']} not scored"
    if result["evidence_dir"]:
        tail += f"; evidence in {escape(result['evidence_dir'])}"
    out.print(f"{tail} (model {result['model']}, threshold {result['threshold']:.3f})")
    caveat = (result.get("model_quality") or {}).get("caveat")
    if caveat and result["model_trained"]:
        out.print(f"[yellow]caveat:[/yellow] {escape(caveat)}")
    if not result["model_trained"]:
        Console(stderr=True).print(
            "[yellow]warning:[/yellow] the model is untrained: verdicts were withheld "
            "(exit code 3). Pass --model PATH with trained weights.")


def _metric_text(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def print_evaluation(result: dict, console: Console) -> None:
    """``evaluate``: the metrics table (overall, per media type, per group), the counts,
    robustness and calibration."""
    t = Table(title=f"{escape(result['model'])} (threshold {result['threshold']:.4f})")
    t.add_column("slice", overflow="fold", min_width=16)
    for col in ("n", "AUC", "AP", "acc", "prec", "recall", "F1", "FPR"):
        t.add_column(col)

    def add(name: str, m: dict | None) -> None:
        if m is None:
            return
        f = _metric_text
        t.add_row(escape(name), str(m["n"]), f(m["roc_auc"]), f(m["average_precision"]),
                  f(m["accuracy"]), f(m["precision"]), f(m["recall"]), f(m["f1"]), f(m["fpr"]))

    add("overall", result["overall"])
    for k, m in result["by_media_type"].items():
        add(f"media_type={k}", m)
    groups = sorted(result["by_group"].items(), key=lambda kv: -kv[1]["scored"])
    for k, g in groups[:MAX_PRINTED_GROUPS]:
        add(f"{result['group_column']}={k}", g["metrics"])
    print_table(t)
    if len(groups) > MAX_PRINTED_GROUPS:
        console.print(f"{len(groups) - MAX_PRINTED_GROUPS} more groups in metrics.json")
    c = result["counts"]
    console.print(f"{c['labelled']} labelled items, {c['scored']} scored, {c['unscored']} not "
                  f"scored ({escape(str(c['unscored_codes'] or 'none'))}), {c['unlabelled']} "
                  f"unlabelled; metrics in {escape(result['metrics_file'])}")
    if "robustness" in result:
        rob = result["robustness"]
        rt = Table(title=f"robustness ({rob['items']} items scored in every run)")
        for col in ("perturbation", "AUC", "change", "recall", "FPR"):
            rt.add_column(col)
        f = _metric_text
        for name, v in rob["by_perturbation"].items():
            change = "" if name == "none" or v["delta_auc"] is None else f"{v['delta_auc']:+.3f}"
            rt.add_row(escape(name), f(v["roc_auc"]), change, f(v["recall"]), f(v["fpr"]))
        print_table(rt)
    if "calibration" in result:
        cal = result["calibration"]
        console.print(f"calibrated threshold {cal['threshold']:.6f} (FPR {cal['achieved_fpr']:.3f}"
                      f", recall {cal['recall_at_threshold']}) written to {cal['card']}")
    if not result["model_trained"]:
        console.print("[yellow]warning:[/yellow] the model is untrained: these numbers measure "
                      "random weights")


def print_verdicts(rows: list[dict]) -> None:
    """The demo's verdict rows: id, label, status, verdict, p_fake, faces, error code."""
    t = Table("media_id", "label", "status", "verdict", "p_fake", "faces", "error")
    for r in rows:
        p = "-" if r["p_fake"] is None else f"{r['p_fake']:.3f}"
        t.add_row(r["media_id"], r.get("label") or "", r["status"], r["verdict"] or "-", p,
                  f"{r['n_frames_with_face']}/{r['n_frames_sampled']}",
                  (r["error"] or "").split(":", 1)[0])
    Console().print(t)


def _cell(value, text: str, budget: int | None) -> Text:
    """A table cell. In a path column (``budget`` set), a value longer than ``budget``
    keeps its end (the file name) behind a leading '…', and links to the whole value (a
    terminal shows it on hover). Plain Text, never markup: values come from media and
    users."""
    if budget is None or len(text) <= budget or "\n" in text:
        return Text(text)
    tail = text[-(budget - 1):]
    sep = max(tail.find("/"), tail.find("\\"))
    if 0 <= sep < len(tail) - 1:
        tail = tail[sep:]  # start at a folder boundary: '…/fake/genco_0001.jpg'
    target = text if "://" in text else f"file://{text}" if text.startswith("/") else None
    return Text("…" + tail, style=Style(link=target) if target else "")


def print_query_table(result, limit: int, err: Console) -> None:
    """``query --format table``: at most ``limit`` rows; path columns keep their ends."""
    width = max(120, Console().width)
    rows = result.slice(0, limit).to_pylist()
    names = result.column_names
    texts = {c: ["" if r[c] is None else f"{r[c]:.4g}" if isinstance(r[c], float)
                 else str(r[c]) for r in rows] for c in names}
    # Path columns share what the other columns leave (those are capped at 40).
    paths = [c for c in names if any(("/" in v or "\\" in v) for v in texts[c])]
    natural = {c: max([len(c), *map(len, texts[c])]) for c in names}
    fixed = sum(min(natural[c], 40) for c in names if c not in paths)
    budget = max(16, (width - 3 * len(names) - 1 - fixed) // max(1, len(paths)))
    t = Table()
    for c in names:
        t.add_column(escape(c), no_wrap=c in paths,
                     min_width=min(natural[c], budget) if c in paths else None)
    cut = 0
    for i, r in enumerate(rows):
        cells = [_cell(r[c], texts[c][i], budget if c in paths else None) for c in names]
        cut += sum(cell.plain.startswith("…") for cell in cells)
        t.add_row(*cells)
    Console(width=width).print(t)
    if result.num_rows > limit:
        err.print(f"{result.num_rows - limit} more rows (raise --limit, or --format csv)")
    if cut:
        err.print("long paths are cut at the start to keep the file name (the full path "
                  "is the link target); --format csv prints them whole")
