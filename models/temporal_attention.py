"""A bidirectional LSTM with temporal attention over a video's CLIP frame features.

The seeds' head: each frame's probe input (the standardised, L2-normalised CLS tokens of
the probe's blocks, :func:`deepaudit.models.clip_branch.probe_inputs`) is projected to a
small vector, a BiLSTM reads the sequence both ways, and a softmax over the frames
(attention) weights their states. One linear layer scores each frame's state, so the
item's logit is the attention-weighted mean of the frame logits: the weights say which
frames decided, and they go into the verdict row (``frame_weights``). An image is a
one-frame sequence (weight 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from deepaudit.models.clip_vit import WIDTH


class AttentionHead(nn.Module):
    """Frame features ``[B, T, D]`` (padded) + lengths -> item logits, frame logits and
    attention weights (zero on padding)."""

    def __init__(self, blocks: Sequence[int], proj: int = 64, hidden: int = 32,
                 dropout: float = 0.3) -> None:
        super().__init__()
        self.blocks = tuple(int(b) for b in blocks)
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(len(self.blocks) * WIDTH, proj)
        self.lstm = nn.LSTM(proj, hidden, batch_first=True, bidirectional=True)
        self.attend = nn.Linear(2 * hidden, 1)
        self.score = nn.Linear(2 * hidden, 1)

    def forward(self, x: Tensor, lengths: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        lengths_t = torch.as_tensor(list(lengths), dtype=torch.int64)
        h = F.gelu(self.proj(self.drop(x)))
        packed = pack_padded_sequence(h, lengths_t, batch_first=True, enforce_sorted=False)
        states, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True,
                                        total_length=x.shape[1])
        states = self.drop(states)
        valid = torch.arange(x.shape[1])[None, :] < lengths_t[:, None]
        a = self.attend(states).squeeze(-1).masked_fill(~valid.to(x.device), float("-inf"))
        weights = torch.softmax(a, dim=1)
        frame_logits = self.score(states).squeeze(-1)
        item_logits = (weights * frame_logits.masked_fill(~valid.to(x.device), 0.0)).sum(1)
        return item_logits, frame_logits, weights


def pad(sequences: Sequence[Tensor]) -> tuple[Tensor, list[int]]:
    """``[T_i, D]`` tensors -> ``[B, max T, D]`` zero-padded, and their lengths."""
    lengths = [len(s) for s in sequences]
    return nn.utils.rnn.pad_sequence(list(sequences), batch_first=True), lengths


def fit_attention_head(head: AttentionHead, sequences: Sequence[np.ndarray],
                       labels: Sequence[int], weights: np.ndarray | None = None,
                       epochs: int = 30, lr: float = 2e-3, weight_decay: float = 1e-2,
                       batch: int = 64, seed: int = 0,
                       min_frames: int = 2) -> AttentionHead:
    """Weighted BCE with AdamW over ``sequences`` (each ``[T_i, D]`` probe inputs). A
    training sequence longer than ``min_frames`` is cut to a random, ordered subset of
    ``min_frames..T`` frames each epoch, so the head works for the 4 frames a CPU audit
    scores as well as for every frame on a GPU. The head is re-initialised from the seed, so
    a seed gives the same head."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    for module in head.modules():  # the seed decides the start too
        if module is not head and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    seqs = [torch.as_tensor(np.asarray(s, np.float32)) for s in sequences]
    y = torch.as_tensor(np.asarray(labels), dtype=torch.float32)
    w = torch.as_tensor(np.ones(len(y)) if weights is None else weights, dtype=torch.float32)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(seqs), generator=gen).tolist()
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            picked = []
            for i in idx:
                s = seqs[i]
                if len(s) > min_frames:
                    k = int(rng.integers(min_frames, len(s) + 1))
                    s = s[np.sort(rng.choice(len(s), k, replace=False))]
                picked.append(s)
            x, lengths = pad(picked)
            logits, _, _ = head(x, lengths)
            loss = (F.binary_cross_entropy_with_logits(logits, y[idx], reduction="none")
                    * w[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return head.eval()


@torch.no_grad()
def attention_scores(head: AttentionHead, sequences: Sequence[np.ndarray | Tensor],
                     batch: int = 256) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Item logits ``[B]``, and per item its frame logits and attention weights."""
    head.eval()
    items, frames, weights = [], [], []
    for start in range(0, len(sequences), batch):
        part = [torch.as_tensor(np.asarray(s, np.float32)) for s in sequences[start:start + batch]]
        x, lengths = pad(part)
        logit, frame, w = head(x, lengths)
        items.append(logit.numpy())
        frames.extend(frame[b, :n].numpy() for b, n in enumerate(lengths))
        weights.extend(w[b, :n].numpy() for b, n in enumerate(lengths))
    return (np.concatenate(items) if items else np.zeros(0)), frames, weights
