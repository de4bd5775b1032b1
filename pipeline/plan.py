"""How many actors of each stage, and what each reserves, derived from the cluster.

Ray only schedules against what actors *reserve*, so the reservations must add up to
no more than the cluster has: with the default ``num_cpus=1`` per actor, two actor
pools on a 2-core machine wait for each other forever without an error. Reservations
here are fractional on purpose. On CPU-only clusters the classifier runs one torch
thread per actor and scales by actor count instead (see :func:`plan_stages`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from deepaudit.infra.ray_runtime import NodeResources


@dataclass(frozen=True)
class StagePlan:
    decode_actors: int
    decode_cpus: float  # reserved per decode actor
    classify_actors: int
    classify_cpus: float  # reserved per classifier actor
    classify_gpus: float  # 1 per actor on GPU clusters, else 0
    batch_size: int  # videos per classifier call (their crops share forward passes)
    torch_threads: int  # CPU classifier only
    crop_batch: int = 64  # crops per forward pass of the CNN trunk
    # Items each decode actor works on at once (threads in the actor): while one waits on
    # its ffmpeg subprocess, another runs RetinaFace. Both release the GIL.
    decode_calls: int = 2
    # Batches each classifier actor scores at once (threads in the actor). On CPU one
    # process with two single-threaded inference threads does the work of two actors but
    # boots once: one Ray worker, one `import torch`, one copy of the weights.
    classify_calls: int = 1

    def __post_init__(self) -> None:
        if self.decode_actors < 1 or self.classify_actors < 1:
            raise ValueError("need at least one decode actor and one classifier actor")
        if self.decode_cpus <= 0 or self.classify_cpus <= 0:
            raise ValueError("actor CPU reservations must be > 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.crop_batch < 1:
            raise ValueError(f"crop_batch must be >= 1, got {self.crop_batch}")
        if self.decode_calls < 1:
            raise ValueError(f"decode_calls must be >= 1, got {self.decode_calls}")
        if self.classify_calls < 1:
            raise ValueError(f"classify_calls must be >= 1, got {self.classify_calls}")

    def reserved_cpus(self) -> float:
        return self.decode_actors * self.decode_cpus + self.classify_actors * self.classify_cpus


# Single-threaded CPU cost per frame of decode + RetinaFace + crop; docs/design.md, "The
# actor plan". The classifier's cost per frame comes from its model card
# (``cost.cpu_ms_per_frame``, written by bench/classifier_cost.py); cards without one
# fall back to the old ResNeXt50 estimate per 224 px crop, scaled by the crop's area.
DECODE_MS_PER_FRAME = 62.0
CLASSIFY_MS_PER_CROP_224 = 206.0


# Crops per forward pass on CPU: bigger passes amortise nothing on one thread and spill
# out of the core's cache (docs/design.md, "The actor plan").
CPU_CROP_BATCH = 16


def classify_share(input_size: int, classify_ms_per_frame: float | None = None) -> float:
    """Estimated fraction of a video's CPU time spent in the classifier on CPU."""
    cls = classify_ms_per_frame or CLASSIFY_MS_PER_CROP_224 * (input_size / 224.0) ** 2
    return cls / (cls + DECODE_MS_PER_FRAME)


# Inference threads per CPU classifier process at most: torch releases the GIL inside
# every op, and the Python between ops is a small share of a batch's time.
MAX_CLASSIFY_CALLS = 4


