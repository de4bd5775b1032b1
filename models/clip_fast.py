"""Cheaper CLIP towers for the CPU, each a drop-in for the float tower of the probe.

The float tower (:mod:`deepaudit.models.clip_vit`) costs about 0.5 s per 224 px crop at
one thread on the 2-core EPYC. Three training-free ways to spend less, and their
combinations, each built from the float tower by a builder in :data:`CANDIDATES`:

- ``int8``, ``int8x2``, ``int8mix``: every ``nn.Linear`` of the blocks (about 90 % of
  the FLOPs) runs on fbgemm's int8 kernel with the tower's own int8 weights (the wheel's
  weights are symmetric int8 in -127..127 with one scale per output channel, so
  re-quantising the dequantised float weights gives back exactly those integers: no
  weight error). Activations are quantised **per token** to 7 bits: each row is mapped
  onto [0, 1] by its own min and max, so fbgemm's per-tensor dynamic scale is always
  1/127 and no row's codes depend on another row. 7-bit unsigned activations times
  signed weights within +-127 keep every 16-bit pair sum of AVX2's ``vpmaddubsw`` in
  range (2 x 127 x 127 < 32767): no saturation on CPUs without VNNI. Integer
  accumulation is exact, so the thread count cannot change a result. One pass
  (``int8``) leaves a 7-bit rounding error per layer; ``int8x2`` quantises that error
  once more (two rows of the same product per token, about 14 bits); ``int8mix`` spends
  the second pass only on the MLP's second layer and moves the 32 largest input
  channels of the LayerNorm-fed layers to float.
- ``px192`` / ``px160``: the crop is resized (bicubic, antialiased) to 192 or 160 px
  and the 14x14 position embeddings are interpolated bicubically to 12x12 or 10x10:
  145 or 101 tokens instead of 197.
- ``tome<r>``: ToMe-style token merging (bipartite soft matching on the attention
  keys, r tokens merged after each block's attention, size-weighted averages and
  proportional attention); the CLS token is never merged and stays first.

Every candidate embeds one crop at a time inside its ``forward`` (the audit's rule on
CPU), so its output never depends on the batch. Nothing here changes the float tower.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from deepaudit.models.clip_vit import HEADS, IMAGE, LAYERS, PATCH, WIDTH, ClipVisionTower

# 7-bit unsigned activations x weights within +-127: the largest pair sum AVX2's
# vpmaddubsw forms is 2 * 127 * 127 = 32258 < 32767, so it never saturates.
ACT_LEVELS = 127
_ENGINE_LOCK = threading.Lock()


class Int8Linear(nn.Module):
    """``nn.Linear`` on fbgemm's int8 kernel: per-channel int8 weights, per-token 7-bit
    activations (see the module docstring). Float in, float out.

    ``outliers``: the input channels with the largest magnitudes in this call (k of
    them) are taken out of the int8 product and multiplied in float, so the 7 bits of
    each row span the typical values, not a few outlier channels. The choice depends on
    every row of the call: call it with one crop's tokens. ``passes=2`` quantises the
    rounding error of the 7-bit codes once more (about 14 bits, twice the int8 work)."""

    def __init__(self, linear: nn.Linear, outliers: int = 0, passes: int = 1) -> None:
        super().__init__()
        if passes not in (1, 2) or not 0 <= outliers < linear.in_features:
            raise ValueError(f"passes must be 1 or 2 and outliers in 0..{linear.in_features - 1}"
                             f", got {passes} and {outliers}")
        weight = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.outliers, self.passes = outliers, passes
        scale = (weight.abs().amax(1) / 127.0).clamp_min(1e-12)
        zero = torch.zeros(self.out_features, dtype=torch.long)
        q = torch.quantize_per_channel(weight, scale.double(), zero, 0, torch.qint8)
        with _ENGINE_LOCK:  # fbgemm, not oneDNN: oneDNN's int8 gemm saturates on AVX2
            before = torch.backends.quantized.engine
            torch.backends.quantized.engine = "fbgemm"
            try:
                self._packed = torch.ops.quantized.linear_prepack(q, None)
            finally:
                torch.backends.quantized.engine = before
        # W @ 1 of the int8 weights: adds back the row minimum the codes leave out.
        self.register_buffer("row_sum", q.dequantize().sum(1), persistent=False)
        # For the outlier channels: the int8 codes by input channel, and the scales.
        codes = q.int_repr().t().contiguous() if outliers else None
        self.register_buffer("codes_t", codes, persistent=False)
        self.register_buffer("scale", scale if outliers else None, persistent=False)
        bias = (linear.bias.detach().float().clone() if linear.bias is not None
                else torch.zeros(self.out_features))
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features).float()
        n, extra = len(x), None
        if self.outliers:
            idx = torch.maximum(x.amax(0), -x.amin(0)).topk(self.outliers).indices
            w = self.codes_t.index_select(0, idx).float().mul_(self.scale)
            extra = x.index_select(1, idx) @ w
            x = x.index_fill(1, idx, 0.0)
        lo = x.amin(1, keepdim=True)  # (torch.aminmax is 10x slower here)
        span = (x.amax(1, keepdim=True) - lo).clamp_min_(1e-12)
        if self.passes == 1:
            rows = (x - lo).div_(span)  # each row spans exactly [0, 1]
        else:
            # Two sets of rows of one product: the 7-bit codes c = floor(127 u) (as
            # c / 127) and what they leave out, 127 u - c in [0, 1), quantised again.
            rows = torch.empty(2 * n, self.in_features)
            first, rest = rows[:n], rows[n:]
            torch.sub(x, lo, out=first).div_(span).mul_(ACT_LEVELS)
            torch.frac(first, out=rest)
            first.floor_().div_(ACT_LEVELS)  # (trunc_ is 40x slower here)
        # The first n rows span exactly [0, 1], so fbgemm's dynamic scale is always 1/127
        # (reduce_range: 7 bits), whatever else the call holds.
        z = torch.ops.quantized.linear_dynamic(rows, self._packed, True)
        if self.passes == 2:
            z = torch.add(z[:n], z[n:], alpha=1.0 / ACT_LEVELS)
        y = torch.addmm(self.bias, lo, self.row_sum[None, :]).addcmul_(z, span)
        if extra is not None:
            y += extra
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, int8 weights, 7-bit rows, "
                f"outliers={self.outliers}, passes={self.passes}")


def _interpolate_positions(pos: Tensor, grid: int) -> Tensor:
    """``[1 + 14*14, 768]`` position embeddings -> ``[1 + grid*grid, 768]`` (bicubic)."""
    old = IMAGE // PATCH
    if grid == old:
        return pos.clone()
    cls, patches = pos[:1], pos[1:].reshape(1, old, old, WIDTH).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False,
                            antialias=grid < old)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(grid * grid, WIDTH)])


def _merge_plan(keys: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe's bipartite soft matching on ``keys`` ``[B, T, D]``: tokens at even positions
    (set A, the CLS token first) find their most similar token at odd positions (set B);
    the ``r`` best-matched A tokens are merged into their B partner. Returns (indices of
    the A tokens kept, in order; A tokens merged; their B targets)."""
    k = F.normalize(keys, dim=-1)
    scores = k[:, 0::2] @ k[:, 1::2].transpose(1, 2)
    scores[:, 0] = -math.inf  # never merge the CLS token
    best, target = scores.max(-1)
    order = best.sort(dim=-1, descending=True, stable=True).indices
    merged = order[:, :r]
    kept = order[:, r:].sort(-1).values  # keep the tokens' order: CLS stays first
    return kept, merged, target.gather(1, merged)


