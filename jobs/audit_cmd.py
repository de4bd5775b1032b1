"""``deepaudit audit``: the command, its progress bar and the run summary it prints.
The audit itself is :func:`deepaudit.jobs.audit.run_audit` (imported when it runs, so that
``deepaudit --help`` stays fast)."""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deepaudit.jobs.logs import setup_logging
from deepaudit.jobs.options import check_device_here, check_endpoint
from deepaudit.models.quality import quality_text

console = Console(stderr=True)


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


class FailOn(str, Enum):
    fake = "fake"
    error = "error"
    any = "any"


# audit's exit codes (README "Auditing an archive"; --fail-on makes the run a gate).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ERRORS, EXIT_FLAGGED = 0, 1, 2, 3, 4


def exit_code(summary: dict, fail_on: FailOn | None) -> int:
    """0 done; 1 the run failed; with ``--fail-on``: 4 an item was flagged fake (fake,
    any), else 3 an item ended in status error (error, any)."""
    if summary["state"] == "failed":
        return EXIT_FAILED
    if fail_on in (FailOn.fake, FailOn.any) and summary["verdicts"].get("fake", 0):
        return EXIT_FLAGGED
    if fail_on in (FailOn.error, FailOn.any) and summary["status"].get("error", 0):
        return EXIT_ERRORS
    return EXIT_OK


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


def _run_with_progress(cfg, show: bool) -> dict:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TimeElapsedColumn,
    )
    from rich.text import Text

    from deepaudit.jobs.audit import run_audit

    if not show:
        return run_audit(cfg)
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
        return run_audit(cfg, on_rows=on_rows)
    finally:
        if progress.live.is_started:
            progress.stop()


# audit --help panels: short lines that fit 80 columns (details in the README).
_IN, _OUT, _MODEL, _CLUSTER, _ADV = "Input", "Output", "Model", "Cluster", "Advanced"


