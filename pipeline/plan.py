"""How many actors of each stage, and what each reserves, derived from the cluster.

Ray only schedules against what actors *reserve*, so the reservations must add up to
no more than the cluster has: with the default ``num_cpus=1`` per actor, two actor
pools on a 2-core machine wait for each other forever without an error. Reservations
here are fractional on purpose, and the classifier's torch threads are set to match
the cores it really gets.
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


def plan_stages(
    cpus: float,
    gpus: float,
    decode_actors: int | None = None,
    classify_actors: int | None = None,
    batch_size: int | None = None,
    torch_threads: int | None = None,
) -> StagePlan:
    """Defaults from the cluster's resources; explicit counts win.

    * GPUs: one classifier actor per GPU (``num_gpus=1``, 1 CPU to feed it), 16 videos per
      call; every remaining core, less one for the driver, decodes.
    * CPU only: the ResNeXt trunk costs roughly 3-4x decode+detect per video, so a quarter
      of the cores decode (at least one actor) and classifier actors share the rest,
      each running torch on the cores it reserves.
    """
    cpus = max(cpus, 1.0)
    if gpus >= 1:
        n_cls = classify_actors or int(gpus)
        n_dec = decode_actors or max(1, int(cpus) - n_cls - 1)
        dec_cpus = min(1.0, max(cpus - n_cls - 0.5, 0.5) / n_dec)
        return StagePlan(n_dec, dec_cpus, n_cls, 1.0, 1.0, batch_size or 16, 1)
    n_dec = decode_actors or max(1, math.floor(cpus / 4))
    n_cls = classify_actors or max(1, math.floor((cpus - n_dec * 0.5) / 4))
    # Leave a sliver unreserved so Ray Data's own tasks are never starved.
    dec_cpus = min(1.0, 0.5 * cpus / (n_dec + n_cls))
    cls_cpus = max(0.1, (cpus * 0.95 - n_dec * dec_cpus) / n_cls)
    # Decode actors idle part of the time (ffmpeg runs in its own process): round torch up.
    threads = torch_threads or max(1, math.ceil(cls_cpus))
    return StagePlan(n_dec, dec_cpus, n_cls, cls_cpus, 0.0, batch_size or 4, threads)
