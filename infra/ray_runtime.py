"""Connecting to Ray: a local instance, the cluster this process runs in, or a Ray Client."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeResources:
    """What one Ray node offers."""

    cpus: float
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.cpus < 0 or self.gpus < 0:
            raise ValueError(f"node resources must be >= 0, got {self}")


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
            # No dashboard, so nothing reads the metrics that every Ray process would
            # otherwise export each few seconds: measured idle, Ray's own processes then
            # use 0.06 instead of 0.08 of a core.
            _system_config={"enable_metrics_collection": False},
            **kwargs,
        )
        if quiet:
            filter_driver_stderr()
        return f"local Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"
    if address == "auto" or address.startswith(("ray://", "127.", "localhost")) or ":" in address:
        ray.init(address=address, **kwargs)
        if quiet:
            filter_driver_stderr()
        return f"Ray cluster at {address}"
    raise ValueError(f"--address must be 'local', 'auto' or ray://HOST:PORT, got {address!r}")


# The one error-level line Ray's C++ core worker prints in the driver on every audit:
# Ray Data hands its actors their constructor arguments through the object store and
# lets them restart, and Ray warns about that combination at level E (ray-project/ray
# issue 53727). Nothing in deepaudit can avoid it; docs/robustness.md, "Driver stderr".
RAY_ACTOR_ARGS_WARNING = re.compile(
    rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the "
    rb"object store and max_restarts > 0")
_stderr_filter: dict = {}


def filter_driver_stderr() -> bool:
    """Drop :data:`RAY_ACTOR_ARGS_WARNING` lines from what native code writes to this
    process's stderr (file descriptor 2); every other byte passes, in order. Python's own
    ``sys.stderr`` then writes to the original descriptor directly, so a terminal stays a
    terminal for the progress bar. Idempotent; does nothing when stderr is not fd 2 (a
    test runner's capture) or ``DEEPAUDIT_RAW_STDERR`` is set. Returns whether it is on."""
    import atexit
    import sys
    import threading

    if _stderr_filter:
        return True
    if os.environ.get("DEEPAUDIT_RAW_STDERR"):
        return False
    try:
        if sys.stderr.fileno() != 2:
            return False
    except (AttributeError, OSError, ValueError):
        return False
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = os.fdopen(os.dup(original), "w", buffering=1, encoding=sys.stderr.encoding,
                           errors="backslashreplace")

    def pump() -> None:
        pending = b""
        while chunk := os.read(read_end, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = b"".join(line + b"\n" for line in lines
                            if not RAY_ACTOR_ARGS_WARNING.search(line))
            if kept:
                os.write(original, kept)
        if pending and not RAY_ACTOR_ARGS_WARNING.search(pending):
            os.write(original, pending)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()

    def restore() -> None:  # at exit: fd 2 is the terminal again; the pump drains
        with contextlib.suppress(OSError):
            os.dup2(original, 2)
        thread.join(timeout=1.0)

    atexit.register(restore)
    _stderr_filter.update(original=original, thread=thread)
    return True


# What configure_ray_data sets on Ray Data's process-wide DataContext (the tests put
# Ray's defaults back after each test).
DATA_CONTEXT_SETTINGS = {
    "max_errored_blocks": -1,
    "enable_progress_bars": False,
    "print_on_execution_start": False,
}


def configure_ray_data() -> None:
    """Ray Data as deepaudit runs it.

    * A task that still fails after its retries (``TASK_RETRIES`` in
      ``pipeline/dataset.py``) drops its block and the run goes on: the stages turn every
      error of their own into a row, so such a task is one whose worker died each time
      (or a stage that raised, a bug). The audit runs its items once more, each alone in
      its worker, and writes those still missing as ``lost`` error rows. Ray Data's
      default would abort the whole run, and every item not yet done would be lost.
    * No progress bars, start-up banner or end-of-run line of Ray Data's own: deepaudit
      draws one bar over the rows it writes and prints its own summary. Ray Data would
      also warn on every run that its bars are off; that is on purpose here, so its
      progress logger only passes errors.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    for name, value in DATA_CONTEXT_SETTINGS.items():
        setattr(ctx, name, value)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # Its "Dataset ... execution finished in N seconds" line: deepaudit prints the run's
    # wall time in its summary; with --verbose (root logger at INFO) it stays.
    verbose = logging.getLogger().getEffectiveLevel() <= logging.INFO
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(
        logging.INFO if verbose else logging.WARNING)


def cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of the connected cluster."""
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))


def nodes() -> list[NodeResources]:
    """The alive nodes of the connected cluster, as plan inputs."""
    import ray

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


def wait_for_resources(min_cpus: float = 0, min_gpus: float = 0, timeout_s: float = 900.0,
                       poll_s: float = 2.0) -> tuple[float, float]:
    """Ask the autoscaler for at least ``min_cpus`` CPUs and ``min_gpus`` GPUs and wait
    until the cluster offers them, so the actor plan is made for the cluster the audit
    will run on, not for the few nodes an idle autoscaling cluster keeps. Returns the
    cluster's (CPUs, GPUs); raises TimeoutError, saying what is missing, after
    ``timeout_s``. On a cluster without an autoscaler the request is a no-op."""
    import ray
    from ray.autoscaler.sdk import request_resources

    if min_cpus <= 0 and min_gpus <= 0:
        return cluster_resources()
    bundles = [{"GPU": 1}] * int(min_gpus)
    request_resources(num_cpus=int(min_cpus) or None, bundles=bundles or None)
    deadline = time.monotonic() + timeout_s
    while True:
        cpus, gpus = cluster_resources()
        if cpus >= min_cpus and gpus >= min_gpus:
            return cpus, gpus
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the cluster offers {cpus:g} CPUs and {gpus:g} GPUs after {timeout_s:.0f} s; "
                f"the audit asked for at least {min_cpus:g} and {min_gpus:g} (--min-cpus, "
                "--min-gpus). Check the autoscaler's max workers and the cloud's quotas.")
        log.info("waiting for the cluster: %g/%g CPUs, %g/%g GPUs", cpus, min_cpus, gpus, min_gpus)
        time.sleep(poll_s)
        ray.nodes()  # keep the GCS connection warm


def release_resource_request() -> None:
    """Drop the standing autoscaler request made by :func:`wait_for_resources`."""
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=[])
    except Exception as exc:  # noqa: BLE001 - best effort at the end of a run
        log.debug("could not clear the resource request: %s", exc)


def check_device_here(device: str) -> None:
    """``--device cuda`` on a machine whose torch sees no CUDA device is a usage error,
    found before any work (a classifier actor would otherwise fail on every item)."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device on this machine; use "
                             "--device auto (a GPU when there is one) or --device cpu")
