"""``deepaudit evaluate``: options in, :func:`deepaudit.pipeline.evaluation.run_evaluate`
out (the audit on a labelled manifest, scored: ``metrics.json``, ``roc.png``,
``hist.png``; ``--calibrate`` writes the threshold into the card), then the metrics table."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from deepaudit.jobs.logs import setup_logging
from deepaudit.jobs.options import FaceDetectorKind, S3Endpoint, face_detector_option


def evaluate_command(
    manifest: Annotated[Optional[str], typer.Argument(
        metavar="[MANIFEST]",
        help="Labelled manifest (csv/tsv/jsonl/parquet, local or s3://) with 'uri' and 'label' "
             "(fake/real/1/0; other values count as unlabelled). Or give --reviews.")] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="Folder for metrics.json, "
                                        "roc.png, hist.png and the audit run (audit/).")]
        = "",
    model: Annotated[Optional[str], typer.Option(
        help="Registered name or checkpoint (.json card / .safetensors). Default: the shipped "
             "default weights.")] = None,
    group_column: Annotated[Optional[str], typer.Option(
        help="Manifest column to break the metrics down by (default: 'group' or 'source' "
             "when present).")] = None,
    threshold: Annotated[Optional[float], typer.Option(
        help="Use this threshold instead of the card's.")] = None,
    calibrate: Annotated[bool, typer.Option(
        help="Set the card's threshold so the FPR on this (validation) manifest is at most "
             "--target-fpr, and write it into the card given by --model.")] = False,
    target_fpr: Annotated[float, typer.Option(help="FPR target for --calibrate.")] = 0.05,
    record_out_of_domain: Annotated[bool, typer.Option(
        help="The manifest holds media from sources the model never trained on: write AUC, "
             "FPR and robustness into the card given by --model (metrics.out_of_domain), "
             "which the audit summary, check and the report quote.")] = False,
    perturb: Annotated[Optional[str], typer.Option(
        help="Robustness: also score every face crop perturbed, one audit each, and report "
             "AUC per perturbation, e.g. jpeg:50,resize:0.5,blur:1.5,noise:8.")] = None,
    frames: Annotated[Optional[int], typer.Option(min=1, help="Frames per video "
                                                  "(default: the card's).")] = None,
    address: Annotated[str, typer.Option(help="'local', 'auto' or ray://HOST:PORT.")] = "local",
    num_cpus: Annotated[Optional[int], typer.Option(min=1, help="CPUs for a local Ray.")] = None,
    face_detector: Annotated[FaceDetectorKind, face_detector_option()
                             ] = FaceDetectorKind.retinaface,
    s3_endpoint: S3Endpoint = None,
    reviews: Annotated[Optional[str], typer.Option(
        metavar="OUT", help="Measure the model on the items reviewed in this audit output or "
        "ledger (deepaudit serve's reviews: fake or real, unsure left out) instead of a "
        "manifest.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print metrics.json on stdout.")]
        = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
) -> None:
    """Audit a labelled manifest (or your reviewed items) and report detection metrics
    (optionally calibrate)."""
    from deepaudit.infra.storage import StorageConfig
    from deepaudit.models.face_detector import FaceDetectorConfig
    from deepaudit.pipeline.evaluation import (
        EvalConfig,
        reviewed_manifest,
        run_evaluate,
        validate_eval_manifest,
    )
    from deepaudit.pipeline.manifest import ManifestError
    from deepaudit.pipeline.terminal import print_evaluation

    setup_logging(verbose)
    console = Console(stderr=True)
    try:
        storage = StorageConfig(endpoint_url=s3_endpoint)
        if not output:
            raise ValueError("give --output (-o): the folder for metrics.json and the audit")
        if (manifest is None) == (reviews is None):
            raise ValueError("give a labelled MANIFEST or --reviews OUT (one of them)")
        if reviews is not None:
            manifest = reviewed_manifest(reviews, output, storage)
        # The manifest first, before the model, torch or Ray are touched.
        validate_eval_manifest(manifest, storage)
        cfg = EvalConfig.build(
            manifest, output, perturb=perturb, group_column=group_column, calibrate=calibrate,
            record_ood=record_out_of_domain, target_fpr=target_fpr, model=model,
            threshold=threshold, frames=frames, address=address, num_cpus=num_cpus,
            storage=storage, detector=FaceDetectorConfig(kind=face_detector.value))
        with console.status("auditing the manifest..."):
            result = run_evaluate(cfg)
    except (ManifestError, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    if json_out:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
        raise typer.Exit(0)
    print_evaluation(result, console)
