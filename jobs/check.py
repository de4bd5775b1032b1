"""``deepaudit check FILE...``: audit a handful of local files, in this process.

For a few files, starting Ray (about 4 s and 660 MB) costs more than the work, so
``check`` builds the audit's own :class:`DecodeCropStage` and :class:`ClassifyStage` and
calls them on a small pyarrow table: the files are scored by exactly the audit's code.

Exit codes, for use as a gate in scripts:

* 0: every file was scored and none was flagged fake;
* 1: at least one file was flagged fake;
* 2: usage error (bad option, unknown model, no file given);
* 3: no file was flagged, but at least one could not be scored (not media, corrupt,
  no face, or an untrained model that withholds its verdicts).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import pyarrow as pa
import typer

EXIT_OK, EXIT_FLAGGED, EXIT_USAGE, EXIT_UNSCORED = 0, 1, 2, 3
DEFAULT_EVIDENCE_DIR = "deepaudit-evidence"


@dataclass(frozen=True)
class CheckConfig:
    files: tuple[str, ...]
    model: str | None = None
    threshold: float | None = None
    frames: int | None = None
    device: str = "auto"
    evidence: bool = True
    evidence_dir: str | None = None  # None: write no files
    evidence_frames: int = 3

    def __post_init__(self) -> None:
        if not self.files:
            raise ValueError("give at least one file to check")
        if self.evidence_frames < 1:
            raise ValueError(f"--evidence-frames must be >= 1, got {self.evidence_frames}")
        for f in self.files:
            try:
                f.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"file name {f!r} is not valid UTF-8: rename the file") from None


class Checker:
    """The ``check`` code path with its model and face detector loaded once: build it
    once, then call :meth:`check` for each batch of files (``deepaudit serve`` keeps one
    for its upload page). Not for concurrent calls: callers serialise them.

    Evidence for flagged files goes to ``evidence_dir/<safe name of the file>/<run>.png``.
    """

    def __init__(self, model: str | None = None, threshold: float | None = None,
                 frames: int | None = None, device: str = "auto",
                 evidence_dir: str | None = DEFAULT_EVIDENCE_DIR, evidence_frames: int = 3,
                 run_id: str | None = None) -> None:
        from deepaudit.infra.storage import StorageConfig
        from deepaudit.models.checkpoint import resolve_model
        from deepaudit.models.face_detector import FaceDetectorConfig
        from deepaudit.pipeline.dataset import stage_configs
        from deepaudit.pipeline.evidence import EvidenceConfig
        from deepaudit.pipeline.stages import ClassifyStage, DecodeCropStage
        from deepaudit.pipeline.writer import new_run_id

        self.handle = resolve_model(model).with_overrides(threshold, frames)
        self.run_id = run_id or "check-" + new_run_id()
        self.evidence_root = (str(Path(evidence_dir).expanduser().absolute())
                              if evidence_dir else None)
        # The evidence cap counts over the checker's life: effectively none.
        evidence = (EvidenceConfig(root=self.evidence_root, run_id=self.run_id,
                                   storage=StorageConfig(), max_items=2**62,
                                   top_k=evidence_frames)
                    if self.evidence_root else None)
        # The audit's own stage configs, so a file is checked exactly as it is audited;
        # only the detector may use a few threads in this one process.
        threads = max(1, min(4, os.cpu_count() or 1))
        stages = stage_configs(self.handle, device=device,
                               detector=FaceDetectorConfig(threads=threads),
                               evidence=evidence)
        self.decode = DecodeCropStage(stages.decode, stages.detector, stages.crop,
                                      stages.storage)
        self.classify = ClassifyStage(stages.handle, stages.classify, stages.evidence)

    def check(self, files: list[str] | tuple[str, ...],
              media_ids: list[str] | None = None) -> dict:
        """Score local ``files``; returns the JSON-ready result (with ``exit_code``).
        ``media_ids``: the names shown and used for evidence folders (default: the paths)."""
        handle = self.handle
        ids = list(media_ids) if media_ids is not None else list(files)
        table = pa.table({
            "manifest_row": pa.array(range(len(files)), pa.int64()),
            "media_id": pa.array(ids, pa.string()),
            "uri": pa.array([str(Path(f).expanduser().absolute()) for f in files], pa.string()),
        })
        rows = self.classify(self.decode(table)).to_pylist()
        out = []
        for r in rows:
            out.append({
                "file": r["media_id"],
                "status": r["status"],
                "verdict": r["verdict"],
                "p_fake": r["p_fake"],
                "margin": r["margin"],
                "error": r["error"],
                "media_type": r["media_type"],
                "n_faces": len(r["face_boxes"] or []),
                "n_frames_sampled": r["n_frames_sampled"],
                "n_frames_with_face": r["n_frames_with_face"],
                "frame_p_fake": r["frame_p_fake"],
                "evidence": r["evidence"],
            })
        flagged = sum(f["verdict"] == "fake" for f in out)
        unscored = sum(f["verdict"] is None for f in out)
        code = EXIT_FLAGGED if flagged else EXIT_UNSCORED if unscored else EXIT_OK
        return {
            "model": handle.model_id,
            "model_trained": handle.trained,
            "model_quality": handle.quality,
            "threshold": handle.config.threshold,
            "run_id": self.run_id,
            "files": out,
            "flagged": flagged,
            "unscored": unscored,
            "evidence_dir": self.evidence_root if flagged and self.evidence_root else None,
            "exit_code": code,
        }


def run_check(cfg: CheckConfig) -> dict:
    """Score ``cfg.files`` in this process; returns the JSON-ready result (with
    ``exit_code``). Raises ValueError/FileNotFoundError for usage errors only."""
    from deepaudit.infra.storage import check_writable
    from deepaudit.jobs.options import check_device_here

    check_device_here(cfg.device)
    evidence = cfg.evidence and cfg.evidence_dir is not None  # no files unless asked
    if evidence:  # a folder is made only when something is flagged
        check_writable(cfg.evidence_dir, what="--evidence-dir", create=False)
    checker = Checker(model=cfg.model, threshold=cfg.threshold, frames=cfg.frames,
                      device=cfg.device, evidence_dir=cfg.evidence_dir if evidence else None,
                      evidence_frames=cfg.evidence_frames)
    return checker.check(cfg.files)


def _print_human(result: dict) -> None:
    """One block per file, full paths (no table: paths must stay copyable)."""
    from rich.console import Console
    from rich.markup import escape

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
    from rich.console import Console

    from deepaudit.jobs.logs import setup_logging

    setup_logging(verbose)
    err = Console(stderr=True)
    try:
        cfg = CheckConfig(files=tuple(files), model=model, threshold=threshold, frames=frames,
                          device=device, evidence=evidence,
                          evidence_dir=str(evidence_dir) if evidence_dir else None)
        result = run_check(cfg)
    except (ValueError, FileNotFoundError) as exc:
        from rich.markup import escape

        err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(EXIT_USAGE) from None
    if json_out:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    else:
        _print_human(result)
    raise typer.Exit(result["exit_code"])
