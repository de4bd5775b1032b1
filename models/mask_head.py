"""A learnt localisation head: a small mask decoder on the frozen CLIP tower's patch tokens.

Self-blended fakes (:mod:`deepaudit.models.sbi`) come with their exact blend mask, so a
decoder on the 14 x 14 patch-token grid after block ``block`` can be trained to predict
the blended region. Its output is a model's estimate of where a crop was manipulated
(trained on self-blended masks only), not a ground truth.

Targets: the blend mask divided by its peak (the blended *region*, whatever the blend
ratio), area-averaged to the 14 x 14 grid; un-blended reals have an all-zero target.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from deepaudit.models.clip_vit import IMAGE, LAYERS, PATCH, WIDTH

GRID = IMAGE // PATCH  # 14


class MaskHead(nn.Module):
    """LayerNorm (no affine) + 1x1 conv (768 -> hidden) + GELU + 3x3 conv (-> 1) on the patch grid.

    ``block`` and ``hidden`` are also buffers, so a state dict alone rebuilds the head
    (:meth:`from_state_dict`)."""

    def __init__(self, block: int = 4, hidden: int = 64) -> None:
        super().__init__()
        if not 1 <= block <= LAYERS:
            raise ValueError(f"mask head block must be in 1..{LAYERS}, got {block}")
        if hidden < 1:
            raise ValueError(f"mask head hidden must be >= 1, got {hidden}")
        self.block, self.hidden = int(block), int(hidden)
        self.norm = nn.LayerNorm(WIDTH, elementwise_affine=False)  # the conv absorbs affine
        self.reduce = nn.Conv2d(WIDTH, hidden, 1)
        self.out = nn.Conv2d(hidden, 1, 3, padding=1)
        self.register_buffer("config_block", torch.tensor(self.block))
        self.register_buffer("config_hidden", torch.tensor(self.hidden))

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], prefix: str = "") -> MaskHead:
        head = cls(int(state[prefix + "config_block"]), int(state[prefix + "config_hidden"]))
        head.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                              if k.startswith(prefix)}, strict=True)
        return head

    def forward(self, tokens: Tensor) -> Tensor:
        """Patch tokens ``[N, 196, 768]`` (CLS dropped) -> logits ``[N, 14, 14]``."""
        n, t, _ = tokens.shape
        grid = int(round(t ** 0.5))
        x = self.norm(tokens.float()).transpose(1, 2).reshape(n, WIDTH, grid, grid)
        return self.out(F.gelu(self.reduce(x)))[:, 0]

    def probabilities(self, tokens: Tensor, size: int) -> Tensor:
        """``[N, size, size]`` probabilities: logits upsampled bilinearly, then sigmoid."""
        logits = F.interpolate(self(tokens)[:, None], size=(size, size), mode="bilinear",
                               align_corners=False)[:, 0]
        return torch.sigmoid(logits)


def patch_tokens(tower: nn.Module, pixels: Tensor, block: int) -> Tensor:
    """Patch tokens ``[N, 196, 768]`` after ``block`` blocks (the tower stops there)."""
    h = tower.tokens(pixels)
    for layer in tower.encoder.layers[:block]:
        h = layer(h)
    return h[:, 1:]


def localise(tower: nn.Module, head: MaskHead, crops: np.ndarray | Tensor,
             device: str | torch.device = "cpu", chunk: int = 16) -> np.ndarray:
    """Predicted manipulated-region probabilities of uint8 crops ``[K, S, S, 3]``: float32
    ``[K, S, S]`` in [0, 1] (the tower runs only up to ``head.block``)."""
    from deepaudit.models.clip_branch import CLIP_PREPROCESS

    device = torch.device(device)
    if isinstance(crops, np.ndarray):
        crops = torch.from_numpy(np.ascontiguousarray(crops))
    size = int(crops.shape[1])
    norm = CLIP_PREPROCESS.normaliser(device)
    head = head.to(device)
    out = []
    with torch.inference_mode():
        for c in crops.split(chunk):
            tokens = patch_tokens(tower, norm(c), head.block)
            out.append(head.probabilities(tokens, size).float().cpu())
    if not out:
        return np.zeros((0, size, size), np.float32)
    return torch.cat(out).numpy().astype(np.float32)


def region_target(mask: np.ndarray) -> np.ndarray:
    """The blended region of a soft SBI mask: the mask over its peak (zeros stay zeros)."""
    mask = np.asarray(mask, np.float32)
    peak = float(mask.max(initial=0.0))
    return mask / peak if peak > 0 else np.zeros_like(mask)


def downsample(masks: np.ndarray, size: int) -> np.ndarray:
    """Area-average ``[N, S, S]`` masks to ``[N, size, size]`` (float32)."""
    t = torch.from_numpy(np.asarray(masks, np.float32))[:, None]
    return F.adaptive_avg_pool2d(t, size)[:, 0].numpy()


def iou(pred_prob: np.ndarray, target_mask: np.ndarray, threshold: float = 0.5
        ) -> np.ndarray:
    """Per-mask IoU of ``pred_prob >= threshold`` with ``target_mask >= 0.5`` (both
    ``[N, H, W]`` or ``[H, W]``). Two empty masks agree fully: their IoU is 1."""
    p = np.asarray(pred_prob) >= threshold
    t = np.asarray(target_mask) >= 0.5
    axes = (-2, -1)
    inter = (p & t).sum(axis=axes)
    union = (p | t).sum(axis=axes)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0).astype(np.float64)


def fit_mask_head(tokens: np.ndarray | Tensor, masks: np.ndarray | Tensor, block: int = 4,
                  hidden: int = 64, epochs: int = 20, batch: int = 32, lr: float = 2e-3,
                  weight_decay: float = 1e-4, dice: float = 1.0, seed: int = 0) -> MaskHead:
    """Train a :class:`MaskHead` on patch tokens ``[N, 196, 768]`` (float16/32) against
    soft targets ``[N, 14, 14]`` in [0, 1]: Adam, BCE + ``dice`` x soft Dice (Dice over
    the batch, so all-zero targets count through BCE and the batch's false positives).
    Deterministic for a seed on CPU; prints nothing."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = MaskHead(block, hidden)
    x = torch.as_tensor(tokens)
    y = torch.as_tensor(np.asarray(masks, np.float32))
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} token sets but {y.shape[0]} masks")
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * max(1, -(-len(x) // batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    head.train()
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=gen).split(batch):
                logits = head(x[idx].float())
                target = y[idx]
                loss = F.binary_cross_entropy_with_logits(logits, target)
                if dice:
                    p = torch.sigmoid(logits)
                    loss = loss + dice * (1 - (2 * (p * target).sum() + 1)
                                          / (p.sum() + target.sum() + 1))
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    return head.eval()
