"""Model registry (timm/detectron2 style): names → builders + preprocessing/decision config.

``create_model`` only builds architectures, with random weights; checkpoints and model
cards are handled by :mod:`deepaudit.models.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from torch import nn

from deepaudit.models.cnn_lstm import CNNLSTM
from deepaudit.models.efficientnet_lite import EfficientNetLite
from deepaudit.models.fused import FusedDetector
from deepaudit.models.preprocess import BranchPreprocess
from deepaudit.models.resnext import ResNeXt

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TensorFlow's EfficientNet-Lite weights take inputs scaled to [-1, 1].
HALF = (0.5, 0.5, 0.5)

Builder = Callable[..., nn.Module]


def check_threshold(threshold: float) -> float:
    """The one rule for a fake/real decision threshold (cards, --threshold, recipes)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"the threshold must be in (0, 1), got {threshold}")
    return threshold


def check_frames(frames: int) -> int:
    """The one rule for frames sampled per video (cards, --frames, the registry's)."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames per video (--frames) must be an integer >= 1, got {frames!r}")
    return frames


DEVICES = ("cpu", "gpu")


def check_branch_frames(branch_frames: dict) -> dict:
    """``{branch: {"cpu": n, "gpu": n}}`` with integers n >= 0 and some branch reading."""
    for name, reads in branch_frames.items():
        if not isinstance(reads, dict) or set(reads) != set(DEVICES) or any(
                isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in reads.values()):
            raise ValueError(f"branch_frames[{name!r}] must map cpu and gpu to integers >= 0, "
                             f"got {reads!r}")
    for device in DEVICES:
        if not any(r[device] for r in branch_frames.values()):
            raise ValueError(f"branch_frames: no branch reads a frame on {device}")
    return branch_frames


@dataclass(frozen=True)
class ModelConfig:
    """What a model needs around it: its builder name and arguments, the crop size and
    normalisation it expects, frames sampled per video, the fake/real threshold and the
    calibration of its scores."""

    arch: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    frames: int
    threshold: float
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    # Raw score -> calibrated p_fake, as piecewise-linear knots (x, y) fitted on
    # validation data (models.detector.fit_calibration); None: scores are used as they are.
    calibration: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    # Frames per video each branch reads, by where the classifier runs:
    # {branch: {"cpu": n, "gpu": n}}, 0 for a branch that is not run. The audit decodes
    # only what the branches read (frames_for). None: every branch reads all ``frames``.
    branch_frames: dict[str, dict[str, int]] | None = None

    def __post_init__(self) -> None:
        check_threshold(self.threshold)
        check_frames(self.frames)
        if self.branch_frames is not None:
            check_branch_frames(self.branch_frames)
        if self.calibration is not None:
            x, y = self.calibration
            if len(x) != len(y) or len(x) < 2 or list(x) != sorted(x) or list(y) != sorted(y):
                raise ValueError("calibration must be two increasing sequences of equal length")

    def frames_for(self, device: str) -> int:
        """Frames per video to decode when the classifier runs on ``device`` ("cpu" or
        "gpu"): the most any branch reads there, at most ``frames``."""
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        if not self.branch_frames:
            return self.frames
        return min(self.frames, max(b[device] for b in self.branch_frames.values()))

    def verdict(self, p_fake: float) -> str:
        """The card's rule from a (calibrated) score to a verdict: fake at or above the
        threshold."""
        return "fake" if p_fake >= self.threshold else "real"

    def with_threshold(self, threshold: float | None) -> ModelConfig:
        """This config with another decision threshold (``None``: unchanged)."""
        return self if threshold is None else replace(self, threshold=float(threshold))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (tuples become lists)."""
        return {f.name: _to_json(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict` (lists become tuples again); rejects unknown keys."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; expected {sorted(names)}")
        return cls(**{key: _from_json(value) for key, value in data.items()})


def _to_json(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return tuple(_from_json(v) for v in value)
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    return value


_REGISTRY: dict[str, tuple[Builder, ModelConfig]] = {}


def register_model(name: str, config: ModelConfig) -> Callable[[Builder], Builder]:
    """Decorator registering ``fn(**arch_kwargs) -> nn.Module`` under ``name``.

    ``config.arch`` must equal ``name`` (cards rebuild models from ``config.arch``), and
    ``config.arch_kwargs`` must list every argument the builder accepts.
    """
    if config.arch != name:
        raise ValueError(f"config.arch {config.arch!r} must equal the registered name {name!r}")

    def decorator(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = (fn, config)
        return fn

    return decorator


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def _lookup(name: str) -> tuple[Builder, ModelConfig]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; registered models: {', '.join(list_models())}"
        ) from None


def get_config(name: str) -> ModelConfig:
    """The registered config of ``name`` (a copy: mutating it does not touch the registry)."""
    config = _lookup(name)[1]
    return replace(config, arch_kwargs=dict(config.arch_kwargs))


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build ``name`` with random weights (never loads any), ``arch_kwargs`` updated by
    the non-``None`` ``overrides``. The result carries ``model.config``, whose
    ``arch_kwargs`` are the arguments actually used."""
    builder, config = _lookup(name)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(overrides) - set(config.arch_kwargs))
    if unknown:
        raise TypeError(
            f"unknown arguments {unknown} for model {name!r}; "
            f"accepted: {sorted(config.arch_kwargs)}"
        )
    arch_kwargs = {**config.arch_kwargs, **overrides}
    model = builder(**arch_kwargs)
    model.config = replace(config, arch_kwargs=arch_kwargs)
    return model


@register_model(
    "resnext_lstm",
    ModelConfig(
        arch="resnext_lstm",
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        frames=16,
        threshold=0.5,
        arch_kwargs=dict(
            layers=(3, 4, 6, 3), groups=32, width_per_group=4, base_channels=64,
            hidden_size=256, num_layers=1, bidirectional=False, dropout=0.4,
        ),
    ),
)
@register_model(
    "resnext_lstm_tiny",  # ~0.2M parameters: for tests and CI
    ModelConfig(
        arch="resnext_lstm_tiny",
        input_size=64,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        frames=8,
        threshold=0.5,
        arch_kwargs=dict(
            layers=(1, 1, 1, 1), groups=4, width_per_group=32, base_channels=8,
            hidden_size=32, num_layers=1, bidirectional=False, dropout=0.4,
        ),
    ),
)
def _build_resnext_lstm(
    *,
    layers: tuple[int, int, int, int],
    groups: int,
    width_per_group: int,
    base_channels: int,
    hidden_size: int,
    num_layers: int,
    bidirectional: bool,
    dropout: float,
) -> CNNLSTM:
    """A ResNeXt backbone of the given shape under an LSTM head."""
    backbone = ResNeXt(
        layers=layers, groups=groups, width_per_group=width_per_group, base_channels=base_channels
    )
    return CNNLSTM(
        backbone,
        hidden_size=hidden_size,
        num_layers=num_layers,
        bidirectional=bidirectional,
        dropout=dropout,
    )


def _effnet_config(name: str, variant: int, input_size: int, frames: int = 16,
                   **extra: Any) -> ModelConfig:
    return ModelConfig(
        arch=name, input_size=input_size, mean=HALF, std=HALF, frames=frames, threshold=0.5,
        arch_kwargs=dict(variant=variant, width=None, depth=None, head_channels=1280,
                         hidden_size=128, num_layers=1, bidirectional=False, dropout=0.3,
                         **extra),
    )


@register_model("effnet_lite0_lstm", _effnet_config("effnet_lite0_lstm", 0, 192))
@register_model("effnet_lite2_lstm", _effnet_config("effnet_lite2_lstm", 2, 224))
@register_model(
    "effnet_lite_lstm_tiny",  # ~0.1M parameters: for tests and CI
    replace(_effnet_config("effnet_lite_lstm_tiny", 0, 64, frames=8),
            arch_kwargs=dict(variant=0, width=0.25, depth=0.34, head_channels=64,
                             hidden_size=16, num_layers=1, bidirectional=False, dropout=0.3)),
)
def _build_effnet_lstm(
    *,
    variant: int,
    width: float | None,
    depth: float | None,
    head_channels: int,
    hidden_size: int,
    num_layers: int,
    bidirectional: bool,
    dropout: float,
) -> CNNLSTM:
    """An EfficientNet-Lite trunk (ImageNet-initialisable, see models.pretrained) under an
    LSTM head."""
    backbone = EfficientNetLite(variant, width=width, depth=depth, head_channels=head_channels)
    return CNNLSTM(backbone, hidden_size=hidden_size, num_layers=num_layers,
                   bidirectional=bidirectional, dropout=dropout)


def _fused_config(name: str, input_size: int, cnn_size: int, frames: int = 16,
                  **cnn: Any) -> ModelConfig:
    return ModelConfig(
        arch=name, input_size=input_size, mean=HALF, std=HALF, frames=frames, threshold=0.5,
        arch_kwargs=dict(variant=0, width=None, depth=None, head_channels=1280,
                         hidden_size=128, num_layers=1, bidirectional=False, dropout=0.3,
                         cnn_size=cnn_size, blocks=(12,), clip_frames=4, tuned_blocks=(),
                         clip_tower="float", **cnn),
    )


def _tiny_fused(name: str, **extra: Any) -> ModelConfig:
    return replace(_fused_config(name, 64, 64, frames=8),
                   arch_kwargs=dict(variant=0, width=0.25, depth=0.34, head_channels=64,
                                    hidden_size=16, num_layers=1, bidirectional=False,
                                    dropout=0.3, cnn_size=64, blocks=(12,), clip_frames=2,
                                    tuned_blocks=(), clip_tower="float", **extra))


# The fused default: the EfficientNet-Lite0 CNN-LSTM (192 px, resized from the 224 px
# crop) + a probe on the float CLIP ViT-B/16 tower. Crops are cut at CLIP's 224 px.
# The seeds' heads are options of the same detector (issue 26; bench/heads_loso.py):
# the BiLSTM with temporal attention over the CLIP frame features
# (models/temporal_attention.py), and PGD adversarial training of the probe, a recipe
# choice (adv_eps, adv_steps; models/adversarial.py) under its own name.
@register_model("clip_effnet_fused", _fused_config("clip_effnet_fused", 224, 192))
@register_model("clip_bilstm_attn",
                _fused_config("clip_bilstm_attn", 224, 192, temporal_head=True))
@register_model("clip_fused_pgd", _fused_config("clip_fused_pgd", 224, 192))
@register_model("clip_fused_mask",  # + the learnt localisation head (models/mask_head.py)
                _fused_config("clip_fused_mask", 224, 192, mask_block=4))
@register_model("clip_fused_tiny", _tiny_fused("clip_fused_tiny"))  # tests: a tiny CNN
@register_model("clip_heads_tiny",  # tests: every head option at once
                _tiny_fused("clip_heads_tiny", temporal_head=True, mask_block=4))
def _build_fused(*, variant: int, width: float | None, depth: float | None,
                 head_channels: int, hidden_size: int, num_layers: int, bidirectional: bool,
                 dropout: float, cnn_size: int, blocks: tuple[int, ...],
                 clip_frames: int | None, temporal_head: bool = False,
                 mask_block: int | None = None, tuned_blocks: tuple[int, ...] = (),
                 clip_tower: str = "float") -> FusedDetector:
    """CNN-LSTM branch (EfficientNet-Lite trunk) + CLIP probe branch (+ optionally the
    BiLSTM-attention head over the CLIP frame features, and a localisation head)."""
    cnn = _build_effnet_lstm(variant=variant, width=width, depth=depth,
                             head_channels=head_channels, hidden_size=hidden_size,
                             num_layers=num_layers, bidirectional=bidirectional,
                             dropout=dropout)
    pre = BranchPreprocess(size=cnn_size, resize="bilinear", mean=HALF, std=HALF)
    return FusedDetector(cnn, pre, blocks=blocks, clip_frames=clip_frames,
                         temporal_head=temporal_head, mask_block=mask_block,
                         tuned_blocks=tuned_blocks, clip_tower=clip_tower)
