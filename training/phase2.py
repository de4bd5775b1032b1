"""Phase 2 of training, sequences: the trunk is frozen; frame features of every item
are computed once (a few augmented views each), and the LSTM and the video head learn
from them: videos (random sorted subsets of their frames), images as one-frame sequences
(the audit scores an image as a one-frame video), and groups of images cut from one
video. Validation is item-level, exactly as the audit scores: images alone, videos on
``frames`` evenly spaced frames.

A batch's loss is :meth:`SequenceLoop.sequence_loss`.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import Tensor, nn

from deepaudit.models.augment import AugmentConfig, augment
from deepaudit.models.cnn_lstm import CNNLSTM
from deepaudit.models.metrics import roc_auc
from deepaudit.models.sbi import SBIConfig, self_blend
from deepaudit.pipeline.media import sample_indices
from deepaudit.training.loop import LoopBase, lr_lambda, stable_hash


class SequenceNet(nn.Module):
    """Phase 2 view of the model: LSTM + video head over frame features."""

    def __init__(self, model: CNNLSTM) -> None:
        super().__init__()
        self.lstm, self.video_head, self.dropout = model.lstm, model.video_head, model.dropout

    def forward(self, features: Tensor, lengths: Tensor) -> Tensor:
        return CNNLSTM.sequence_logits(self, features, lengths)  # type: ignore[arg-type]


class SequenceLoop(LoopBase):
    """Phase 2: LSTM and video head on frozen frame features."""

    @staticmethod
    def _prepare(crops: np.ndarray, aug: AugmentConfig | None, seed: list[int],
                 sbi: bool = False) -> np.ndarray:
        """One item's crops as phase 2 sees them: optionally self-blended (one blend for
        the whole sequence: the same parameters on every frame) and augmented."""
        if not sbi and aug is None:
            return crops
        frames = []
        for j, crop in enumerate(crops):
            if sbi:
                crop = self_blend(crop, np.random.default_rng(seed + [99]), SBIConfig())
            if aug is not None:
                crop = augment(crop, aug, np.random.default_rng(seed + [j]))
            frames.append(crop)
        return np.stack(frames)

    @torch.inference_mode()
    def _extract(self, jobs, batch: int = 64, flush_at: int = 1024) -> None:
        """Frame features for a stream of ``(crops [T, S, S, 3], callback)`` jobs: crops of
        many items share forward passes, and each callback gets its item's ``[T, F]``."""
        pending: list = []
        count = 0

        def flush() -> None:
            nonlocal pending, count
            if not pending:
                return
            x = torch.from_numpy(np.concatenate([c for c, _ in pending]))
            out = []
            for i in range(0, len(x), batch):
                with self._autocast():
                    out.append(self.model.backbone(self.normalise(x[i:i + batch])).float().cpu())
            feats = torch.cat(out).split([len(c) for c, _ in pending])
            for (_, callback), f in zip(pending, feats):
                callback(f)
            pending, count = [], 0

        for crops, callback in jobs:
            pending.append((crops, callback))
            count += len(crops)
            if count >= flush_at:
                flush()
        flush()

    def _sequence_units(self):
        """Training units (feature views, label) and validation units for phase 2."""
        cfg = self.cfg
        aug = AugmentConfig().confounds_only() if cfg.augment else None
        views = max(1, cfg.seq_views if aug is not None else 1)
        self.model.eval()
        rows = [r for r in self.train_rows if r["item_key"] in self.crops]
        feats: dict[str, list] = {r["item_key"]: [None] * views for r in rows}
        sbi_units: list[list] = []

        def jobs():
            for n, r in enumerate(rows):
                crops, h = self.crops[r["item_key"]], stable_hash(r["item_key"])
                for v in range(views):
                    yield (self._prepare(crops, aug, [cfg.seed, 21, h, v]),
                           lambda f, k=r["item_key"], v=v: feats[k].__setitem__(v, f))
                if cfg.sbi and r["label"] == 0:
                    if np.random.default_rng([cfg.seed, 22, h]).random() < cfg.sbi:
                        unit: list = [None]
                        sbi_units.append(unit)
                        yield (self._prepare(crops, aug, [cfg.seed, 23, h], sbi=True),
                               lambda f, u=unit: u.__setitem__(0, f))
                self._event(force=n + 1 == len(rows), type="features", done=n + 1,
                            total=len(rows))

        self._extract(jobs())
        train: list[tuple[list[Tensor], int]] = [(feats[r["item_key"]], r["label"]) for r in rows]
        train += [(unit, 1) for unit in sbi_units]
        sequences: dict[str, list[dict]] = {}
        for r in rows:
            if r.get("sequence") and r["media_type"] == "image":
                sequences.setdefault(r["sequence"], []).append(r)
        for group in sequences.values():
            if len(group) < 2:
                continue
            group.sort(key=lambda r: r["media_id"])
            train.append(([torch.cat([feats[r["item_key"]][v] for r in group])
                           for v in range(views)], group[0]["label"]))
        val_rows = [r for r in self.val_rows if r["item_key"] in self.crops]
        val_feats: dict[str, Tensor] = {}
        self._extract((self.crops[r["item_key"]],
                       lambda f, k=r["item_key"]: val_feats.__setitem__(k, f)) for r in val_rows)
        val = []
        for r in val_rows:
            f = val_feats[r["item_key"]]
            val.append((f[sample_indices(len(f), self.model_config.frames)], r))
        return train, val

    def phase2(self) -> None:
        import ray.train.torch

        cfg, st = self.cfg, self.state
        if st.p2_stopped or st.p2_epochs >= cfg.seq_epochs:
            return
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.model.param_groups()["sequence_head"]:
            p.requires_grad_(True)
        self._event(type="info", message="phase 2: computing frame features")
        train, val = self._sequence_units()
        n = self._min_over_workers(len(train))
        if n == 0:
            raise ValueError("a training worker has no training sequences: use fewer workers")
        batch = min(cfg.seq_batch_size, n)
        steps = n // batch
        net = ray.train.torch.prepare_model(SequenceNet(self.model), move_to_device=False)
        params = [p for p in SequenceNet(self.model).parameters() if p.requires_grad]
        optim = torch.optim.AdamW(params, lr=cfg.seq_lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            optim, lr_lambda(cfg.schedule, cfg.seq_epochs * steps, 0))
        if st.optim2 is not None:
            optim.load_state_dict(st.optim2)
            sched.load_state_dict(st.sched2)
        max_len = self.model_config.frames
        for epoch in range(st.p2_epochs, cfg.seq_epochs):
            t0, c0 = time.perf_counter(), time.process_time()
            rng = np.random.default_rng([cfg.seed, 2, epoch, self.rank])
            order = rng.permutation(len(train))[: steps * batch]
            self.model.train()
            self.model.backbone.eval()
            self._event(type="start", phase=2, epoch=epoch + 1, epochs=cfg.seq_epochs, steps=steps)
            total = 0.0
            for step in range(steps):
                seqs, labels = [], []
                for u in order[step * batch:(step + 1) * batch]:
                    views, label = train[u]
                    f = views[int(rng.integers(len(views)))]
                    top = min(len(f), max_len)
                    length = int(rng.integers(max(1, math.ceil(top / 2)), top + 1))
                    pick = np.sort(rng.choice(len(f), size=length, replace=False))
                    seqs.append(f[torch.from_numpy(pick)])
                    labels.append(label)
                loss = self.sequence_loss(net, seqs, labels)
                total += self._optimise(loss, optim, sched, st)
                self._event(force=step + 1 == steps, type="step", phase=2, epoch=epoch + 1,
                            step=step + 1, steps=steps, loss=total / (step + 1))
            preds = self._predict_items(val)
            val_loss, val_auc = self._item_loss_auc(preds)
            st.p2_epochs = epoch + 1
            improved, score = self._improved(st.best2, val_loss, val_auc)
            if improved:
                st.best2 = {"epoch": epoch + 1, "score": score, "val_loss": val_loss,
                            "val_auc": val_auc, "predictions": preds,
                            "weights": self._sequence_weights()}
                st.bad2 = 0
            else:
                st.bad2 += 1
            row = self._epoch_row(2, epoch, total / max(1, steps), val_loss, val_auc,
                                  sched, t0, c0, improved)
            st.p2_stopped = cfg.early_stop != "none" and st.bad2 >= cfg.patience
            st.optim2, st.sched2 = optim.state_dict(), sched.state_dict()
            self._event(type="epoch", **row)
            self._save(row)
            if st.p2_stopped:
                self._event(type="info", message=f"early stop after phase 2 epoch {epoch + 1}")
                break

    def sequence_loss(self, net: nn.Module, seqs: list[Tensor], labels: list[int]) -> Tensor:
        """One batch's loss: frame-feature sequences ``seqs`` ([T, F] each) with labels."""
        padded, lengths = self._pad(seqs)
        logits = net(padded, lengths).float()
        return self.loss_fn(logits, torch.tensor(labels, dtype=torch.float32,
                                                 device=self.device))

    def _sequence_weights(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()
                if k.startswith(("lstm.", "video_head."))}

    def _pad(self, seqs: list[Tensor]) -> tuple[Tensor, Tensor]:
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
        padded = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True).to(self.device)
        return padded, lengths

    @torch.inference_mode()
    def _predict_items(self, val: list) -> list[dict]:
        self.model.eval()
        local = []
        for i in range(0, len(val), 64):
            chunk = val[i:i + 64]
            padded, lengths = self._pad([f for f, _ in chunk])
            p = torch.sigmoid(self.model.sequence_logits(padded, lengths).float()).cpu().tolist()
            for (f, r), pi in zip(chunk, p):
                local.append({"media_id": r["media_id"], "uri": r["uri"], "label": r["label"],
                              "source": r["source"], "media_type": r["media_type"],
                              "group": r["group"], "n_frames": len(f), "p_fake": pi})
        return sorted(self._gather(local), key=lambda d: d["media_id"])

    def _item_loss_auc(self, preds: list[dict]) -> tuple[float, float | None]:
        if not preds:
            return float("nan"), None
        y = torch.tensor([d["label"] for d in preds], dtype=torch.float32)
        p = torch.tensor([d["p_fake"] for d in preds], dtype=torch.float64).clamp(1e-7, 1 - 1e-7)
        loss = float(torch.nn.functional.binary_cross_entropy(p, y.double()))
        return loss, roc_auc(y.int().tolist(), p.tolist())

