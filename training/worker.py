"""The per-worker training loop that Ray Train's TorchTrainer runs (one copy per worker).

Two phases, both here, both data-parallel (DDP over gloo on CPU, NCCL on GPU):

1. **Frames**: the CNN trunk (the recipe's architecture) and the per-frame head learn
   from single face crops (images and video frames), augmented on the fly, with optional
   self-blended fakes made from real crops. Validation: frame-level loss and ROC AUC.
2. **Sequences**: the trunk is frozen; frame features of every item are computed once
   (a few augmented views each), and the LSTM and the video head learn from them:
   videos (random sorted subsets of their frames), images as one-frame sequences (the
   audit scores an image as a one-frame video), and groups of images cut from one video.
   Validation is item-level, exactly as the audit scores: images alone, videos on
   ``frames`` evenly spaced frames.

Each epoch ends with ``ray.train.report`` and a checkpoint (model, optimizer, scheduler,
early-stopping state, history), so a run resumes where it stopped. The items are
sharded over workers by sequence (a video, or images cut from one video), each worker
loads only its shard's crops, and every worker runs the same number of steps.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from deepaudit.infra.storage import StorageConfig
from deepaudit.models.augment import AugmentConfig, augment
from deepaudit.models.checkpoint import ModelHandle
from deepaudit.models.cnn_lstm import CNNLSTM
from deepaudit.models.losses import BinaryLoss, LossConfig
from deepaudit.models.metrics import (
    roc_auc,
    slice_metrics,
    threshold_at_fpr,
    threshold_max_youden,
)
from deepaudit.models.preprocess import CropNormaliser
from deepaudit.models.pretrained import is_trunk_init, load_trunk
from deepaudit.models.registry import ModelConfig, create_model
from deepaudit.models.sbi import SBIConfig, self_blend
from deepaudit.pipeline.media import sample_indices
from deepaudit.training.crop_cache import load_crops

STATE_FILE = "state.pt"
FINAL_FILE = "final.pt"


class FrameNet(nn.Module):
    """Phase 1 view of the model: trunk + frame head (shares the model's parameters)."""

    def __init__(self, model: CNNLSTM) -> None:
        super().__init__()
        self.backbone, self.frame_head = model.backbone, model.frame_head
        self.dropout = model.dropout

    def forward(self, x: Tensor) -> Tensor:
        return CNNLSTM.frame_logits(self, self.backbone(x))  # type: ignore[arg-type]


class SequenceNet(nn.Module):
    """Phase 2 view of the model: LSTM + video head over frame features."""

    def __init__(self, model: CNNLSTM) -> None:
        super().__init__()
        self.lstm, self.video_head, self.dropout = model.lstm, model.video_head, model.dropout

    def forward(self, features: Tensor, lengths: Tensor) -> Tensor:
        return CNNLSTM.sequence_logits(self, features, lengths)  # type: ignore[arg-type]


def _stable_hash(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def lr_lambda(schedule: str, total: int, warmup: int):
    """Multiplier of the base LR at optimizer step ``s``: linear warm-up, then cosine to
    1% / a x0.1 step at two thirds / constant."""

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "step":
            return 0.1 if progress >= 2 / 3 else 1.0
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


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


@dataclass(frozen=True)
class WorkerInputs:
    """What the driver hands every training worker (``train_loop_config["inputs"]``)."""

    cfg: Any  # TrainConfig
    model_config: ModelConfig
    items: pa.Table  # the split table: one row per item, with split, label, item_key
    cache_dir: str  # the crop cache (see .crop_cache)
    storage: StorageConfig
    threads: int  # torch intra-op threads
    init_handle: ModelHandle | None = None  # fine-tuning from a deepaudit checkpoint
    queue: Any = None  # ray.util.queue.Queue for progress events, rank 0 only


@dataclass
class LoopState:
    """The training loop's state, saved with every checkpoint (``--resume`` restores it).
    Phase 1 trains the CNN and frame head on crops; phase 2 the LSTM on frozen features."""

    p1_epochs: int = 0
    p1_stopped: bool = False  # early stopping ended phase 1
    p2_epochs: int = 0
    p2_stopped: bool = False
    best1: dict | None = None  # best phase 1 epoch: score, epoch, val metrics, weights
    best2: dict | None = None
    bad1: int = 0  # epochs without improvement (early stopping)
    bad2: int = 0
    history: list = field(default_factory=list)  # one dict per epoch
    steps: int = 0
    optim1: dict | None = None  # optimiser and scheduler state dicts while a phase runs
    sched1: dict | None = None
    optim2: dict | None = None
    sched2: dict | None = None

    def reset_phase2(self) -> None:
        """Any change to the trunk invalidates the sequence phase."""
        self.p2_epochs, self.p2_stopped, self.best2, self.bad2 = 0, False, None, 0
        self.optim2 = self.sched2 = None


class WorkerLoop:
    def __init__(self, inputs: WorkerInputs) -> None:
        import ray.train
        import ray.train.torch

        self.cfg = inputs.cfg
        self.model_config = inputs.model_config
        self.queue = inputs.queue
        self.cache_dir = inputs.cache_dir
        self.storage = inputs.storage
        torch.set_num_threads(max(1, int(inputs.threads)))
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.amp = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.t_last_event = 0.0

        torch.manual_seed(self.cfg.seed)  # identical initial weights on every worker
        init = inputs.init_handle
        model = init.load() if init is not None else create_model(
            self.model_config.arch, **self.model_config.arch_kwargs)
        if is_trunk_init(self.cfg.init_from):
            load_trunk(model, self.cfg.init_from, self.model_config.arch)
        model.config = self.model_config
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.normalise = CropNormaliser(self.model_config, self.device)
        self.loss_fn = BinaryLoss(LossConfig(self.cfg.loss, gamma=self.cfg.focal_gamma,
                                             label_smoothing=self.cfg.label_smoothing))

        self.state = LoopState()
        self.resumed_from = None
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                saved = torch.load(os.path.join(d, STATE_FILE), map_location="cpu",
                                   weights_only=False)
            if saved["arch"] != self.model_config.to_dict():
                raise ValueError("the checkpoint in this output folder was trained with another "
                                 "model configuration: use a new --output to start afresh")
            self.model.load_state_dict(saved["model"])
            self.state = LoopState(**saved["state"])
            self.resumed_from = {"phase1_epochs": self.state.p1_epochs,
                                 "phase2_epochs": self.state.p2_epochs,
                                 "steps": self.state.steps}
            self._event(type="info", message=f"resumed after phase 1 epoch "
                        f"{self.state.p1_epochs}, phase 2 epoch {self.state.p2_epochs}")
        best1 = self.state.best1
        # The best phase-1 weights live in memory while they are the current ones.
        self._best1_weights = self._cpu_state() if best1 and best1["model"] is None else None

        items = inputs.items.to_pylist()
        self.train_rows = [r for r in items if r["split"] == "train" and self._mine(r)]
        self.val_rows = [r for r in items if r["split"] == "val" and self._mine(r)]
        keys = [r["item_key"] for r in self.train_rows + self.val_rows]
        self.crops = {k: v[0] for k, v in load_crops(self.cache_dir, keys, self.storage).items()}

    # ------------------------------------------------------------------ plumbing

    def _mine(self, row: dict) -> bool:
        unit = row.get("sequence") or row["media_id"]
        return _stable_hash(unit) % self.world == self.rank

    def _event(self, force: bool = True, **payload) -> None:
        if self.rank != 0 or self.queue is None:
            return
        now = time.monotonic()
        if not force and now - self.t_last_event < 0.5:
            return
        self.t_last_event = now
        try:
            self.queue.put_nowait(payload)
        except Exception:  # a full or gone queue never stops training
            pass

    def _min_over_workers(self, n: int) -> int:
        if self.world == 1:
            return n
        import torch.distributed as dist

        t = torch.tensor([n], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def _gather(self, obj: list) -> list:
        if self.world == 1:
            return obj
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return [x for part in out for x in part]

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp)

    def _save(self, metrics: dict, final: dict | None = None) -> None:
        """Report metrics from every worker; rank 0 attaches the checkpoint."""
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save({"arch": self.model_config.to_dict(), "model": self.model.state_dict(),
                        "state": asdict(self.state)}, os.path.join(d, STATE_FILE))
            if final is not None:
                torch.save(final, os.path.join(d, FINAL_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    @staticmethod
    def _optimise(loss, optim, sched, st: dict) -> float:
        """One optimiser and LR-schedule step on ``loss``; counts it in ``st``."""
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
        st.steps += 1
        return float(loss.detach())

    def _epoch_row(self, phase: int, epoch: int, train_loss: float, val_loss: float,
                   val_auc: float | None, sched, t0: float, c0: float, improved: bool) -> dict:
        """One epoch's history row (also the epoch event and the reported metrics)."""
        row = {"phase": phase, "epoch": epoch + 1, "train_loss": train_loss,
               "val_loss": val_loss, "val_auc": val_auc, "lr": sched.get_last_lr()[0],
               "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
               "best": improved, "steps": self.state.steps}
        self.state.history.append(row)
        return row

    def _improved(self, best: dict | None, loss: float, auc: float | None) -> tuple[bool, float]:
        mode = self.cfg.early_stop
        if mode == "none":
            return True, 0.0
        if mode == "auc" and auc is not None:
            score = auc
        else:
            score = -loss
        return best is None or score > best["score"], score

    # ------------------------------------------------------------------ phase 1

    def _freeze_stages(self) -> list[nn.Module]:
        frozen = self.model.backbone.frozen_modules(self.cfg.freeze)
        for m in frozen:
            for p in m.parameters():
                p.requires_grad_(False)
        return frozen

    def _cpu_state(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

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
                with self._autocast():
                    logits = net(self.normalise(x)).float()
                loss = self.loss_fn(logits, y.to(self.device))
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

    # ------------------------------------------------------------------ phase 2

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
                crops, h = self.crops[r["item_key"]], _stable_hash(r["item_key"])
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
                padded, lengths = self._pad(seqs)
                logits = net(padded, lengths).float()
                loss = self.loss_fn(logits, torch.tensor(labels, dtype=torch.float32,
                                                         device=self.device))
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

    # ------------------------------------------------------------------ run

    def run(self) -> None:
        st = self.state
        self.phase1()
        self.phase2()
        best = st.best2
        if best is None:
            raise RuntimeError("phase 2 produced no model: set --seq-epochs >= 1")
        weights = dict(self.model.state_dict())
        weights.update({k: v.to(self.device) for k, v in best["weights"].items()})
        self.model.load_state_dict(weights)
        threshold = self.choose_threshold(best["predictions"])
        final = {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "predictions": best["predictions"],
            "threshold": threshold,
            "metrics": self.final_metrics(best["predictions"], threshold["value"]),
            "history": st.history,
            "best_epochs": {"phase1": (st.best1 or {}).get("epoch"), "phase2": best["epoch"]},
            "resumed_from": self.resumed_from,
            "val_frames": {k: (st.best1 or {}).get(k) for k in ("val_loss", "val_auc")},
            "steps": st.steps,
        }
        self._event(type="info", message="training done")
        self._save({"phase": 3, "done": True, "steps": st.steps}, final=final)

    def choose_threshold(self, preds: list[dict]) -> dict:
        """The card's threshold: ``--threshold`` if given, else the one that maximises
        Youden's J on the validation items (a trained LSTM's scores need not centre on
        0.5; ``deepaudit evaluate --calibrate`` can then tune it to a target FPR)."""
        if self.cfg.threshold is not None:
            return {"value": self.cfg.threshold, "rule": "fixed (--threshold)"}
        labels, scores = [r["label"] for r in preds], [r["p_fake"] for r in preds]
        if self.cfg.target_fpr is not None and 0 in labels:
            t = threshold_at_fpr(labels, scores, self.cfg.target_fpr)
            return {"value": min(max(t, 1e-6), 1 - 1e-6),
                    "rule": f"false-positive rate at most {self.cfg.target_fpr:g} on the "
                            "validation items (--target-fpr)"}
        t = threshold_max_youden([r["label"] for r in preds], [r["p_fake"] for r in preds])
        if t is None:
            return {"value": self.model_config.threshold,
                    "rule": "registry default (the validation set has one class)"}
        return {"value": min(max(t, 1e-6), 1 - 1e-6),
                "rule": "max Youden J (TPR - FPR) on the validation items"}

    def final_metrics(self, preds: list[dict], t: float) -> dict:
        """Item-level validation metrics at the card's threshold ``t``: overall, per media
        type and per source (what ``deepaudit evaluate`` would report on the validation
        set; optimistic at a threshold chosen on it)."""
        return slice_metrics(preds, t)


def train_loop_per_worker(config: dict) -> None:
    """Entry point for ``TorchTrainer`` (``config = {"inputs": WorkerInputs}``)."""
    WorkerLoop(config["inputs"]).run()
