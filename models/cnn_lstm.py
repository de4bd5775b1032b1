"""CNN + LSTM deepfake classifier: per-frame CNN features, a sequence model over them.

The trunk is any module with ``feat_dim``, ``forward`` (pooled ``[N, feat_dim]``
features), ``forward_features`` (the spatial map Grad-CAM reads) and
``frozen_modules(level)`` (what ``train --freeze`` fixes): ResNeXt or EfficientNet-Lite.

Inference code calls the pieces separately (``frame_features`` on batches of crops from
many videos, then ``frame_logits`` and ``sequence_logits`` on the regrouped features);
``forward`` chains them for training on ``[B, T, 3, H, W]`` clips.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class CNNLSTM(nn.Module):
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
