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
