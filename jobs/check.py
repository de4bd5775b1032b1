"""``deepaudit check FILE...``: options in, :func:`deepaudit.pipeline.check.run_check` out
(in this process, without Ray), then one block per file or JSON.

Exit codes, for use as a gate in scripts: 0 none flagged, 1 any file flagged fake, 2 usage
error, 3 none flagged but some file could not be scored (see :mod:`deepaudit.pipeline.check`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from deepaudit.jobs.logs import setup_logging
from deepaudit.jobs.options import FaceDetectorKind, face_detector_option


def check_command(
    files: Annotated[list[str], typer.Argument(metavar="FILE", help="Local video or image files.",
                                               show_default=False)],
    model: Annotated[Optional[str], typer.Option(
        help="Registered model name or path to a .safetensors/.json checkpoint. "
             "Default: the shipped default weights.")] = None,
    threshold: Annotated[Optional[float], typer.Option(
        help="Override the model card's fake threshold.")] = None,
    frames: Annotated[Optional[int], typer.Option(
        min=1, help="Frames sampled per video (default: the model card's).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    face_detector: Annotated[FaceDetectorKind, face_detector_option()
                             ] = FaceDetectorKind.retinaface,
    evidence: Annotated[bool, typer.Option(
        help="With --evidence-dir: write Grad-CAM evidence for flagged files.")] = True,
    evidence_dir: Annotated[Optional[Path], typer.Option(
        help="Write evidence of flagged files to EVIDENCE_DIR/<safe name>/<run>.png and "
             ".json (default: write no files).")] = None,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print one JSON document on stdout instead of text.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
) -> None:
    """Check a few local files now, without a manifest or Ray, and print each verdict,
    probability, face and frame counts and evidence path.

    Exit code: 0 none flagged, 1 any file flagged fake, 2 usage error, 3 none flagged but
    some file could not be scored (not media, no face, or untrained model)."""
    from deepaudit.pipeline.check import EXIT_USAGE, CheckConfig, run_check
    from deepaudit.pipeline.terminal import print_check

    setup_logging(verbose)
    err = Console(stderr=True)
    try:
        cfg = CheckConfig(files=tuple(files), model=model, threshold=threshold, frames=frames,
                          device=device, evidence=evidence, face_detector=face_detector.value,
                          evidence_dir=str(evidence_dir) if evidence_dir else None)
        result = run_check(cfg)
    except (ValueError, FileNotFoundError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(EXIT_USAGE) from None
    if json_out:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    else:
        print_check(result)
    raise typer.Exit(result["exit_code"])
