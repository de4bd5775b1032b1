"""CNN + LSTM deepfake classifier: per-frame CNN features, a sequence model over them.

The trunk is any module with ``feat_dim``, ``forward`` (pooled ``[N, feat_dim]``
features), ``forward_features`` (the spatial map Grad-CAM reads) and
``frozen_modules(level)`` (what ``train --freeze`` fixes): ResNeXt or EfficientNet-Lite.

Inference goes through the detector contract (:mod:`deepaudit.models.detector`):
``score`` runs ``frame_features`` on chunks of crops from many videos, then
``frame_logits`` and ``sequence_logits`` on the regrouped features; ``forward`` chains
them for training on ``[B, T, 3, H, W]`` clips.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence

from deepaudit.models.detector import DetectorMixin, Scores
from deepaudit.models.preprocess import BranchPreprocess


class CNNLSTM(DetectorMixin, nn.Module):
    """A CNN backbone, an LSTM over frame features, and two logit heads.

    ``frame_head`` scores each frame from its CNN features; ``video_head`` scores a video
    from the mean LSTM output over its valid frames. ``dropout`` is applied before both
    heads (and between LSTM layers when ``num_layers > 1``); it is a no-op in ``eval()``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        hidden_size: int = 256,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.4,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.lstm = nn.LSTM(
            backbone.feat_dim,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout)
        self.frame_head = nn.Linear(backbone.feat_dim, 1)
        self.video_head = nn.Linear(hidden_size * (2 if bidirectional else 1), 1)

    def frame_features(self, crops: Tensor) -> Tensor:
        """Backbone features of normalised face crops: ``[N, 3, H, W]`` → ``[N, F]``."""
        return self.backbone(crops)

    def frame_logits(self, features: Tensor) -> Tensor:
        """Per-frame fake logits from backbone features: ``[N, F]`` → ``[N]``."""
        return self.frame_head(self.dropout(features)).squeeze(-1)

    def sequence_logits(self, features: Tensor, lengths: Tensor) -> Tensor:
        """Per-video fake logits: ``[B, T, F]`` features, ``[B]`` valid lengths → ``[B]``.

        Only the first ``lengths[b]`` steps of video ``b`` are seen by the LSTM, so the
        values in the padding never change the result.
        """
        batch, steps = features.shape[:2]
        lengths = lengths.to("cpu", torch.int64)  # pack_padded_sequence wants CPU lengths
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must have shape [{batch}], got {list(lengths.shape)}")
        if batch and (int(lengths.min()) < 1 or int(lengths.max()) > steps):
            raise ValueError(f"lengths must be in [1, {steps}], got {lengths.tolist()}")
        packed = pack_padded_sequence(features, lengths, batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True)  # zeros past ends
        mean = out.sum(dim=1) / lengths.to(out.device, out.dtype).unsqueeze(1)
        return self.video_head(self.dropout(mean)).squeeze(-1)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Clips ``[B, T, 3, H, W]`` (+ optional valid lengths ``[B]``, default ``T``) →
        ``(video_logits [B], frame_logits [B, T])``. Frame logits past a clip's length
        are computed on the padding and should be masked by the caller."""
        batch, steps = x.shape[:2]
        features = self.frame_features(x.flatten(0, 1)).reshape(batch, steps, -1)
        if lengths is None:
            lengths = torch.full((batch,), steps, dtype=torch.int64)
        return self.sequence_logits(features, lengths), self.frame_logits(features)

    # The detector contract (models/detector.py).

    cam_method = "Grad-CAM on the CNN trunk's last feature map"

    def preprocessing(self) -> dict[str, BranchPreprocess]:
        cfg = self.config
        return {"cnn": BranchPreprocess(size=cfg.input_size, resize="bilinear",
                                        mean=tuple(cfg.mean), std=tuple(cfg.std))}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"trunk": list(self.backbone.parameters()),
                "frame_head": list(self.frame_head.parameters()),
                "sequence_head": list(self.lstm.parameters()) + list(self.video_head.parameters())}

    def _normaliser(self, device: torch.device):
        cached = getattr(self, "_norm", None)
        if cached is None or cached.device != device:
            cached = self.preprocessing()["cnn"].normaliser(device)
            object.__setattr__(self, "_norm", cached)
        return cached

    def normalise(self, crops: Tensor) -> Tensor:
        """Uint8 crops ``[N, S, S, 3]`` -> this model's input on its device."""
        return self._normaliser(next(self.parameters()).device)(crops)

    def raw_scores(self, crops: Tensor, lengths: Sequence[int], chunk: int = 64) -> Scores:
        device = next(self.parameters()).device
        with torch.inference_mode(), torch.autocast(
                "cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            feats = torch.cat([self.frame_features(self.normalise(c)).float()
                               for c in crops.split(chunk)])
            frame_p = torch.sigmoid(self.frame_logits(feats).float()).cpu().numpy()
            padded = pad_sequence(list(feats.split(list(lengths))), batch_first=True)
            lens = torch.tensor(list(lengths), dtype=torch.int64)
            video_p = torch.sigmoid(self.sequence_logits(padded, lens).float()).cpu().numpy()
        p = video_p.astype(np.float64)
        return Scores(video_p=p, frame_p=frame_p.astype(np.float64),
                      head=["sequence"] * len(lengths), branch_p={"cnn": p.copy()},
                      cam_features=feats)

    def explain(self, features: Tensor, lengths: Sequence[int],
                positions: Sequence[Sequence[int]], crops: np.ndarray) -> list:
        """Grad-CAM of the picked frames: ``features`` are the items' rows of
        ``Scores.cam_features``, ``crops`` the picked frames' uint8 crops, in order."""
        from deepaudit.models.gradcam import explain_from_features

        return explain_from_features(self, features, lengths, positions,
                                     self.normalise(torch.from_numpy(np.ascontiguousarray(crops))))
