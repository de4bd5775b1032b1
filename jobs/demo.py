"""``deepaudit demo``: build a small archive from photos that ship inside installed
packages (scikit-image, matplotlib), with untouched and face-swapped clips, faceless
media and broken files, then audit it on a local Ray. Needs no network and no data."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from deepaudit.jobs.audit import AuditConfig, run_audit
from deepaudit.pipeline.writer import read_verdicts


def run_demo(workdir: Path, seconds: float = 4.0, model: str | None = None,
             console: Console | None = None) -> dict:
    from deepaudit.pipeline.demo_media import build_demo_archive

    console = console or Console(stderr=True)
    workdir = workdir.absolute()
    t0 = time.perf_counter()
    with console.status("building the demo archive (ffmpeg)..."):
        manifest = build_demo_archive(workdir / "archive", seconds=seconds)
    console.print(f"demo archive: {manifest} ({time.perf_counter() - t0:.1f} s)")
    with console.status("auditing on a local Ray..."):
        summary = run_audit(AuditConfig(manifest=str(manifest), output=str(workdir / "out"),
                                        model=model))
    table = read_verdicts(summary["output"])
    from rich.table import Table

    t = Table("media_id", "label", "status", "verdict", "p_fake", "faces", "error")
    for r in table.to_pylist():
        p = "-" if r["p_fake"] is None else f"{r['p_fake']:.3f}"
        t.add_row(r["media_id"], r.get("label") or "", r["status"], r["verdict"] or "-", p,
                  f"{r['n_frames_with_face']}/{r['n_frames_sampled']}",
                  (r["error"] or "").split(":", 1)[0])
    Console().print(t)
    console.print(f"browse the results: deepaudit serve {workdir.name}/out"
                  if Path.cwd() == workdir.parent else
                  f"browse the results: deepaudit serve {workdir / 'out'}")
    return summary
