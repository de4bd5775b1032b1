"""``deepaudit audit``: options in, :func:`deepaudit.pipeline.audit.run_audit` out (imported
when it runs, so that ``deepaudit --help`` stays fast), then the summary
(:mod:`deepaudit.pipeline.terminal`) and the exit code."""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from deepaudit.jobs.logs import setup_logging
from deepaudit.jobs.options import FaceDetectorKind, check_endpoint, face_detector_option
from deepaudit.pipeline.terminal import print_summary, print_top_flagged, run_with_progress

console = Console(stderr=True)


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
    face_detector: Annotated[FaceDetectorKind, face_detector_option(_MODEL)
                             ] = FaceDetectorKind.retinaface,
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
    from deepaudit.infra.ray_runtime import check_device_here
    from deepaudit.infra.storage import StorageConfig, check_readable
    from deepaudit.models.face_detector import FaceDetectorConfig
    from deepaudit.pipeline.audit import AuditConfig, run_audit
    from deepaudit.pipeline.interrupt import AuditInterrupted
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
            retry_lost=retry_lost, detector=FaceDetectorConfig(kind=face_detector.value),
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
        summary = run_with_progress(lambda **kw: run_audit(cfg, **kw),
                                    progress and not json_out, console)
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
