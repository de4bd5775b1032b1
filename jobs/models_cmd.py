"""``deepaudit models``: the registered architectures and the weights that ship."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def models_command() -> None:
    """List registered model architectures and the weights that ship with deepaudit."""
    from deepaudit.models.checkpoint import resolve_model
    from deepaudit.models.registry import list_models

    t = Table("name", "input", "frames", "threshold", "weights")
    for name in list_models():
        h = resolve_model(name)
        t.add_row(name, str(h.config.input_size), str(h.config.frames),
                  f"{h.config.threshold:.3f}", h.model_id if h.trained else "untrained")
    Console().print(t)
