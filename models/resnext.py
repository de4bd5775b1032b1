"""ResNeXt backbone (feature extractor) with torchvision-compatible ``state_dict`` names.

``resnext50_32x4d()`` has the same parameter and buffer names and shapes as
``torchvision.models.resnext50_32x4d`` minus the ``fc`` classifier: a torchvision
checkpoint loads with ``strict=True`` once its ``fc.*`` entries are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EXPANSION = 4  # bottleneck output channels = planes * EXPANSION


def init_conv_bn(module: nn.Module) -> None:
    """Kaiming-normal (fan-out) convolutions and identity BatchNorms, in place."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 reduce, grouped 3x3 (carries the stride), 1x1 expand."""

    def __init__(
        self,
        in_channels: int,
        planes: int,
        width: int,
        groups: int,
        stride: int = 1,
    ) -> None:
        super().__init__()
        out_channels = planes * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNeXt(nn.Module):
    """ResNeXt feature extractor: stem, four bottleneck stages, global average pool.

    Stage ``i`` has ``planes = base_channels * 2**i`` and a grouped-conv width of
    ``int(planes * width_per_group / 64) * groups`` (torchvision's formula), so
    ``base_channels`` scales every width; 64 gives the standard network.
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        groups: int = 32,
        width_per_group: int = 4,
        base_channels: int = 64,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be four positive block counts, got {tuple(layers)}")
        self.conv1 = nn.Conv2d(3, base_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        in_channels = base_channels
        stages = []
        for i, blocks in enumerate(layers):
            planes = base_channels * 2**i
            width = int(planes * width_per_group / 64) * groups
            if width == 0:
                raise ValueError(
                    f"stage {i + 1} has zero width: base_channels={base_channels}, "
                    f"width_per_group={width_per_group} (need base_channels*width_per_group >= 64)"
                )
            stride = 1 if i == 0 else 2
            stage = [Bottleneck(in_channels, planes, width, groups, stride)]
            in_channels = planes * EXPANSION
            stage += [Bottleneck(in_channels, planes, width, groups) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feat_dim = in_channels
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        """Kaiming-normal convs, BN to identity; optionally zero each block's last BN."""
        init_conv_bn(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def frozen_modules(self, level: int) -> list[nn.Module]:
        """What ``train --freeze`` keeps fixed: 1 nothing, 2 stem + layer1, 3 stem..layer3."""
        names = {1: (), 2: ("conv1", "bn1", "layer1"),
                 3: ("conv1", "bn1", "layer1", "layer2", "layer3")}[level]
        return [getattr(self, name) for name in names]

    def forward_features(self, x: Tensor) -> Tensor:
        """Output of ``layer4``: ``[B, feat_dim, H/32, W/32]`` (the Grad-CAM target)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        """Globally average-pooled ``layer4`` features: ``[B, feat_dim]``."""
        return torch.flatten(F.adaptive_avg_pool2d(self.forward_features(x), 1), 1)


def resnext50_32x4d(**kwargs) -> ResNeXt:
    """ResNeXt50_32x4d (``feat_dim`` 2048); keyword arguments override the defaults."""
    return ResNeXt(**{"layers": (3, 4, 6, 3), "groups": 32, "width_per_group": 4, **kwargs})
