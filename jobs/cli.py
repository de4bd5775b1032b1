"""The ``deepaudit`` command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from deepaudit.jobs.evaluate import evaluate_command
from deepaudit.jobs.train import train_command

app = typer.Typer(
    name="deepaudit",
    help=(
        "Audit media archives for deepfakes. A Ray Data job: FFmpeg samples frames, "
        "RetinaFace crops faces on CPU actors, a ResNeXt50-LSTM scores each video on "
        "GPU actors (CPU when there is none); one verdict row per input lands in Parquet."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def print_summary(summary: dict, out: Console | None = None) -> None:
    """The run summary as a table."""
    out = out or Console()
    t = Table(title=f"deepaudit run {summary['run_id']} ({summary['state']})", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    trained = "" if summary["model_trained"] else "  [red]UNTRAINED: verdicts withheld[/red]"
    rows = [
        ("model", f"{summary['model']}{trained}"),
        ("items in / out", f"{summary['rows_in']} / {summary['rows_out']}"),
        ("status", ", ".join(f"{k} {v}" for k, v in summary["status"].items())),
        ("verdicts", ", ".join(f"{k} {v}" for k, v in summary["verdicts"].items())),
        ("error codes", ", ".join(f"{k} {v}" for k, v in summary["error_codes"].items()) or "-"),
        ("wall time", f"{summary['wall_s']:.1f} s"),
        ("throughput", f"{summary['throughput_items_per_s']:.3f} items/s"),
        ("cluster", f"{summary['cluster']['where']}, {summary['cluster']['gpus']:.0f} GPU"),
        ("output", summary["output"]),
    ]
    if summary.get("run_error"):
        rows.append(("run error", f"[red]{summary['run_error']}[/red]"))
    for k, v in rows:
        t.add_row(k, str(v))
    out.print(t)


def _run_with_progress(cfg, show: bool) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from deepaudit.jobs.audit import run_audit

    if not show:
        return run_audit(cfg)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("auditing", total=None)

        def on_rows(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        return run_audit(cfg, on_rows=on_rows)


@app.command()
def audit(
    manifest: Annotated[
        str,
        typer.Argument(help="CSV, TSV, JSONL or Parquet with a 'uri' column (local or s3://). "
                       "Optional: media_id, label; other columns are carried to the output."),
    ],
    output: Annotated[
        str, typer.Option("--output", "-o", help="Output folder or s3:// prefix; each run "
                          "writes OUTPUT/runs/<run_id>/verdicts-*.parquet and _summary.json.")
    ],
    model: Annotated[
        Optional[str],
        typer.Option(help="Registered model name or path to a .safetensors/.json checkpoint. "
                     "Default: the shipped default weights."),
    ] = None,
    frames: Annotated[
        Optional[int], typer.Option(min=1, help="Frames sampled per video (default: the "
                                    "model card's). Images are always one frame.")
    ] = None,
    address: Annotated[
        str, typer.Option(help="'local' starts a private Ray on this machine; 'auto' joins "
                          "the cluster this runs in; ray://HOST:PORT uses Ray Client.")
    ] = "local",
    num_cpus: Annotated[
        Optional[int], typer.Option(min=1, help="CPUs for a local Ray (default: all).")
    ] = None,
    s3_endpoint: Annotated[
        Optional[str], typer.Option(help="S3 endpoint URL (overrides AWS_ENDPOINT_URL), e.g. "
                                    "http://127.0.0.1:9000. Credentials come from the usual "
                                    "AWS variables and profiles.")
    ] = None,
    decode_actors: Annotated[
        Optional[int], typer.Option(min=1, help="CPU decode/crop actors (default: from cluster).")
    ] = None,
    classify_actors: Annotated[
        Optional[int], typer.Option(min=1, help="Classifier actors (default: one per GPU, "
                                    "or from the CPU count).")
    ] = None,
    batch_size: Annotated[
        Optional[int], typer.Option(min=1, help="Videos per classifier call; their crops share "
                                    "forward passes (default: 16 on GPU, 4 on CPU).")
    ] = None,
    crop_batch: Annotated[int, typer.Option(min=1, help="Crops per CNN forward pass.")] = 64,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    threshold: Annotated[
        Optional[float], typer.Option(help="Override the model card's fake threshold.")
    ] = None,
    run_id: Annotated[
        Optional[str], typer.Option(help="Run id (default: UTC time + random suffix).")
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON on stdout.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
) -> None:
    """Audit every item of MANIFEST and write one verdict row per item."""
    from deepaudit.jobs.audit import AuditConfig
    from deepaudit.pipeline.manifest import ManifestError

    _setup_logging(verbose)
    cfg = AuditConfig(
        manifest=manifest, output=output, model=model, frames=frames, address=address,
        num_cpus=num_cpus, s3_endpoint=s3_endpoint, decode_actors=decode_actors,
        classify_actors=classify_actors, batch_size=batch_size, crop_batch=crop_batch,
        device=device, threshold=threshold, run_id=run_id, progress=progress,
    )
    try:
        summary = _run_with_progress(cfg, progress and not json_out)
    except (ManifestError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if json_out:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
    else:
        print_summary(summary)
    if not summary["model_trained"]:
        console.print(
            "[yellow]warning:[/yellow] the model is untrained (no shipped weights were found); "
            "scores are not evidence and verdicts were withheld. Train weights with "
            "'deepaudit train' or pass --model PATH."
        )
    raise typer.Exit(1 if summary["state"] == "failed" else 0)


@app.command()
def demo(
    workdir: Annotated[
        Path, typer.Option(help="Where the demo archive and the audit output go.")
    ] = Path("demo-out"),
    seconds: Annotated[float, typer.Option(min=1.0, help="Length of each demo clip.")] = 4.0,
    model: Annotated[Optional[str], typer.Option(help="Model name or checkpoint path.")] = None,
) -> None:
    """Build a small demo archive from photos shipped in installed packages, then audit it."""
    from deepaudit.jobs.demo import run_demo

    _setup_logging(False)
    summary = run_demo(workdir, seconds=seconds, model=model, console=console)
    print_summary(summary)
    raise typer.Exit(1 if summary["state"] == "failed" else 0)


@app.command("models")
def list_models_cmd() -> None:
    """List registered model architectures and the weights that ship with deepaudit."""
    from deepaudit.models.checkpoint import resolve_model
    from deepaudit.models.registry import list_models

    t = Table("name", "input", "frames", "threshold", "weights")
    for name in list_models():
        h = resolve_model(name)
        t.add_row(name, str(h.config.input_size), str(h.config.frames),
                  f"{h.config.threshold:.3f}", h.model_id if h.trained else "untrained")
    Console().print(t)


app.command("train")(train_command)
app.command("evaluate")(evaluate_command)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