def audit_command(
    manifest: Annotated[
        str,
        typer.Argument(metavar="MANIFEST", show_default=False,
                       help="Manifest (csv/tsv/jsonl/parquet with 'uri' or 'relative_path'; "
                       "other columns carried over), or a folder / s3:// prefix."),
    ],
    *,  # keyword-only: --output (required) can sit in its panel's place
    ledger: Annotated[
        Optional[str], typer.Option(metavar="URI", rich_help_panel=_IN,
                                    help="Audit only new, changed or errored items; record "
                                    "what was audited.")
    ] = None,
    max_attempts: Annotated[
        int, typer.Option(min=1, metavar="N", rich_help_panel=_IN,
                          help="With --ledger: retry an errored item up to N times.")
    ] = 3,
    retry_errors: Annotated[
        bool, typer.Option("--retry-errors", rich_help_panel=_IN,
                           help="With --ledger: retry every errored item.")
    ] = False,
    any_model: Annotated[
        bool, typer.Option("--any-model", rich_help_panel=_IN,
                           help="With --ledger: an item done by any model is done.")
    ] = False,
    include: Annotated[
        Optional[list[str]], typer.Option(metavar="GLOB", rich_help_panel=_IN,
                                          help="With a prefix: keep matching keys.")
    ] = None,
    exclude: Annotated[
        Optional[list[str]], typer.Option(metavar="GLOB", rich_help_panel=_IN,
                                          help="With a prefix: drop matching keys.")
    ] = None,
    media_type: Annotated[
        Optional[list[str]], typer.Option(metavar="TYPE", rich_help_panel=_IN,
                                          help="video or image: audit only those.")
    ] = None,
    s3_endpoint: Annotated[
        Optional[str], typer.Option(metavar="URL", rich_help_panel=_IN, callback=check_endpoint,
                                    help="S3 endpoint (else AWS_ENDPOINT_URL).")
    ] = None,
    output: Annotated[
        str, typer.Option("--output", "-o", metavar="URI", rich_help_panel=_OUT,
                          help="Folder or s3:// prefix for runs/<run_id>/.")
    ],
    run_id: Annotated[
        Optional[str], typer.Option(metavar="ID", rich_help_panel=_OUT,
                                    help="Run id (default: UTC time + suffix).")
    ] = None,
    evidence: Annotated[
        bool, typer.Option(rich_help_panel=_OUT, help="Grad-CAM evidence for flagged items.")
    ] = True,
    evidence_max: Annotated[
        int, typer.Option(min=0, metavar="N", rich_help_panel=_OUT,
                          help="Items with evidence per run (0: none).")
    ] = 500,
    roll_rows: Annotated[
        int, typer.Option(min=1, metavar="N", rich_help_panel=_OUT,
                          help="Close a verdict file after N rows.")
    ] = 1_000,
    roll_seconds: Annotated[
        float, typer.Option(min=0.1, metavar="S", rich_help_panel=_OUT,
                            help="...or S seconds: what a kill loses.")
    ] = 60.0,
    json_out: Annotated[
        bool, typer.Option("--json", rich_help_panel=_OUT, help="Summary as JSON on stdout.")
    ] = False,
    progress: Annotated[bool, typer.Option(rich_help_panel=_OUT, help="Progress bar.")] = True,
    model: Annotated[
        Optional[str], typer.Option(metavar="NAME|PATH", rich_help_panel=_MODEL,
                                    help="Model name or checkpoint (default: shipped).")
    ] = None,
    frames: Annotated[
        Optional[int], typer.Option(min=1, metavar="N", rich_help_panel=_MODEL,
                                    help="Frames per video (default: the card's).")
    ] = None,
    threshold: Annotated[
        Optional[float], typer.Option(metavar="P", rich_help_panel=_MODEL,
                                      help="Fake threshold (default: the card's).")
    ] = None,
    device: Annotated[str, typer.Option(metavar="auto|cpu|cuda", rich_help_panel=_MODEL,
                                        help="Classifier device.")] = "auto",
    address: Annotated[
        str, typer.Option(metavar="ADDR", rich_help_panel=_CLUSTER,
                          help="local, auto (this cluster) or ray://HOST:PORT.")
    ] = "local",
    num_cpus: Annotated[
        Optional[int], typer.Option(min=1, metavar="N", rich_help_panel=_CLUSTER,
                                    help="CPUs of a local Ray (default: all).")
    ] = None,
    decode_actors: Annotated[
        Optional[int], typer.Option(min=1, metavar="N", rich_help_panel=_CLUSTER,
                                    help="Decode/crop actors (default: planned).")
    ] = None,
    classify_actors: Annotated[
        Optional[int], typer.Option(min=1, metavar="N", rich_help_panel=_CLUSTER,
                                    help="Classifier actors (default: planned).")
    ] = None,
    min_cpus: Annotated[
        int, typer.Option(min=0, metavar="N", rich_help_panel=_CLUSTER,
                          help="Wait for N CPUs (autoscaling).")
    ] = 0,
    min_gpus: Annotated[
        int, typer.Option(min=0, metavar="N", rich_help_panel=_CLUSTER,
                          help="Wait for N GPUs (autoscaling).")
    ] = 0,
    batch_size: Annotated[
        Optional[int], typer.Option(min=1, metavar="N", rich_help_panel=_ADV,
                                    help="Videos per classifier call.")
    ] = None,
    torch_threads: Annotated[
        Optional[int], typer.Option(min=1, metavar="N", rich_help_panel=_ADV,
                                    help="torch threads per CPU classifier.")
    ] = None,
    crop_batch: Annotated[
        Optional[int], typer.Option(min=1, metavar="N", rich_help_panel=_ADV,
                                    help="Crops per CNN forward pass.")
    ] = None,
    retry_lost: Annotated[
        bool, typer.Option(rich_help_panel=_ADV,
                           help="Rerun items whose worker died, each alone.")
    ] = True,
    fail_on: Annotated[
        Optional[FailOn], typer.Option(metavar="KIND", rich_help_panel=_OUT,
                                       case_sensitive=False,
                                       help="fake|error|any: exit 4 on a fake, 3 on an "
                                       "error (default: 0).")
    ] = None,
    top: Annotated[
        int, typer.Option(min=0, max=100, metavar="N", rich_help_panel=_OUT,
                          help="List the N flagged items with the highest p_fake.")
    ] = 10,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", rich_help_panel=_ADV,
                                          help="Log more.")] = False,
) -> None:
    """Audit every item of MANIFEST and write one verdict row per item.

    Exit code: 0 done, 1 the run failed, 2 usage error; with --fail-on, 4 an item was
    flagged fake (fake, any), else 3 an item could not be audited (error, any)."""
    from deepaudit.infra.listing import MEDIA_TYPES, ListingConfig
    from deepaudit.infra.storage import StorageConfig, check_readable
    from deepaudit.jobs.audit import AuditConfig
    from deepaudit.jobs.interrupt import AuditInterrupted
    from deepaudit.pipeline.ledger import LedgerPolicy
    from deepaudit.pipeline.manifest import ManifestError, is_manifest_file

    setup_logging(verbose)
    try:
        storage = StorageConfig(endpoint_url=s3_endpoint)
        cfg = AuditConfig(
            manifest=manifest, output=output, model=model, frames=frames, address=address,
            num_cpus=num_cpus, storage=storage, decode_actors=decode_actors,
            classify_actors=classify_actors, batch_size=batch_size, torch_threads=torch_threads,
            crop_batch=crop_batch, device=device, threshold=threshold, run_id=run_id,
            evidence=evidence, evidence_max=evidence_max, ledger=ledger,
            roll_rows=roll_rows, roll_seconds=roll_seconds, min_cpus=min_cpus, min_gpus=min_gpus,
            retry_lost=retry_lost,
            ledger_policy=LedgerPolicy(max_attempts=max_attempts, retry_errors=retry_errors,
                                       any_model=any_model),
            listing=ListingConfig(include=tuple(include or ()), exclude=tuple(exclude or ()),
                                  media_types=tuple(media_type or MEDIA_TYPES)),
        )
        # Before any work or progress bar: the device, then the input (run_audit checks
        # the outputs before it reads anything).
        if address == "local":
            check_device_here(device)
        check_readable(manifest, storage, what="MANIFEST", is_file=is_manifest_file(manifest))
        summary = _run_with_progress(cfg, progress and not json_out)
    except (ManifestError, FileNotFoundError, ValueError, TimeoutError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    except AuditInterrupted as exc:
        s = exc.summary or {}
        done = s.get("interrupted", {})
        if json_out and s:
            sys.stdout.write(json.dumps(s, default=str) + "\n")
        console.print(f"[yellow]{escape(str(exc))}[/yellow]: {done.get('done', 0)} item(s) "
                      f"written to {escape(str(s.get('output', '?')))}, "
                      f"{done.get('not_done', '?')} not done. Rerun with the same --ledger to "
                      "audit only what is left.")
        raise typer.Exit(exc.exit_code) from None
    if json_out:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
    else:
        print_summary(summary)
        print_top_flagged(summary, top)
    if not summary["model_trained"]:
        console.print(
            "[yellow]warning:[/yellow] the model is untrained (no shipped weights were found); "
            "scores are not evidence and verdicts were withheld. Train weights with "
            "'deepaudit train' or pass --model PATH."
        )
    raise typer.Exit(exit_code(summary, fail_on))
