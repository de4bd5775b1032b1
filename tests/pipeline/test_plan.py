"""Stage plans derived from cluster resources: reservations must fit, or Ray waits forever."""

from __future__ import annotations

import pytest

from deepaudit.pipeline.plan import (
    CPU_CROP_BATCH,
    MAX_CLASSIFY_CALLS,
    StagePlan,
    classify_share,
    plan_stages,
)


@pytest.mark.parametrize("cpus", [1, 2, 4, 16, 64])
@pytest.mark.parametrize("size", [64, 128, 224])
def test_cpu_plans_fit_the_cluster_and_use_single_threaded_actors(cpus, size):
    plan = plan_stages(cpus, 0, input_size=size)
    assert plan.reserved_cpus() <= cpus * 0.95 + 1e-9
    assert plan.decode_actors >= 1 and plan.classify_actors >= 1
    # One single-threaded worker more than cores, so a core never idles while one waits
    # for input. Classifier workers are threads, up to MAX_CLASSIFY_CALLS per process.
    slots = plan.classify_actors * plan.classify_calls
    workers = max(2, cpus + 1)
    assert workers <= plan.decode_actors + slots < workers + plan.classify_actors
    assert 1 <= plan.classify_calls <= MAX_CLASSIFY_CALLS
    assert (plan.classify_actors - 1) * plan.classify_calls < slots  # no needless process
    assert plan.torch_threads == 1 and plan.classify_gpus == 0
    assert plan.crop_batch == CPU_CROP_BATCH


def test_two_cores_boot_one_classifier_process_with_two_threads():
    # Each classifier process costs a Ray worker, `import torch` and a model load before
    # its first video; on two cores one process runs both classifier threads.
    plan = plan_stages(2, 0, input_size=128)
    assert (plan.decode_actors, plan.classify_actors, plan.classify_calls) == (1, 1, 2)
    assert plan.classify_cpus == pytest.approx(2 * plan.decode_cpus)


def test_cpu_split_follows_the_classifier_cost():
    assert classify_share(224) > classify_share(128) > classify_share(64)
    big, small = plan_stages(16, 0, input_size=224), plan_stages(16, 0, input_size=64)

    def slots(p):
        return p.classify_actors * p.classify_calls

    assert slots(big) > slots(small)
    assert slots(big) > big.decode_actors  # the 224 px trunk dominates on CPU


def test_gpu_plan_is_one_classifier_per_gpu():
    plan = plan_stages(16, 2)
    assert plan.classify_actors == 2 and plan.classify_gpus == 1.0 and plan.batch_size == 16
    assert plan.reserved_cpus() <= 16


def test_explicit_counts_win():
    plan = plan_stages(8, 0, decode_actors=3, classify_actors=2, batch_size=5, torch_threads=4)
    counts = (plan.decode_actors, plan.classify_actors, plan.batch_size, plan.torch_threads)
    assert counts == (3, 2, 5, 4)
    assert plan.classify_calls == 1  # asked-for actor counts are processes of one call each
    assert plan.reserved_cpus() <= 8
    with pytest.raises(ValueError):
        StagePlan(0, 0.5, 1, 0.5, 0.0, 1, 1)
