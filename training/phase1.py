"""Phase 1 of training, frames: the CNN trunk (the recipe's architecture) and the
per-frame head learn from single face crops (images and video frames), augmented on the
fly, with optional self-blended fakes made from real crops. Validation: item-level loss
and ROC AUC from the mean of an item's frame scores.

A batch's loss is :meth:`FrameLoop.frame_loss`.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor, nn

from deepaudit.models.augment import AugmentConfig, augment
from deepaudit.models.cnn_lstm import CNNLSTM
from deepaudit.models.metrics import roc_auc
from deepaudit.models.sbi import SBIConfig, self_blend
from deepaudit.training.loop import LoopBase, WorkerInputs, lr_lambda


class FrameNet(nn.Module):
    """Phase 1 view of the model: trunk + frame head (shares the model's parameters)."""

    def __init__(self, model: CNNLSTM) -> None:
        super().__init__()
        self.backbone, self.frame_head = model.backbone, model.frame_head
        self.dropout = model.dropout

    def forward(self, x: Tensor) -> Tensor:
        return CNNLSTM.frame_logits(self, self.backbone(x))  # type: ignore[arg-type]


class CropDataset(torch.utils.data.Dataset):
    """Augmented single crops. Item ``i`` of epoch ``e`` is a pure function of
    ``(seed, e, i)``, whatever DataLoader worker makes it."""

    def __init__(self, crops: np.ndarray, labels: np.ndarray, aug: AugmentConfig | None,
                 sbi: float, seed: int, patch: int | None = None) -> None:
        self.crops, self.labels, self.aug, self.sbi, self.seed = crops, labels, aug, sbi, seed
        self.patch = patch  # random square patches of this size, if set
        self.epoch = 0
        self.sbi_cfg = SBIConfig()

    def __len__(self) -> int:
        return 2 * len(self.crops)  # i >= len(crops): a self-blended fake of crop i - len

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        rng = np.random.default_rng([self.seed, 11, self.epoch, int(i)])
        blend, i = i >= len(self.crops), i % len(self.crops)
        crop, label = self.crops[i], int(self.labels[i])
        if blend or (self.sbi and label == 0 and rng.random() < self.sbi):
            crop, label = self_blend(crop, rng, self.sbi_cfg), 1
        if self.aug is not None:
            crop = augment(crop, self.aug, rng)
        if self.patch:
            y, x = (int(v) for v in rng.integers(0, crop.shape[0] - self.patch + 1, size=2))
            crop = crop[y : y + self.patch, x : x + self.patch]
        return np.ascontiguousarray(crop), label


def balanced_draw(labels: np.ndarray, sources: np.ndarray, owners: np.ndarray, n: int,
                  sbi: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` crop indices drawn with replacement: half real, half fake. Of the fake half,
    ``sbi`` are self-blended real crops (index + ``len(labels)``; all of it when there are
    no labelled fakes). Within each part a source's share grows with the square root of
    its item count, its items share it equally, and an item's crops share the item's."""
    total = len(labels)
    parts = []  # (mass, crop indices, index offset)
    reals, fakes = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    fake_sbi = sbi if len(fakes) else 1.0
    if len(reals):
        parts.append((0.5, reals, 0))
        if fake_sbi > 0:
            parts.append((0.5 * fake_sbi, reals, total))
    if len(fakes):
        parts.append((0.5 * (1 - fake_sbi) if len(reals) else 1.0, fakes, 0))
    index, weight = [], []
    for mass, idx, offset in parts:
        if mass <= 0:
            continue
        w = np.zeros(len(idx))
        src, own = sources[idx], owners[idx]
        names = np.unique(src)
        shares = np.array([np.sqrt(len(np.unique(own[src == name]))) for name in names])
        for name, share in zip(names, shares / shares.sum()):
            in_src = src == name
            _, inverse, per_item = np.unique(own[in_src], return_inverse=True,
                                             return_counts=True)
            w[in_src] = mass * share / len(per_item) / per_item[inverse]
        index.append(idx + offset)
        weight.append(w)
    index, weight = np.concatenate(index), np.concatenate(weight)
    return rng.choice(index, size=n, replace=True, p=weight / weight.sum())


def collate(batch):
    crops, labels = zip(*batch)
    return torch.from_numpy(np.stack(crops)), torch.tensor(labels, dtype=torch.float32)


class FrameLoop(LoopBase):
    """Phase 1: trunk and frame head on single crops."""

    def __init__(self, inputs: WorkerInputs) -> None:
        super().__init__(inputs)
        best1 = self.state.best1
        # The best phase-1 weights live in memory while they are the current ones.
        self._best1_weights = self._cpu_state() if best1 and best1["model"] is None else None

    def _freeze_stages(self) -> list[nn.Module]:
        frozen = self.model.backbone.frozen_modules(self.cfg.freeze)
        for m in frozen:
            for p in m.parameters():
                p.requires_grad_(False)
        return frozen

    def phase1(self) -> None:
        """Train trunk + frame head, from where the state says, up to ``cfg.epochs``."""
        import ray.train.torch

        cfg, st = self.cfg, self.state
        if st.p1_stopped or st.p1_epochs >= cfg.epochs:
            return
        frozen = self._freeze_stages()
        train_crops, train_labels, train_owners = self._flatten(self.train_rows)
        val_crops, val_labels, val_owners = self._flatten(self.val_rows)
        per_worker = -(-cfg.epoch_crops // self.world) if cfg.epoch_crops else len(train_crops)
        n = self._min_over_workers(per_worker if len(train_crops) else 0)
        if n == 0:
            raise ValueError("a training worker has no training crops: use fewer workers")
        batch = min(cfg.batch_size, n)
        steps = n // batch
        aug = AugmentConfig() if cfg.augment else None
        data = CropDataset(train_crops, train_labels, aug, 0.0 if cfg.balance else cfg.sbi,
                           cfg.seed, cfg.patch_size)
        kept = [r for r in self.train_rows if r["item_key"] in self.crops]
        sources = np.array([r["source"] for r in kept])[train_owners] if kept else None
        net = ray.train.torch.prepare_model(FrameNet(self.model), move_to_device=False)
        params = [p for p in FrameNet(self.model).parameters() if p.requires_grad]
        trunk = [p for p in self.model.param_groups()["trunk"] if p.requires_grad]
        optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = int(round(cfg.warmup_epochs * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            optim, lr_lambda(cfg.schedule, cfg.epochs * steps, warmup))
        if st.optim1 is not None:
            optim.load_state_dict(st.optim1)
            sched.load_state_dict(st.sched1)
        # Any change to the trunk invalidates the sequence phase.
        st.reset_phase2()
        workers = cfg.loader_workers if cfg.loader_workers is not None else (
            0 if self.device.type == "cpu" else 4)
        for epoch in range(st.p1_epochs, cfg.epochs):
            t0, c0 = time.perf_counter(), time.process_time()
            data.epoch = epoch
            rng = np.random.default_rng([cfg.seed, 1, epoch, self.rank])
            if cfg.balance:
                order = balanced_draw(train_labels, sources, train_owners, steps * batch,
                                      cfg.sbi, rng)
            else:
                order = rng.permutation(len(train_crops))
                if len(order) < steps * batch:  # --epoch-crops above the crop count
                    order = rng.choice(len(train_crops), steps * batch)
            head_only = epoch < cfg.head_epochs  # the trunk waits until the head has learnt
            for p in trunk:
                p.requires_grad_(not head_only)
            loader = torch.utils.data.DataLoader(
                data, batch_size=batch, sampler=order[: steps * batch].tolist(),
                num_workers=workers, collate_fn=collate, drop_last=True,
                pin_memory=self.device.type == "cuda")
            self.model.train()
            for m in [self.model.backbone] if head_only else frozen:
                m.eval()
            self._event(type="start", phase=1, epoch=epoch + 1, epochs=cfg.epochs, steps=steps)
            total = 0.0
            for step, (x, y) in enumerate(loader):
                loss = self.frame_loss(net, x, y)
                total += self._optimise(loss, optim, sched, st)
                self._event(force=step + 1 == steps, type="step", phase=1, epoch=epoch + 1,
                            step=step + 1, steps=steps, loss=total / (step + 1))
            val_loss, val_auc = self._validate_frames(val_crops, val_labels, val_owners, batch)
            st.p1_epochs = epoch + 1
            improved, score = self._improved(st.best1, val_loss, val_auc)
            if improved:
                st.best1 = {"epoch": epoch + 1, "score": score, "val_loss": val_loss,
                            "val_auc": val_auc, "model": None}
                st.bad1 = 0
                self._best1_weights = self._cpu_state()
            else:
                st.bad1 += 1
                if st.best1["model"] is None:  # the model moves on: keep the best copy
                    st.best1["model"] = self._best1_weights
            row = self._epoch_row(1, epoch, total / max(1, steps), val_loss, val_auc,
                                  sched, t0, c0, improved)
            st.p1_stopped = cfg.early_stop != "none" and st.bad1 >= cfg.patience
            st.optim1, st.sched1 = optim.state_dict(), sched.state_dict()
            if st.p1_stopped or epoch + 1 >= cfg.epochs:
                self._restore_best1()
            self._event(type="epoch", **row)
            self._save(row)
            if st.p1_stopped:
                self._event(type="info", message=f"early stop after phase 1 epoch {epoch + 1}")
                break
        for p in self.model.parameters():
            p.requires_grad_(True)

    def frame_loss(self, net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """One batch's loss: uint8 crops ``x`` [B, S, S, 3] with labels ``y`` [B]."""
        with self._autocast():
            logits = net(self.normalise(x)).float()
        return self.loss_fn(logits, y.to(self.device))

    def _restore_best1(self) -> None:
        """End of phase 1: the model takes the best epoch's weights."""
        best = self.state.best1
        if best is not None and best["model"] is not None:
            self.model.load_state_dict(best["model"])
            self._best1_weights, best["model"] = best["model"], None

    def _flatten(self, rows: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All crops of ``rows`` in one array, with each crop's label and item index."""
        size = self.model_config.input_size
        kept = [r for r in rows if r["item_key"] in self.crops]
        if not kept:
            return (np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64),
                    np.zeros(0, np.int64))
        counts = [len(self.crops[r["item_key"]]) for r in kept]
        labels = np.repeat([r["label"] for r in kept], counts)
        owners = np.repeat(np.arange(len(kept)), counts)
        return np.concatenate([self.crops[r["item_key"]] for r in kept]), labels, owners

    @torch.inference_mode()
    def _validate_frames(self, crops: np.ndarray, labels: np.ndarray, owners: np.ndarray,
                         batch: int) -> tuple[float, float | None]:
        """Phase 1 validation, per item (as the audit scores items, not frames): an item's
        loss is the mean BCE of its frames, its score the mean frame probability. A video
        counts once, however many frames it has."""
        self.model.eval()
        logits = []
        for i in range(0, len(crops), batch * 2):
            x = torch.from_numpy(crops[i:i + batch * 2])
            with self._autocast():
                feats = self.model.backbone(self.normalise(x))
            logits.append(self.model.frame_logits(feats.float()).float().cpu())
        local = []
        if logits:
            z = torch.cat(logits)
            y = torch.from_numpy(labels).float()
            losses = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
            probs = torch.sigmoid(z)
            for item in np.unique(owners):
                mask = torch.from_numpy(owners == item)
                local.append((int(labels[mask.numpy()][0]), float(losses[mask].mean()),
                              float(probs[mask].mean())))
        items = self._gather(local)
        if not items:
            return float("nan"), None
        loss = float(np.mean([it[1] for it in items]))
        return loss, roc_auc([it[0] for it in items], [it[2] for it in items])
