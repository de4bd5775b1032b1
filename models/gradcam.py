"""Grad-CAM for the ResNeXt-LSTM: which parts of each face crop drive its scores.

Target layer: the output of the backbone's last convolutional stage, ``layer4``
(``backbone.forward_features``: ``[N, C, h, w]``, 7x7 for 224 px crops). Two maps per
explained frame:

* **frame**: the gradient of that frame's own frame-head logit;
* **video**: the gradient of the LSTM's video logit, back-propagated through the
  sequence to every frame's features (the score the verdict is made on).

Grad-CAM (Selvaraju et al., 2017): ``alpha_c = mean_xy d logit / d A_c(x, y)``, map
``= ReLU(sum_c alpha_c A_c)``, upsampled bilinearly to the crop's size and divided by
its maximum, so every map is in [0, 1] (all zeros when nothing pushes the score up).

``layer4`` reaches both heads only through global average pooling, ``f = mean_xy A``, so
``d logit / d A_c(x, y) = (1 / hw) d logit / d f_c`` at every position: the backward pass
runs through the heads and the LSTM on pooled features only, never through the trunk, and
``layer4`` activations are needed only for the frames that are drawn. This is exact, not an
approximation; ``tests/models/test_gradcam.py`` checks it against autograd through the full graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence


@dataclass(frozen=True)
class Explanation:
    """Grad-CAM maps of one video (an image is a one-frame video)."""

    positions: tuple[int, ...]  # which of the video's crops were mapped (0-based, in order)
    video_cam: np.ndarray  # [k, H, W] float32 in [0, 1]: the video score's Grad-CAM
    frame_cam: np.ndarray  # [k, H, W] float32 in [0, 1]: each frame score's Grad-CAM
    video_peak: np.ndarray  # [k] the video maps' maxima before normalisation
    frame_peak: np.ndarray  # [k]
    frame_p: np.ndarray  # [n] every frame's p_fake (frame head), as recomputed here
    video_p: float  # the video's p_fake (LSTM), as recomputed here


def score_gradients(
    model: nn.Module, features: Tensor, lengths: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the scores with respect to the pooled frame features.

    ``features``: ``[N, F]``, the frames of consecutive videos (``sum(lengths) == N``),
    as ``model.frame_features`` returns them (an inference-mode tensor is fine).
    Returns ``(frame_grad [N, F], video_grad [N, F], frame_logits [N], video_logits [B])``:
    row ``i`` of ``frame_grad`` is d(frame ``i``'s logit)/d f_i and of ``video_grad``
    d(its video's logit)/d f_i. In ``eval()`` frames and videos do not interact, so one
    backward pass of the summed logits gives every item's own gradient.
    """
    if model.training:
        raise ValueError("Grad-CAM needs the model in eval() mode (dropout and BatchNorm fixed)")
    lengths = [int(n) for n in lengths]
    if sum(lengths) != features.shape[0] or min(lengths, default=1) < 1:
        raise ValueError(f"lengths {lengths} do not split {features.shape[0]} frames")
    # cuDNN's RNN has no backward in eval mode; the LSTM here is small, native kernels do.
    # fp32 even inside a caller's autocast: these are small, and gradients want precision.
    with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False), torch.autocast(
        features.device.type, enabled=False
    ):
        f = features.detach().clone().float().requires_grad_(True)  # a normal, fp32 leaf
        frame_logits = model.frame_logits(f)
        padded = pad_sequence(list(f.split(lengths)), batch_first=True)
        video_logits = model.sequence_logits(padded, torch.tensor(lengths, dtype=torch.int64))
        (frame_grad,) = torch.autograd.grad(frame_logits.sum(), f, retain_graph=True)
        (video_grad,) = torch.autograd.grad(video_logits.sum(), f)
    return frame_grad, video_grad, frame_logits.detach(), video_logits.detach()


def layer4_activations(model: nn.Module, crops: Tensor, chunk: int = 64) -> Tensor:
    """``backbone.forward_features`` of normalised crops ``[N, 3, H, W]``, without grad."""
    with torch.no_grad():
        return torch.cat([model.backbone.forward_features(c).float() for c in crops.split(chunk)])


