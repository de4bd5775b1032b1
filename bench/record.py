"""One JSON line per bench run in ``bench/results/*.jsonl``: the result plus when, at
which commit and on what machine it was measured."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path


def machine() -> dict:
    """Cores, CPU model and memory of this machine."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cores": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem, 1),
            "python": platform.python_version()}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def append_record(path: str | Path, result: dict) -> dict:
    """Append ``result`` with date, commit and machine as one line to ``path``."""
    line = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "machine": machine(), **result}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(line, default=str) + "\n")
    return line
