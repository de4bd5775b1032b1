"""Stage plans derived from cluster resources: reservations must fit, or Ray waits forever."""

from __future__ import annotations

import pytest

from deepaudit.pipeline.plan import StagePlan, classify_share, plan_stages


@pytest.mark.parametrize("cpus", [1, 2, 4, 16, 64])
@pytest.mark.parametrize("size", [64, 128, 224])
def test_cpu_plans_fit_the_cluster_and_use_single_threaded_actors(cpus, size):
    plan = plan_stages(cpus, 0, input_size=size)
    assert plan.reserved_cpus() <= cpus * 0.95 + 1e-9
    assert plan.decode_actors >= 1 and plan.classify_actors >= 1
    # One actor more than cores, so a core never idles while an actor waits for input.
    assert plan.decode_actors + plan.classify_actors == max(2, cpus + 1)
    assert plan.torch_threads == 1 and plan.classify_gpus == 0


def test_cpu_split_follows_the_classifier_cost():
    assert classify_share(224) > classify_share(128) > classify_share(64)
    big, small = plan_stages(16, 0, input_size=224), plan_stages(16, 0, input_size=64)
    assert big.classify_actors > small.classify_actors
    assert big.classify_actors > big.decode_actors  # the 224 px trunk dominates on CPU


def test_gpu_plan_is_one_classifier_per_gpu():
    plan = plan_stages(16, 2)
    assert plan.classify_actors == 2 and plan.classify_gpus == 1.0 and plan.batch_size == 16
    assert plan.reserved_cpus() <= 16


def test_explicit_counts_win():
    plan = plan_stages(8, 0, decode_actors=3, classify_actors=2, batch_size=5, torch_threads=4)
    assert (plan.decode_actors, plan.classify_actors, plan.batch_size, plan.torch_threads) == (3, 2, 5, 4)
    assert plan.reserved_cpus() <= 8
    with pytest.raises(ValueError):
        StagePlan(0, 0.5, 1, 0.5, 0.0, 1, 1)
