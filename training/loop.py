"""What the two training phases share: the worker's inputs and saved state, and
:class:`LoopBase`, which builds the model, resumes from a checkpoint, loads this worker's
shard of the crops and holds the plumbing (events, collectives, checkpoints, the
optimiser step, early stopping). The phases are :mod:`.phase1` (frames) and
:mod:`.phase2` (sequences); :mod:`.worker` runs them in turn.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import torch
from torch import Tensor

from deepaudit.infra.storage import StorageConfig
from deepaudit.models.checkpoint import ModelHandle
from deepaudit.models.losses import BinaryLoss, LossConfig
from deepaudit.models.preprocess import CropNormaliser
from deepaudit.models.pretrained import is_trunk_init, load_trunk
from deepaudit.models.registry import ModelConfig, create_model
from deepaudit.training.crop_cache import load_crops

STATE_FILE = "state.pt"
FINAL_FILE = "final.pt"


def stable_hash(text: str) -> int:
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



class LoopBase:
    """One training worker: its model, state, shard of the items and their crops."""

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

        items = inputs.items.to_pylist()
        self.train_rows = [r for r in items if r["split"] == "train" and self._mine(r)]
        self.val_rows = [r for r in items if r["split"] == "val" and self._mine(r)]
        keys = [r["item_key"] for r in self.train_rows + self.val_rows]
        self.crops = {k: v[0] for k, v in load_crops(self.cache_dir, keys, self.storage).items()}

    # ------------------------------------------------------------------ plumbing

    def _mine(self, row: dict) -> bool:
        unit = row.get("sequence") or row["media_id"]
        return stable_hash(unit) % self.world == self.rank

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

    def _cpu_state(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
