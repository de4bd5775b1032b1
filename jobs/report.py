"""``deepaudit report OUT``: options in, :func:`deepaudit.pipeline.report.render_report`
out: one self-contained HTML page about an audit run, written to ``--output``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape


def report_command(
    out: Annotated[str, typer.Argument(metavar="OUT", help="An audit output folder or s3:// prefix "
                                       "(what 'deepaudit audit --output' wrote).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The HTML file to write.")]
    = Path("report.html"),
    run_id: Annotated[Optional[str], typer.Option(help="Which run (default: the latest, "
                                                  "OUT/_summary.json).")] = None,
    top: Annotated[int, typer.Option(min=1, help="Flagged items shown with evidence.")] = 50,
    max_errors: Annotated[int, typer.Option(min=0, help="Error rows listed.")] = 200,
    s3_endpoint: Annotated[Optional[str], typer.Option(help="S3 endpoint URL for an s3:// "
                                                       "OUT (overrides AWS_ENDPOINT_URL).")] = None,
) -> None:
    """Write a self-contained HTML report of an audit run: summary, counts, score
    histogram, ROC and confusion matrix (with labels), top flagged items with their
    evidence, errors and throughput. It opens offline in any browser."""
    from deepaudit.infra.storage import OutputError, StorageConfig, check_writable
    from deepaudit.pipeline.report import ReportError, load_run, render_report

    console = Console(stderr=True)
    storage = StorageConfig(endpoint_url=s3_endpoint)
    try:
        check_writable(str(output), storage, what="--output", is_file=True)
        data = load_run(out, run_id, storage)
    except (ReportError, OutputError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    if data.note:
        console.print(f"note: {escape(data.note)}", soft_wrap=True)
    page = render_report(data, storage, top=top, max_errors=max_errors)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page, encoding="utf-8", errors="replace")
    console.print(f"report of run {data.summary['run_id']} written to {output} "
                  f"({len(page.encode('utf-8', 'replace')) / 1e6:.1f} MB)")
