"""All Ray Data wiring of the audit: the dataset over the manifest, its two actor pools,
their retry caps. The stages themselves (:mod:`deepaudit.pipeline.stages`) import no Ray.

This module takes the stages' own configs (:class:`StageConfigs`), never a job's config,
so ``pipeline/`` does not depend on ``jobs/``. docs/design.md explains the retry caps and
the block sizes.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import pyarrow as pa

from deepaudit.infra.storage import StorageConfig
from deepaudit.models.checkpoint import ModelHandle
from deepaudit.models.face_detector import FaceDetectorConfig
from deepaudit.pipeline.evidence import EvidenceConfig
from deepaudit.pipeline.manifest import ROW_INDEX
from deepaudit.pipeline.media import DecodeConfig
from deepaudit.pipeline.plan import StagePlan
from deepaudit.pipeline.stages import ClassifyConfig, ClassifyStage, CropConfig, DecodeCropStage

# Attempts after the first at a task whose actor died (a node lost, the out-of-memory
# killer, a crash in native code). Ray Data's default is to retry forever, on an actor it
# restarts forever: one input that kills its worker every time then stalls the audit for
# good. After these retries the task's rows come back missing; the audit runs them once
# more, each alone in its worker (``isolate``), and writes what is still missing as error
# rows (``lost: ...``); see :func:`deepaudit.infra.ray_runtime.configure_ray_data`.
TASK_RETRIES = 3
# Attempts after the first in that isolated pass: one, for a worker lost to something
# else (a node going away); an input that kills its worker alone needs no more proof.
ISOLATED_RETRIES = 1


@contextlib.contextmanager
def retry_args_accepted():
    """``max_task_retries`` reaches Ray Data's actors only through ``map_batches``'
    ``**ray_remote_args`` (it has no named parameter), which Ray 2.60 deprecates for
    removal in 2.64 with a warning on every run; pyproject.toml pins ray below 2.64, so the
    warning says nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated")
        yield


def actor_pool(size: int, calls: int, inputs: int, isolate: bool = False):
    """The actor pool strategy of a stage: ``size`` actors of ``calls`` concurrent calls
    (threads) each, but no more actors than ``inputs`` (blocks or rows it will get: an
    actor with nothing to do still boots a worker process). ``isolate``: one call per
    actor and nothing queued behind it, so a task whose worker dies takes no other item
    with it (Ray Data otherwise queues up to twice ``calls`` tasks on each actor, and they
    all fail when it dies)."""
    from ray.data import ActorPoolStrategy

    size = max(1, min(size, inputs))

    if isolate:
        return ActorPoolStrategy(size=size, max_concurrent_calls_per_actor=1,
                                 max_tasks_in_flight_per_actor=1)
    return ActorPoolStrategy(size=size, max_concurrent_calls_per_actor=calls,
                             enable_true_multi_threading=calls > 1)