def _classifier_processes(slots: int) -> tuple[int, int]:
    """(actors, calls per actor) for ``slots`` single-threaded CPU classifiers."""
    actors = -(-slots // MAX_CLASSIFY_CALLS)
    return actors, -(-slots // actors)


def plan_stages(
    cpus: float,
    gpus: float,
    decode_actors: int | None = None,
    classify_actors: int | None = None,
    batch_size: int | None = None,
    torch_threads: int | None = None,
    input_size: int = 224,
    classify_ms_per_frame: float | None = None,
) -> StagePlan:
    """Defaults from the cluster's resources; explicit counts win.

    * GPUs: one classifier actor per GPU (``num_gpus=1``, 1 CPU to feed it), 16 videos per
      call; every remaining core, less one for the driver, decodes.
    * CPU only: one actor more than there are cores, split between the stages in
      proportion to their estimated cost (:func:`classify_share`), each classifier running
      torch on ONE thread. Single-threaded actors keep every core busy while another
      process (ffmpeg, a decode actor) runs beside them; torch's intra-op threads wait at
      barriers whenever one of them is descheduled, which on a small machine costs more
      than it gains. The extra actor covers the moments an actor waits for input.
      Classifier slots share processes (up to :data:`MAX_CLASSIFY_CALLS` inference threads
      each) unless ``classify_actors`` is given: each process costs a Ray worker, an
      ``import torch`` and a model load (~5 CPU-s here) before its first video.
    """
    cpus = max(cpus, 1.0)
    if gpus >= 1:
        n_cls = classify_actors or int(gpus)
        n_dec = decode_actors or max(1, int(cpus) - n_cls - 1)
        dec_cpus = min(1.0, max(cpus - n_cls - 0.5, 0.5) / n_dec)
        return StagePlan(n_dec, dec_cpus, n_cls, 1.0, 1.0, batch_size or 16, 1)
    total = max(2, math.floor(cpus) + 1)
    share = classify_share(input_size, classify_ms_per_frame)
    if classify_actors is None and decode_actors is None:
        n_cls = min(total - 1, max(1, round(total * share)))
        n_dec = total - n_cls
    else:
        n_cls = classify_actors or max(1, total - (decode_actors or 1))
        n_dec = decode_actors or max(1, total - n_cls)
    actors, calls = (n_cls, 1) if classify_actors else _classifier_processes(n_cls)
    # Reserve a little under the cluster's CPUs so Ray Data's own tasks are never starved.
    per_slot = cpus * 0.95 / (n_dec + actors * calls)
    threads = torch_threads or 1
    # Two videos per classifier call: their crops share forward passes, and the first
    # call does not wait long for the decoders to fill a bigger batch.
    return StagePlan(n_dec, per_slot, actors, per_slot * calls, 0.0, batch_size or 2, threads,
                     crop_batch=CPU_CROP_BATCH, classify_calls=calls)


# Device memory one 224 px crop may hold in flight through ResNeXt50_32x4d under fp16
# autocast: the largest activations plus cuDNN workspace, rounded up generously. An
# estimate (no GPU was available to measure it); --batch-size/--crop-batch override it.
MB_PER_CROP_FP16 = 24


def gpu_batch_sizes(gpu_memory_gb: float | None) -> tuple[int, int]:
    """(videos per classifier call, crops per forward pass) for a GPU with this much
    memory, using half of it. Unknown memory: the conservative (16, 64)."""
    if not gpu_memory_gb or gpu_memory_gb <= 0:
        return 16, 64
    crops = int(gpu_memory_gb * 1024 * 0.5 / MB_PER_CROP_FP16)
    crop_batch = max(32, min(1024, crops // 32 * 32))
    return max(16, min(128, crop_batch // 8)), crop_batch


def plan_for_cluster(
    nodes: list[NodeResources],
    decode_actors: int | None = None,
    classify_actors: int | None = None,
    batch_size: int | None = None,
    torch_threads: int | None = None,
    gpu_memory_gb: float | None = None,
    input_size: int = 224,
    classify_ms_per_frame: float | None = None,
) -> StagePlan:
    """The plan for a cluster of ``nodes``: every actor must fit on one node.

    * One node: :func:`plan_stages` on its resources (GPU batch sizes from its memory).
    * GPU nodes: one classifier actor per GPU (``num_gpus=1``, up to one CPU to feed it),
      a batch size that fits the smallest GPU (``gpu_memory_gb``); decode actors take
      every other core of every node, one core each, less one for the driver. Decode
      scales with the CPU cores, classification with the GPUs.
    * CPU nodes only: each node gets the single-node mix of decode and classifier actors;
      a pool has one reservation, so each pool reserves the smallest node's share.
      Ray Data spreads actor pools over the nodes.
    """
    nodes = [n for n in nodes if n.cpus > 0 or n.gpus > 0]
    total_cpus = sum(n.cpus for n in nodes)
    total_gpus = sum(math.floor(n.gpus) for n in nodes)
    batch, crop_batch = gpu_batch_sizes(gpu_memory_gb)
    if len(nodes) <= 1:
        plan = plan_stages(total_cpus, total_gpus, decode_actors, classify_actors, batch_size,
                           torch_threads, input_size, classify_ms_per_frame)
        if total_gpus >= 1:
            from dataclasses import replace

            plan = replace(plan, batch_size=batch_size or batch, crop_batch=crop_batch)
        return plan
    if total_gpus >= 1:
        gpu_nodes = [n for n in nodes if n.gpus >= 1]
        cls_cpus = max(0.1, min(1.0, min(n.cpus / math.floor(n.gpus) for n in gpu_nodes) / 2))
        free = [max(0.0, n.cpus - cls_cpus * math.floor(n.gpus)) for n in nodes]
        dec_cpus = 1.0 if max(free) >= 1.0 else 0.5
        n_dec = decode_actors or max(1, sum(math.floor(f / dec_cpus) for f in free) - 1)
        return StagePlan(n_dec, dec_cpus, classify_actors or total_gpus, cls_cpus, 1.0,
                         batch_size or batch, 1, crop_batch)
    subs = [plan_stages(n.cpus, 0.0, input_size=input_size,
                        classify_ms_per_frame=classify_ms_per_frame) for n in nodes]
    dec_cpus = min(p.decode_cpus for p in subs)
    # One pool, one reservation and one thread count: the smallest node's per-thread share.
    calls = 1 if classify_actors else min(p.classify_calls for p in subs)
    cls_cpus = min(p.classify_cpus / p.classify_calls for p in subs) * calls
    threads = torch_threads or 1
    n_cls = classify_actors or sum(-(-p.classify_actors * p.classify_calls // calls) for p in subs)
    return StagePlan(
        decode_actors or sum(p.decode_actors for p in subs), dec_cpus,
        n_cls, cls_cpus, 0.0, batch_size or 2, threads, CPU_CROP_BATCH, classify_calls=calls,
    )
