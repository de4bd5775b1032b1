"""Training progress on a terminal: the events :func:`deepaudit.training.run.run_train`
emits, drawn as a progress bar and one line per epoch (``deepaudit train``)."""

from __future__ import annotations

import threading


class ProgressPrinter:
    """Renders training events: a rich progress bar (``bars=True``) plus one line per
    epoch. Without bars (``--no-progress``, logs of batch jobs) only the lines print."""

    def __init__(self, console, bars: bool = True) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = console
        self.progress = Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(),
            MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
            console=console, transient=False, disable=not bars)
        self.task = None
        self.lock = threading.Lock()

    def __enter__(self) -> ProgressPrinter:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def _bar(self, description: str, total: int | None, completed: int, info: str = "") -> None:
        if self.progress.disable:
            return
        if self.task is None or self.progress.tasks[self.task].description != description:
            self.task = self.progress.add_task(description, total=total, info=info)
        self.progress.update(self.task, total=total, completed=completed, info=info)

    def __call__(self, ev: dict) -> None:
        with self.lock:
            kind = ev.get("type")
            if kind == "crops":
                self._bar("extracting face crops", ev["total"], ev["done"])
            elif kind == "features":
                self._bar("phase 2: frame features", ev["total"], ev["done"])
            elif kind == "clip":
                self._bar(f"CLIP features ({ev['what']} items)", None, ev["done"])
            elif kind in ("start", "step"):
                if kind == "start":
                    self.epochs = ev["epochs"]
                desc = f"phase {ev['phase']} epoch {ev['epoch']}/{getattr(self, 'epochs', '?')}"
                loss = f"loss {ev['loss']:.4f}" if "loss" in ev else ""
                self._bar(desc, ev["steps"], ev.get("step", 0), loss)
            elif kind == "epoch":
                auc = "n/a" if ev["val_auc"] is None else f"{ev['val_auc']:.4f}"
                self.console.print(
                    f"phase {ev['phase']} epoch {ev['epoch']}: train loss {ev['train_loss']:.4f}"
                    f"  val loss {ev['val_loss']:.4f}  val AUC {auc}  lr {ev['lr']:.2e}  "
                    f"{ev['seconds']:.0f} s" + ("  [best]" if ev["best"] else ""))
            elif kind == "info":
                self.console.print(f"[dim]{ev['message']}[/dim]")
