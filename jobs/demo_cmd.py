"""``deepaudit demo``: build a small archive and audit it (see :mod:`deepaudit.jobs.demo`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from deepaudit.jobs.audit_cmd import console, print_summary
from deepaudit.jobs.logs import setup_logging


def demo_command(
    workdir: Annotated[
        Path, typer.Option(help="Where the demo archive and the audit output go.")
    ] = Path("demo-out"),
    seconds: Annotated[float, typer.Option(min=1.0, help="Length of each demo clip.")] = 4.0,
    model: Annotated[Optional[str], typer.Option(help="Model name or checkpoint path.")] = None,
) -> None:
    """Build a small demo archive from photos shipped in installed packages, then audit it."""
    from deepaudit.jobs.demo import run_demo

    setup_logging(False)
    summary = run_demo(workdir, seconds=seconds, model=model, console=console)
    print_summary(summary)
    raise typer.Exit(1 if summary["state"] == "failed" else 0)
