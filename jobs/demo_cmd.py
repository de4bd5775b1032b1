"""``deepaudit demo``: build a small archive from photos that ship inside installed
packages (scikit-image, matplotlib), with untouched and face-swapped clips, faceless
media and broken files, then audit it on a local Ray. Needs no network and no data."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from deepaudit.jobs.logs import setup_logging

console = Console(stderr=True)


def demo_command(
    workdir: Annotated[
        Path, typer.Option(help="Where the demo archive and the audit output go.")
    ] = Path("demo-out"),
    seconds: Annotated[float, typer.Option(min=1.0, help="Length of each demo clip.")] = 4.0,
    model: Annotated[Optional[str], typer.Option(help="Model name or checkpoint path.")] = None,
) -> None:
    """Build a small demo archive from photos shipped in installed packages, then audit it."""
    from deepaudit.pipeline.audit import AuditConfig, run_audit
    from deepaudit.pipeline.demo_media import build_demo_archive
    from deepaudit.pipeline.terminal import print_summary, print_verdicts
    from deepaudit.pipeline.writer import read_verdicts

    setup_logging(False)
    workdir = workdir.absolute()
    t0 = time.perf_counter()
    with console.status("building the demo archive (ffmpeg)..."):
        manifest = build_demo_archive(workdir / "archive", seconds=seconds)
    console.print(f"demo archive: {manifest} ({time.perf_counter() - t0:.1f} s)")
    with console.status("auditing on a local Ray..."):
        summary = run_audit(AuditConfig(manifest=str(manifest), output=str(workdir / "out"),
                                        model=model))
    print_verdicts(read_verdicts(summary["output"]).to_pylist())
    console.print(f"browse the results: deepaudit serve {workdir.name}/out"
                  if Path.cwd() == workdir.parent else
                  f"browse the results: deepaudit serve {workdir / 'out'}")
    print_summary(summary)
    raise typer.Exit(1 if summary["state"] == "failed" else 0)
