"""Connecting to Ray: a local instance, the cluster this process runs in, or a Ray Client."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def connect(address: str = "local", num_cpus: int | None = None, quiet: bool = True) -> str:
    """Start or join Ray and return a short description of where we run.

    ``address``: ``local`` starts a private Ray on this machine (loopback only);
    ``auto`` joins the cluster this process was started in (``ray start`` / Ray Jobs);
    ``ray://HOST:PORT`` connects through Ray Client. An already initialised Ray
    (a test fixture, a Ray Job's driver) is reused as it is.
    """
    import ray

    if ray.is_initialized():
        return "existing Ray session"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs = {"log_to_driver": not quiet, "logging_level": logging.WARNING}
    if address == "local":
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            **kwargs,
        )
        return f"local Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"
    if address == "auto" or address.startswith(("ray://", "127.", "localhost")) or ":" in address:
        ray.init(address=address, **kwargs)
        return f"Ray cluster at {address}"
    raise ValueError(f"--address must be 'local', 'auto' or ray://HOST:PORT, got {address!r}")


def cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of the connected cluster."""
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))


def nodes() -> list:
    """The alive nodes of the connected cluster, as plan inputs."""
    import ray

    from deepaudit.pipeline.plan import NodeResources

    return [
        NodeResources(cpus=float(n["Resources"].get("CPU", 0.0)),
                      gpus=float(n["Resources"].get("GPU", 0.0)))
        for n in ray.nodes()
        if n.get("Alive")
    ]


def gpu_memory_gb(timeout_s: float = 120.0) -> float | None:
    """Memory of one of the cluster's GPUs, probed by a tiny task on a GPU node (None if
    the probe fails or no GPU node answers in time: the plan then stays conservative)."""
    import ray

    @ray.remote(num_gpus=1, num_cpus=0)
    def probe() -> float | None:
        import torch

        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_properties(0).total_memory / 2**30

    ref = probe.remote()
    try:
        return ray.get(ref, timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - a failed probe only costs batch size
        log.warning("GPU memory probe failed (%s); using the default batch sizes", exc)
        ray.cancel(ref, force=True)
        return None
