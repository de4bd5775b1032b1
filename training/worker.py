"""The per-worker training loop that Ray Train's TorchTrainer runs (one copy per worker).

Two phases, both data-parallel (DDP over gloo on CPU, NCCL on GPU): frames
(:mod:`.phase1`: trunk and frame head on single crops), then sequences (:mod:`.phase2`:
the LSTM and video head on frozen frame features). What they share is :mod:`.loop`.

Each epoch ends with ``ray.train.report`` and a checkpoint (model, optimizer, scheduler,
early-stopping state, history), so a run resumes where it stopped. The items are
sharded over workers by sequence (a video, or images cut from one video), each worker
loads only its shard's crops, and every worker runs the same number of steps.
"""

from __future__ import annotations

from deepaudit.models.metrics import slice_metrics, threshold_at_fpr, threshold_max_youden
from deepaudit.training.loop import FINAL_FILE, WorkerInputs
from deepaudit.training.phase1 import FrameLoop
from deepaudit.training.phase2 import SequenceLoop

__all__ = ["FINAL_FILE", "WorkerInputs", "WorkerLoop", "train_loop_per_worker"]


class WorkerLoop(FrameLoop, SequenceLoop):
    """Phase 1, phase 2, then the final model, threshold and metrics."""

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
