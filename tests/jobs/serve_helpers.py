"""Helpers of the ``deepaudit serve`` tests: verdict Parquet written directly with the real
schema, and a real uvicorn server on a free loopback port."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deepaudit.pipeline.schema import VERDICT_SCHEMA

SCRIPT_ID = "<script>window.__pwned=1</script>"
IMG_ID = '"><img src=x onerror="window.__pwned=2">'
T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
QUALITY = {"ood_auc": 0.71, "ood_data": "held-out sources", "bar": 0.8,
           "caveat": "this model's ROC AUC on media from sources it never trained on is 0.71 "
                     "(below 0.80): a verdict is a lead for human review, not a finding"}


def verdict_rows(run_id: str, n: int, seed: int, t0: datetime = T0,
                 prefix: str = "/archive") -> list[dict]:
    rng = np.random.default_rng(seed)
    p = rng.random(n)
    rows = []
    for i in range(n):
        status = "ok" if i % 6 not in (4, 5) else ("no_face" if i % 6 == 4 else "error")
        ok = status == "ok"
        rows.append(dict(
            media_id=f"cam{i % 3}/clip-{i:05d}.mp4", uri=f"{prefix}/cam{i % 3}/clip-{i:05d}.mp4",
            media_type="video", status=status,
            error=None if ok else ("no_face: no face found" if status == "no_face"
                                   else "not_media: bad header"),
            verdict=("fake" if p[i] >= 0.5 else "real") if ok else None,
            p_fake=float(p[i]) if ok else None,
            margin=float(abs(p[i] - 0.5) * 2) if ok else None, threshold=0.5,
            n_frames_sampled=4, n_frames_with_face=4 if ok else 0,
            frame_indices=[0, 10, 20, 30] if ok else [],
            frame_p_fake=[float(x) for x in rng.random(4)] if ok else [],
            face_boxes=[], model="m@abc", run_id=run_id,
            audited_at=t0 + timedelta(seconds=i), manifest_row=i,
            label=("fake" if p[i] > 0.4 else "real") if ok else None))
    return rows


def write_run(out: Path, run_id: str, rows: list[dict], t0: datetime = T0,
              fs=None) -> str:
    """OUT/runs/<run_id>/verdicts-00000.parquet and _summary.json (local, or through the
    fsspec ``fs`` for s3://)."""
    schema = VERDICT_SCHEMA.append(pa.field("label", pa.string()))
    table = pa.Table.from_pylist(rows, schema=schema)
    summary = {"run_id": run_id, "state": "completed", "model": "m@abc",
               "model_trained": True, "threshold": 0.5, "started_at": t0.isoformat(),
               "finished_at": (t0 + timedelta(minutes=5)).isoformat(), "rows_in": len(rows),
               "rows_out": len(rows), "model_quality": QUALITY}
    run_dir = f"{out}/runs/{run_id}"
    if fs is None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, f"{run_dir}/verdicts-00000.parquet")
        Path(f"{run_dir}/_summary.json").write_text(json.dumps(summary))
    else:
        with fs.open(f"{run_dir}/verdicts-00000.parquet".split("://", 1)[1], "wb") as f:
            pq.write_table(table, f)
        with fs.open(f"{run_dir}/_summary.json".split("://", 1)[1], "w") as f:
            f.write(json.dumps(summary))
    return f"{run_dir}/verdicts-00000.parquet"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app, **config):
    """A real uvicorn server for ``app`` on 127.0.0.1, configured as ``deepaudit serve``
    configures it (``config``: more of :func:`server_config`'s options), stopped on exit;
    yields its URL."""
    import uvicorn

    from deepaudit.serve.server import server_config

    port = free_port()
    server = uvicorn.Server(server_config(app, host="127.0.0.1", port=port, **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def chrome():
    """Headless Chromium for the serve pages (tests/browser.py)."""
    from ..browser import chrome as headless_chrome

    return headless_chrome("the serve test", window="1360,1000")