def cam_maps(activations: Tensor, feature_grads: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Grad-CAM maps from ``layer4`` activations ``[k, C, h, w]`` and the gradients of the
    score with respect to the pooled features ``[k, C]``. Returns ``(maps [k, size, size]``
    normalised to [0, 1], ``peaks [k]`` before normalisation)."""
    h, w = activations.shape[-2:]
    alpha = feature_grads.float() / float(h * w)  # = mean_xy d logit / d A (pooling is linear)
    cam = torch.relu(torch.einsum("kc,kchw->khw", alpha, activations.float()))
    cam = F.interpolate(cam[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    peak = cam.amax(dim=(1, 2))
    scale = torch.where(peak > 0, 1.0 / peak.clamp_min(1e-30), torch.zeros_like(peak))
    return (cam * scale[:, None, None]).clamp_(0.0, 1.0), peak


def _offsets(lengths: Sequence[int]) -> list[int]:
    return [0, *np.cumsum(lengths).tolist()]


def _check_positions(positions: Sequence[Sequence[int]], lengths: Sequence[int]) -> None:
    if len(positions) != len(lengths):
        raise ValueError(f"{len(positions)} position lists for {len(lengths)} videos")
    for pos, n in zip(positions, lengths):
        if any(not 0 <= p < n for p in pos):
            raise ValueError(f"positions {list(pos)} out of range for a {n}-frame video")


def _assemble(
    acts: Tensor,
    positions: Sequence[Sequence[int]],
    lengths: Sequence[int],
    grads: tuple[Tensor, Tensor, Tensor, Tensor],
    size: int,
) -> list[Explanation]:
    frame_grad, video_grad, frame_logits, video_logits = grads
    offsets = _offsets(lengths)
    rows = [offsets[b] + p for b, pos in enumerate(positions) for p in pos]
    index = torch.tensor(rows, dtype=torch.int64, device=frame_grad.device)
    video_cam, video_peak = cam_maps(acts, video_grad.index_select(0, index), size)
    frame_cam, frame_peak = cam_maps(acts, frame_grad.index_select(0, index), size)
    to_np = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
    video_cam, frame_cam = to_np(video_cam), to_np(frame_cam)
    video_peak, frame_peak = to_np(video_peak), to_np(frame_peak)
    frame_p = to_np(torch.sigmoid(frame_logits))
    video_p = to_np(torch.sigmoid(video_logits))
    out, k0 = [], 0
    for b, pos in enumerate(positions):
        k1 = k0 + len(pos)
        out.append(
            Explanation(
                positions=tuple(int(p) for p in pos),
                video_cam=video_cam[k0:k1],
                frame_cam=frame_cam[k0:k1],
                video_peak=video_peak[k0:k1],
                frame_peak=frame_peak[k0:k1],
                frame_p=frame_p[offsets[b] : offsets[b + 1]],
                video_p=float(video_p[b]),
            )
        )
        k0 = k1
    return out


def explain(
    model: nn.Module,
    crops: Tensor,
    lengths: Sequence[int],
    positions: Sequence[Sequence[int]] | None = None,
    chunk: int = 64,
) -> list[Explanation]:
    """Grad-CAM of every video from its normalised crops ``[N, 3, H, W]`` (the frames of
    consecutive videos, ``sum(lengths) == N``). ``positions[b]`` picks the frames of video
    ``b`` to map (default: all). Computes the trunk once for every crop."""
    lengths = [int(n) for n in lengths]
    positions = positions if positions is not None else [range(n) for n in lengths]
    _check_positions(positions, lengths)
    acts = layer4_activations(model, crops, chunk)
    features = acts.mean(dim=(2, 3))  # exactly what the backbone's average pool gives
    grads = score_gradients(model, features, lengths)
    offsets = _offsets(lengths)
    rows = [offsets[b] + p for b, pos in enumerate(positions) for p in pos]
    picked = acts.index_select(0, torch.tensor(rows, dtype=torch.int64, device=acts.device))
    return _assemble(picked, positions, lengths, grads, crops.shape[-1])


def explain_from_features(
    model: nn.Module,
    features: Tensor,
    lengths: Sequence[int],
    positions: Sequence[Sequence[int]],
    selected_crops: Tensor,
    chunk: int = 64,
) -> list[Explanation]:
    """Grad-CAM reusing the pooled features the classifier already computed (``[N, F]``):
    the trunk runs again only on ``selected_crops``, the normalised crops of the picked
    frames (``positions``, concatenated in order), so mapping the top k of 16 frames
    costs about k/16 of a classifier pass plus a backward through the heads."""
    lengths = [int(n) for n in lengths]
    _check_positions(positions, lengths)
    n_sel = sum(len(p) for p in positions)
    if selected_crops.shape[0] != n_sel:
        raise ValueError(f"{selected_crops.shape[0]} selected crops for {n_sel} positions")
    grads = score_gradients(model, features, lengths)
    acts = layer4_activations(model, selected_crops, chunk)
    return _assemble(acts, positions, lengths, grads, selected_crops.shape[-1])