def _apply_merge(x: Tensor, size: Tensor, plan: tuple[Tensor, Tensor, Tensor]
                 ) -> tuple[Tensor, Tensor]:
    """Size-weighted average of merged tokens: ``x`` ``[B, T, C]``, ``size`` ``[B, T, 1]``."""
    kept, merged, target = plan
    xs = torch.cat([x * size, size], dim=-1)
    a, b = xs[:, 0::2], xs[:, 1::2]
    c = xs.shape[-1]
    src = a.gather(1, merged[..., None].expand(-1, -1, c))
    # Sequential adds in a fixed order (index_add_ on CPU may reorder with threads).
    b = b.clone()
    for j in range(merged.shape[1]):
        rows = torch.arange(b.shape[0])
        b[rows, target[:, j]] += src[:, j]
    out = torch.cat([a.gather(1, kept[..., None].expand(-1, -1, c)), b], dim=1)
    new_size = out[..., -1:]
    return out[..., :-1] / new_size, new_size


class FastTower(nn.Module):
    """The float tower's blocks run at input ``size`` with ``merge`` tokens merged per
    block (0: none). Same call contract as :class:`ClipVisionTower`: CLIP-normalised
    ``pixels`` ``[N, 3, S, S]`` (resized to ``size`` when ``S`` differs) -> ``(cls [N,
    len(blocks), 768], embeds [N, 512], last_hidden [N, T, 768])``, one crop at a time."""

    def __init__(self, tower: ClipVisionTower, size: int = IMAGE, merge: int = 0) -> None:
        super().__init__()
        if size % PATCH or not PATCH * 4 <= size <= IMAGE:
            raise ValueError(f"size must be a multiple of {PATCH} in [{PATCH * 4}, {IMAGE}], "
                             f"got {size}")
        grid = size // PATCH
        if not 0 <= merge <= 16:
            raise ValueError(f"merge must be in 0..16 tokens per block, got {merge}")
        self.tower, self.size, self.merge = tower, size, merge
        pos = tower.embeddings.position_embedding.weight.detach()
        self.register_buffer("positions", _interpolate_positions(pos, grid), persistent=False)

    def tokens(self, pixels: Tensor) -> Tensor:
        e = self.tower.embeddings
        if pixels.shape[-1] != self.size or pixels.shape[-2] != self.size:
            pixels = F.interpolate(pixels, size=(self.size, self.size), mode="bicubic",
                                   align_corners=False, antialias=True)
        x = e.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = e.class_embedding.expand(x.shape[0], 1, WIDTH)
        return self.tower.pre_layrnorm(torch.cat([cls, x], dim=1) + self.positions)

    def _block(self, block: nn.Module, x: Tensor, size: Tensor | None
               ) -> tuple[Tensor, Tensor | None]:
        b, t, _ = x.shape
        a = block.self_attn
        h = block.layer_norm1(x)
        if hasattr(a, "qkv"):  # one product for the three projections
            q, k, v = a.qkv(h).view(b, t, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = (p(h).view(b, t, HEADS, WIDTH // HEADS).transpose(1, 2)
                       for p in (a.q_proj, a.k_proj, a.v_proj))
        # Proportional attention: a token standing for n patches counts n times.
        bias = None if size is None else size.log().view(b, 1, 1, t)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x + a.out_proj(att.transpose(1, 2).reshape(b, t, WIDTH))
        if self.merge:
            if size is None:
                size = x.new_ones(b, t, 1)
            r = min(self.merge, (t - 1) // 2)  # set A keeps its CLS token
            x, size = _apply_merge(x, size, _merge_plan(k.mean(1), r))
        h = block.mlp.fc1(block.layer_norm2(x))
        return x + block.mlp.fc2(h * torch.sigmoid(1.702 * h)), size

    def _one(self, pixels: Tensor, blocks: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        x, size, taken = self.tokens(pixels), None, []
        for k, block in enumerate(self.tower.encoder.layers, start=1):
            x, size = self._block(block, x, size)
            if k in blocks:
                taken.append(x[:, 0])
        t = self.tower
        embeds = t.visual_projection(t.post_layernorm(x[:, 0]))
        return torch.stack(taken, dim=1), embeds, x

    def forward(self, pixels: Tensor, blocks: tuple[int, ...] = (LAYERS,)
                ) -> tuple[Tensor, Tensor, Tensor]:
        parts = [self._one(p, blocks) for p in pixels.split(1)]
        return tuple(torch.cat(z) for z in zip(*parts))  # type: ignore[return-value]


Plan = Callable[[int, str], tuple[int, int]]


def int8_linears(tower: FastTower, plan: Plan = lambda block, name: (0, 1)) -> FastTower:
    """``tower`` with every block ``nn.Linear`` run in int8 (on a copy of its weights);
    ``plan(block, name)`` gives each layer's ``(outliers, passes)`` (block 1..12, name
    one of qkv, out_proj, fc1, fc2). The q, k and v projections read the same input
    and become one int8 product (the same per-row codes, one call instead of three)."""
    inner = copy.deepcopy(tower.tower)
    for k, block in enumerate(inner.encoder.layers, start=1):
        a = block.self_attn
        qkv = nn.Linear(WIDTH, 3 * WIDTH)
        with torch.no_grad():
            qkv.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            qkv.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        a.qkv = Int8Linear(qkv, *plan(k, "qkv"))
        del a.q_proj, a.k_proj, a.v_proj
        a.out_proj = Int8Linear(a.out_proj, *plan(k, "out_proj"))
        for name in ("fc1", "fc2"):
            setattr(block.mlp, name, Int8Linear(getattr(block.mlp, name), *plan(k, name)))
    return FastTower(inner, size=tower.size, merge=tower.merge)


def mixed_plan(block: int, name: str) -> tuple[int, int]:
    """The MLP's second layer (its input, quick-GELU output, is the hardest to quantise)
    takes two passes; the layers fed by a LayerNorm move their 32 largest channels to
    float; the attention output projection runs plainly."""
    if name == "fc2":
        return 0, 2
    return (0, 1) if name == "out_proj" else (32, 1)


Builder = Callable[[ClipVisionTower], nn.Module]


def _x2(block: int, name: str) -> tuple[int, int]:
    return 0, 2


# name -> (builder, what it is)
CANDIDATES: dict[str, tuple[Builder, str]] = {
    "float": (lambda t: FastTower(t), "the float tower through this module's wrapper "
              "(a control: should match the float tower)"),
    "int8x2": (lambda t: int8_linears(FastTower(t), _x2),
               "int8 linears, two 7-bit passes per token (about 14 bits)"),
    "int8mix": (lambda t: int8_linears(FastTower(t), mixed_plan),
                "int8 linears: fc2 two passes, q/k/v/fc1 one pass with their 32 largest "
                "channels in float, out_proj one pass"),
    "int8": (lambda t: int8_linears(FastTower(t)), "int8 linears, one 7-bit pass per token"),
    "px192": (lambda t: FastTower(t, size=192), "192 px input, 12x12 position embeddings"),
    "px160": (lambda t: FastTower(t, size=160), "160 px input, 10x10 position embeddings"),
    "tome8": (lambda t: FastTower(t, merge=8), "ToMe, 8 tokens merged per block (197 -> 101)"),
    "tome16": (lambda t: FastTower(t, merge=16), "ToMe, 16 tokens merged per block (197 -> 6)"),
    "int8_px192": (lambda t: int8_linears(FastTower(t, size=192)), "int8 (one pass) at 192 px"),
    "int8_tome8": (lambda t: int8_linears(FastTower(t, merge=8)), "int8 (one pass) with tome8"),
    "int8x2_px192": (lambda t: int8_linears(FastTower(t, size=192), _x2), "int8x2 at 192 px"),
}


def describe(name: str) -> str:
    return CANDIDATES[name][1]


def build(name: str, tower: ClipVisionTower) -> nn.Module:
    """Candidate ``name`` (a key of :data:`CANDIDATES`) built from the float ``tower``."""
    if name not in CANDIDATES:
        raise ValueError(f"unknown CLIP tower candidate {name!r}; choose from "
                         f"{sorted(CANDIDATES)}")
    return CANDIDATES[name][0](tower).eval()


def embedder(name: str, tower: ClipVisionTower | None = None
             ) -> Callable[[np.ndarray], np.ndarray]:
    """Uint8 crops ``[N, H, W, 3]`` -> CLS tokens of all 12 blocks ``[N, 12, 768]``
    (float32) through candidate ``name``, one crop at a time: what the feature bank of a
    probe retrained on that candidate needs. Preprocessing is the CLIP branch's own."""
    from deepaudit.models.clip_branch import CLIP_PREPROCESS
    from deepaudit.models.clip_vit import load_tower

    fast = build(name, tower if tower is not None else load_tower())
    norm = CLIP_PREPROCESS.normaliser("cpu")
    every = tuple(range(1, LAYERS + 1))

    def cls_tokens(crops: np.ndarray | Tensor) -> np.ndarray:
        if isinstance(crops, np.ndarray):
            crops = torch.from_numpy(np.ascontiguousarray(crops))
        with torch.inference_mode():
            out = [fast(norm(c), blocks=every)[0] for c in crops.split(1)]
        return (torch.cat(out) if out else torch.zeros(0, LAYERS, WIDTH)).float().numpy()

    return cls_tokens
