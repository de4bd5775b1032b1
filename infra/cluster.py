"""Ray Jobs helpers: submit a deepaudit command to a cluster, follow it, ask about it.

A job runs ``deepaudit <args>`` on the cluster's head node; the driver joins the
cluster with ``--address auto`` and Ray Data spreads the actors over its nodes. The
runtime environment is either the deepaudit installed on the cluster (the image or
``cluster.yaml``'s setup commands), or, with ``ship_code``, this machine's deepaudit
source, uploaded as a ``py_modules`` package that shadows the installed one.

Environment variables reach the job only when named (``env_names``): their values are
read here and never printed. Ray keeps a job's runtime_env in its job table, visible on
the dashboard, so on a real cluster prefer instance roles / IRSA over passing keys.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from deepaudit.infra.storage import redact

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
SUBPACKAGES = ("pipeline", "jobs", "models", "infra", "training", "serve")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def default_address() -> str:
    """The dashboard address: $RAY_API_SERVER_ADDRESS, an http(s) $RAY_ADDRESS, or local."""
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(name, "")
        if value.startswith(("http://", "https://")):
            return value
    return DEFAULT_DASHBOARD


@dataclass(frozen=True)
class JobSpec:
    """What to run on the cluster, and with what."""

    args: tuple[str, ...]  # deepaudit's own arguments: ("audit", "s3://...", "-o", ...)
    ship_code: bool = False  # upload this machine's deepaudit source with the job
    working_dir: str | None = None  # uploaded and made the job's current directory
    env_names: tuple[str, ...] = ()  # copied from this environment into the job's
    submission_id: str | None = None
    executable: str = "deepaudit"
    extra_env: dict[str, str] = field(default_factory=dict)  # non-secret settings

    def __post_init__(self) -> None:
        if not self.args:
            raise ValueError("nothing to submit: give the deepaudit command after '--', "
                             "e.g. deepaudit submit -- audit s3://bucket/archive/ -o s3://...")
        if self.args[0] in ("submit", "status", "logs"):
            raise ValueError(f"'{self.args[0]}' runs here, not on the cluster")
        for name in self.env_names:
            if not name or "=" in name:
                raise ValueError(f"--env takes a variable NAME (its value is read from this "
                                 f"environment), got {name!r}")
            if name not in os.environ:
                raise ValueError(f"--env {name}: the variable is not set here")
        if self.working_dir and not Path(self.working_dir).is_dir():
            raise ValueError(f"--working-dir {self.working_dir} is not a folder")
        if self.working_dir and (Path(self.working_dir) / "ray").is_dir():
            raise ValueError(f"--working-dir {self.working_dir} holds a folder named 'ray', "
                             "which would shadow the ray package in the job")


def entrypoint(spec: JobSpec) -> str:
    """The shell command the job runs. ``audit`` joins the cluster unless told otherwise."""
    args = list(spec.args)
    if args[0] == "audit" and not any(a == "--address" or a.startswith("--address=")
                                      for a in args):
        args += ["--address", "auto"]
    return shlex.join([spec.executable, *args])


def stage_package(dest: Path) -> Path:
    """Copy the running deepaudit's source into ``dest/deepaudit`` (a py_modules entry)."""
    import importlib

    root = dest / "deepaudit"
    for name in SUBPACKAGES:
        src = Path(importlib.import_module(f"deepaudit.{name}").__file__).parent
        shutil.copytree(src, root / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    return root


def runtime_env(spec: JobSpec, staging: Path | None = None) -> dict:
    """The job's runtime_env. Holds secret values when env_names names secrets: never
    print or log it."""
    env: dict = {"env_vars": {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
                              **spec.extra_env,
                              **{name: os.environ[name] for name in spec.env_names}}}
    if spec.working_dir:
        env["working_dir"] = str(Path(spec.working_dir).absolute())
    if spec.ship_code:
        if staging is None:
            raise ValueError("ship_code needs a staging folder")
        env["py_modules"] = [str(stage_package(staging))]
    return env


def client(address: str | None = None):
    """A JobSubmissionClient for the dashboard at ``address``; raises ConnectionError
    with a message that says what to check."""
    from ray.job_submission import JobSubmissionClient

    address = address or default_address()
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, or ValueError for a malformed address
        raise ConnectionError(
            f"cannot reach the Ray dashboard at {address} ({type(exc).__name__}: "
            f"{redact(str(exc))[:200]}). Is the cluster up, and is --address the head's "
            "dashboard (http://HEAD:8265)?") from None


def submit(spec: JobSpec, address: str | None = None) -> str:
    """Submit ``spec`` and return the job's submission id."""
    c = client(address)
    with tempfile.TemporaryDirectory(prefix="deepaudit-job-") as tmp:
        return c.submit_job(
            entrypoint=entrypoint(spec),
            runtime_env=runtime_env(spec, Path(tmp) if spec.ship_code else None),
            submission_id=spec.submission_id,
            metadata={"submitted_by": "deepaudit"},
        )


def job_info(job_id: str, address: str | None = None) -> dict:
    """Status and times of a job: no runtime_env (it may hold secrets)."""
    info = client(address).get_job_info(job_id)
    return {
        "job_id": job_id,
        "status": str(info.status),
        "message": redact(info.message or ""),
        "entrypoint": redact(info.entrypoint or ""),
        "start_time": _iso(info.start_time),
        "end_time": _iso(info.end_time),
        "driver_exit_code": getattr(info, "driver_exit_code", None),
    }


def _iso(ms: int | None) -> str | None:
    if not ms:
        return None
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat()


def job_logs(job_id: str, address: str | None = None) -> str:
    return redact(client(address).get_job_logs(job_id))


def follow(job_id: str, write: Callable[[str], None], address: str | None = None,
           poll_s: float = 1.0) -> str:
    """Stream a job's logs to ``write`` until it ends; return its final status."""
    c = client(address)

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            write(redact(chunk))

    try:
        asyncio.run(tail())
    except RuntimeError:  # the socket closed early: the status poll below still settles it
        pass
    while (status := str(c.get_job_status(job_id))) not in TERMINAL:
        time.sleep(poll_s)
    return status


def wait(job_id: str, timeout_s: float, address: str | None = None, poll_s: float = 1.0) -> str:
    """Poll until the job ends or ``timeout_s`` passes; return the last status."""
    c = client(address)
    deadline = time.monotonic() + timeout_s
    while (status := str(c.get_job_status(job_id))) not in TERMINAL:
        if time.monotonic() > deadline:
            return status
        time.sleep(poll_s)
    return status