def block_spans(rows: int, per_block: int, actors: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of each input block. A block's rows come back only when its
    whole block is decoded, so the first rows of a run waited for ``per_block`` (up to 32)
    items: the first blocks ramp up instead (``actors`` blocks each of 1, 2, 4, ... rows),
    and the first rows follow the first decoded item (docs/robustness.md, "First rows")."""
    spans, start, size = [], 0, 1
    while start < rows:
        if size >= per_block:
            n = per_block
        else:
            n = size
            if len(spans) % max(1, actors) == max(1, actors) - 1:
                size *= 2
        n = min(n, rows - start)
        spans.append((start, n))
        start += n
    return spans


def decode_crop_dataset(
    keys: pa.Table,
    decode: DecodeConfig,
    detector: FaceDetectorConfig,
    crop: CropConfig,
    storage: StorageConfig,
    actors: int,
    cpus_per_actor: float,
    calls_per_actor: int = 2,
    isolate: bool = False,
):
    """A Ray Dataset of :class:`DecodeCropStage` outputs over ``keys`` (``manifest_row``,
    ``media_id``, ``uri``) on an actor pool: the audit's first stage, also used by the
    training crop cache, so both crop faces exactly alike. ``isolate``: one item per task
    and per actor at a time (see :func:`actor_pool`), for items whose tasks failed."""
    import ray.data

    # Small blocks spread the media over the actors; ~8 blocks per actor balances tails.
    # from_blocks reads the slices' metadata in the driver, with no remote task (see
    # docs/design.md, "Building the dataset").
    per_block = 1 if isolate else max(1, min(32, -(-keys.num_rows // (actors * 8))))
    blocks = [keys.slice(i, n) for i, n in block_spans(keys.num_rows, per_block, actors)]
    with retry_args_accepted():
        return ray.data.from_blocks(blocks).map_batches(
            DecodeCropStage,
            fn_constructor_kwargs={"decode": decode, "detector": detector, "crop": crop,
                                   "storage": storage},
            batch_size=1,
            batch_format="pyarrow",
            compute=actor_pool(actors, calls_per_actor, len(blocks), isolate),
            num_cpus=cpus_per_actor,
            max_task_retries=ISOLATED_RETRIES if isolate else TASK_RETRIES,
            udf_modifying_row_count=False,
        )


@dataclass(frozen=True)
class StageConfigs:
    """What the two stages are built from: each stage's own config, the model, storage."""

    decode: DecodeConfig
    detector: FaceDetectorConfig
    crop: CropConfig
    classify: ClassifyConfig
    handle: ModelHandle
    storage: StorageConfig
    evidence: EvidenceConfig | None = None


def stage_configs(handle: ModelHandle, *, max_side: int = 1920,
                  detector: FaceDetectorConfig | None = None, device: str = "auto",
                  crop_batch: int = 64, threads: int = 0, perturb: str | None = None,
                  storage: StorageConfig | None = None,
                  evidence: EvidenceConfig | None = None, gpu: bool = False) -> StageConfigs:
    """The two stages' configs for ``handle`` (``audit`` and ``check`` both build their
    stages from these). ``crop_batch`` and ``threads`` come from the actor plan when there
    is one. Frames per video and the crop size are the handle's (its card's, or the
    command line's through :meth:`ModelHandle.with_overrides`); ``gpu``: the classifier
    runs on a GPU, so the frames decoded are those its branches read there."""
    frames = handle.config.frames_for("gpu" if gpu else "cpu")
    return StageConfigs(
        decode=DecodeConfig(frames=frames, max_side=max_side),
        detector=detector or FaceDetectorConfig(),
        crop=CropConfig(size=handle.config.input_size),
        classify=ClassifyConfig(device=device, crop_batch=crop_batch, threads=threads,
                                perturb=perturb),
        handle=handle, storage=storage or StorageConfig(), evidence=evidence)


def audit_dataset(manifest: pa.Table, plan: StagePlan, stages: StageConfigs,
                  isolate: bool = False):
    """The audit pipeline: manifest rows → :class:`DecodeCropStage` → :class:`ClassifyStage`.

    ``isolate``: every item alone in its task and its actor, in both stages (for items
    whose tasks failed for good in the normal run)."""
    keys = manifest.select([ROW_INDEX, "media_id", "uri"])
    ds = decode_crop_dataset(keys, stages.decode, stages.detector, stages.crop, stages.storage,
                             plan.decode_actors, plan.decode_cpus, plan.decode_calls,
                             isolate=isolate)
    with retry_args_accepted():
        return ds.map_batches(
            ClassifyStage,
            fn_constructor_kwargs={"handle": stages.handle, "config": stages.classify,
                                   "evidence": stages.evidence},
            batch_size=1 if isolate else plan.batch_size,
            batch_format="pyarrow",
            compute=actor_pool(plan.classify_actors, plan.classify_calls, manifest.num_rows,
                               isolate),
            num_cpus=plan.classify_cpus,
            num_gpus=plan.classify_gpus or None,
            max_task_retries=ISOLATED_RETRIES if isolate else TASK_RETRIES,
            udf_modifying_row_count=False,
        )


# Why a row came back from no stage, when the pipeline itself ran to the end: every
# stage turns its own failures into rows, so what is left is a task that failed for good,
# as when the worker running it dies on every attempt.
_DIED = f"its task failed for good: the worker processing it died on each of {1 + TASK_RETRIES} "
_CAUSE = ("(a crash in native code, or the out-of-memory killer), or the stage raised; the "
          "log says which")
LOST_REASON = (f"{_DIED}attempts {_CAUSE}. Items processed beside it can be lost with it; "
               "a re-run retries them")
# The same, after the item's own run alone in its worker (the audit's ``retry_lost``).
LOST_ALONE_REASON = (f"{_DIED}attempts beside other items and on each of "
                     f"{1 + ISOLATED_RETRIES} attempts alone {_CAUSE}")
