"""Checkpoints: safetensors weights plus a JSON model card, and resolving a model reference
(a registered name, a card, or a weights file) to a small picklable :class:`ModelHandle`.

A card ``<stem>.json`` sits next to its weights ``<stem>.safetensors`` and records the
architecture and preprocessing (``config``), the weights' sha256 (checked before every
load), whether the weights are trained, and free-form provenance (data, metrics, notes).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deepaudit.models.quality import model_quality
from deepaudit.models.registry import ModelConfig, create_model, get_config, list_models

DEFAULT_MODEL = "clip_effnet_fused"
CARD_FORMAT = "deepaudit-model-card/1"
CARD_KEYS = (
    "name", "arch", "config", "weights_file", "weights_sha256", "trained", "dtype",
    "created_at", "training_data", "metrics", "notes",
)
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    name: str | None = None,
    trained: bool = True,
    dtype: Literal["float32", "float16"] = "float32",
    training_data: Any = None,
    metrics: Any = None,
    notes: str | None = None,
) -> tuple[Path, Path]:
    """Write ``model``'s weights to ``path`` (``.safetensors``) and its card next to it
    (same stem, ``.json``); return ``(weights_path, card_path)``.

    ``model`` must come from :func:`create_model` (it needs ``model.config``). With
    ``dtype="float16"`` floating-point tensors are stored in half precision; integer
    buffers (BatchNorm's ``num_batches_tracked``) are kept as they are.
    """
    weights_path = Path(path)
    if weights_path.suffix != ".safetensors":
        raise ValueError(f"weights path must end with .safetensors, got {weights_path}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise ValueError("model has no ModelConfig in model.config: build it with create_model")

    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.to(_DTYPES[dtype])
        state[key] = tensor.contiguous()
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(weights_path), metadata={"format": "pt"})

    card = {
        "format": CARD_FORMAT,
        "name": name or config.arch,
        "arch": config.arch,
        "config": config.to_dict(),
        "weights_file": weights_path.name,
        "weights_sha256": file_sha256(weights_path),
        "trained": trained,
        "dtype": dtype,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "num_params": sum(p.numel() for p in model.parameters()),
        # Each branch's crop preprocessing (size, resize, mean, std): the detector contract.
        "preprocess": {k: v.to_dict() for k, v in model.preprocessing().items()}
        if hasattr(model, "preprocessing") else None,
        "training_data": training_data,
        "metrics": metrics,
        "notes": notes,
    }
    card_path = weights_path.with_suffix(".json")
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return weights_path, card_path


@dataclass(frozen=True)
class ModelHandle:
    """A resolved model: what to build and which weights to load. Small and picklable,
    so it can be shipped to Ray actors, which call :meth:`load` there."""

    name: str
    config: ModelConfig
    weights_path: str | None
    sha256: str | None
    trained: bool
    card: dict[str, Any]

    @property
    def model_id(self) -> str:
        """``name@<first 12 hex of the weights' sha256>``, or ``name@untrained``."""
        return f"{self.name}@{self.sha256[:12]}" if self.sha256 else f"{self.name}@untrained"

    @property
    def cpu_ms_per_frame(self) -> float | None:
        """The classifier's measured single-thread CPU cost per sampled frame (the card's
        ``cost``, from bench/classifier_cost.py), or None when never measured."""
        return ((self.card or {}).get("cost") or {}).get("cpu_ms_per_frame")

    @property
    def quality(self) -> dict[str, Any]:
        """Measured out-of-domain quality and its caveat (see :func:`model_quality`)."""
        return model_quality(self.card, self.trained)

    def with_threshold(self, threshold: float | None) -> ModelHandle:
        """This model with another decision threshold (``None``: the card's)."""
        if threshold is None:
            return self
        return replace(self, config=self.config.with_threshold(threshold))

    def with_overrides(self, threshold: float | None = None,
                       frames: int | None = None) -> ModelHandle:
        """This model with the command line's ``--threshold`` and ``--frames`` in place of
        the card's (``None``: the card's). Audit, evaluate and check all apply them here;
        ModelConfig validates the result. ``--frames N`` means N frames sampled and
        scored: every branch then reads all of them, on CPU too."""
        config = self.config.with_threshold(threshold)
        if frames is not None:
            kwargs = dict(config.arch_kwargs)
            if "clip_frames" in kwargs:
                kwargs["clip_frames"] = frames  # every frame
            config = replace(config, frames=frames, branch_frames=None, arch_kwargs=kwargs)
        return self if config == self.config else replace(self, config=config)

    def load(self, device: str | torch.device = "cpu") -> nn.Module:
        """Build the model, load and verify its weights, and return it in ``eval()`` mode
        on ``device``. Without weights the model is seeded (0), so it is deterministic."""
        if self.weights_path is None:
            with torch.random.fork_rng(devices=[]):  # seed without touching the caller's RNG
                torch.manual_seed(0)
                model = create_model(self.config.arch, **self.config.arch_kwargs)
        else:
            actual = file_sha256(self.weights_path)
            if actual != self.sha256:
                raise ValueError(
                    f"sha256 mismatch for weights file {self.weights_path}: the model card "
                    f"expects {self.sha256} but the file hashes to {actual}. The file is "
                    "corrupt or belongs to another card; copy the weights again or re-save "
                    "the checkpoint (save_checkpoint writes weights and card together)."
                )
            state = {
                key: tensor.float() if tensor.is_floating_point() else tensor
                for key, tensor in load_file(self.weights_path, device="cpu").items()
            }
            model = create_model(self.config.arch, **self.config.arch_kwargs)
            model.load_state_dict(state, strict=True)
        model.config = self.config
        return model.to(device).eval()


def handle_from_card(path: str | Path) -> ModelHandle:
    """A handle from a model card (``.json``), or from a weights file with its card next to it."""
    path = Path(path)
    card_path = path.with_suffix(".json")
    if not card_path.is_file():
        raise FileNotFoundError(
            f"no model card {card_path.name} next to {path}: a checkpoint is a .safetensors "
            "file plus a .json card with the same stem (see save_checkpoint)"
        )
    card = json.loads(card_path.read_text())
    missing = [key for key in CARD_KEYS if key not in card]
    if missing:
        raise ValueError(f"model card {card_path} lacks {missing}")
    config = ModelConfig.from_dict(card["config"])
    if config.arch not in list_models():
        raise ValueError(
            f"model card {card_path} needs architecture {config.arch!r}, which is not "
            f"registered; registered models: {', '.join(list_models())}"
        )
    weights_path = card_path.parent / card["weights_file"]
    if not weights_path.is_file():
        raise FileNotFoundError(f"model card {card_path} names weights {weights_path}: not found")
    return ModelHandle(
        name=card["name"],
        config=config,
        weights_path=str(weights_path.resolve()),
        sha256=card["weights_sha256"],
        trained=bool(card["trained"]),
        card=card,
    )


def set_card_threshold(card_path: str | Path, threshold: float,
                       calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a new decision threshold into a model card (``config.threshold``) and record
    how it was chosen under ``calibration``. The card's sha256 covers the weights file
    only, so the weights stay valid. Returns the updated card."""
    card_path = Path(card_path).with_suffix(".json")
    card = json.loads(card_path.read_text())
    if "config" not in card or "weights_sha256" not in card:
        raise ValueError(f"{card_path} is not a deepaudit model card")
    config = ModelConfig.from_dict(card["config"]).with_threshold(threshold)  # validates
    card["config"]["threshold"] = config.threshold
    if calibration is not None:
        card["calibration"] = calibration
    tmp = card_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    tmp.replace(card_path)
    return card


def set_card_out_of_domain(card_path: str | Path, measured: dict[str, Any]) -> dict[str, Any]:
    """Record a measurement on media from sources the model never trained on under the
    card's ``metrics.out_of_domain`` (what every verdict surface quotes). The weights and
    their sha256 are untouched. Returns the updated card."""
    card_path = Path(card_path).with_suffix(".json")
    card = json.loads(card_path.read_text())
    if "config" not in card or "weights_sha256" not in card:
        raise ValueError(f"{card_path} is not a deepaudit model card")
    card["metrics"] = dict(card.get("metrics") or {})
    card["metrics"]["out_of_domain"] = measured
    tmp = card_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    tmp.replace(card_path)
    return card


def _untrained(name: str) -> ModelHandle:
    """A handle for a registered architecture with no weights (seeded random init)."""
    config = get_config(name)
    card = {key: None for key in CARD_KEYS}
    card.update(name=name, arch=config.arch, config=config.to_dict(), trained=False,
                dtype="float32", notes="no weights: random initialisation (seed 0)")
    return ModelHandle(name=name, config=config, weights_path=None, sha256=None,
                       trained=False, card=card)


def resolve_model(ref: str | Path | None = None) -> ModelHandle:
    """Resolve a model reference to a handle.

    ``None`` means :data:`DEFAULT_MODEL`. A path to a ``.json`` card or ``.safetensors``
    file gives that checkpoint. A registered name gives the weights shipped in
    ``deepaudit/models/weights/<name>.json`` if any, else an untrained handle.
    """
    ref = DEFAULT_MODEL if ref is None else ref
    path = Path(ref).expanduser()
    if path.suffix in (".json", ".safetensors"):
        if not path.is_file():
            raise FileNotFoundError(f"model checkpoint {path} does not exist")
        return handle_from_card(path)
    name = str(ref)
    if name in list_models():
        shipped = files("deepaudit.models") / "weights" / f"{name}.json"
        return handle_from_card(Path(str(shipped))) if shipped.is_file() else _untrained(name)
    raise ValueError(
        f"unknown model {name!r}: use a registered name ({', '.join(list_models())}) "
        "or a path to a checkpoint's .safetensors file or .json model card"
    )
