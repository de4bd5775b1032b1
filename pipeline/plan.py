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


@dataclass(frozen=True)
class StagePlan:
    decode_actors: int
    decode_cpus: float  # reserved per decode actor
    classify_actors: int
    classify_cpus: float  # reserved per classifier actor
    classify_gpus: float  # 1 per actor on GPU clusters, else 0
    batch_size: int  # videos per classifier call (their crops share forward passes)
    torch_threads: int  # CPU classifier only

    def __post_init__(self) -> None:
        if self.decode_actors < 1 or self.classify_actors < 1:
            raise ValueError("need at least one decode actor and one classifier actor")
        if self.decode_cpus <= 0 or self.classify_cpus <= 0:
            raise ValueError("actor CPU reservations must be > 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def reserved_cpus(self) -> float:
        return self.decode_actors * self.decode_cpus + self.classify_actors * self.classify_cpus


# Single-threaded CPU cost estimates, measured on a 2-core AMD EPYC (bench/audit_throughput.py):
# decoding a frame of a 640x360 H.264 clip plus RetinaFace and the crop cost ~62 ms; the
# ResNeXt50_32x4d trunk costs ~206 ms per 224 px crop and scales with the crop's area.
DECODE_MS_PER_FRAME = 62.0
CLASSIFY_MS_PER_CROP_224 = 206.0


def classify_share(input_size: int) -> float:
    """Estimated fraction of a video's CPU time spent in the classifier on CPU."""
    cls = CLASSIFY_MS_PER_CROP_224 * (input_size / 224.0) ** 2
    return cls / (cls + DECODE_MS_PER_FRAME)


def plan_stages(
    cpus: float,
    gpus: float,
    decode_actors: int | None = None,
    classify_actors: int | None = None,
    batch_size: int | None = None,
    torch_threads: int | None = None,
    input_size: int = 224,
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
    """
    cpus = max(cpus, 1.0)
    if gpus >= 1:
        n_cls = classify_actors or int(gpus)
        n_dec = decode_actors or max(1, int(cpus) - n_cls - 1)
        dec_cpus = min(1.0, max(cpus - n_cls - 0.5, 0.5) / n_dec)
        return StagePlan(n_dec, dec_cpus, n_cls, 1.0, 1.0, batch_size or 16, 1)
    total = max(2, math.floor(cpus) + 1)
    share = classify_share(input_size)
    if classify_actors is None and decode_actors is None:
        n_cls = min(total - 1, max(1, round(total * share)))
        n_dec = total - n_cls
    else:
        n_cls = classify_actors or max(1, total - (decode_actors or 1))
        n_dec = decode_actors or max(1, total - n_cls)
    # Reserve a little under the cluster's CPUs so Ray Data's own tasks are never starved.
    per_actor = cpus * 0.95 / (n_dec + n_cls)
    threads = torch_threads or 1
    # Two videos per classifier call: their crops share forward passes, and the first
    # call does not wait long for the decoders to fill a bigger batch.
    return StagePlan(n_dec, per_actor, n_cls, per_actor, 0.0, batch_size or 2, threads)
