"""Load bench of ``deepaudit serve``: a 1,000,000-row verdict table (the real schema),
the real server (``deepaudit serve`` in a subprocess on 127.0.0.1), and 16 concurrent
clients on loopback sending a fixed number of requests per scenario (with a time cap).

Scenarios: the items page without filters (every sort); with filters (verdict, score
range, status and error code, text search, model and run); deep pages (keyset cursors at
10 % ... 99 % of the table, and the last pages): a fixed set of pages that many clients
ask for again, so after the first request of each the server's page cache answers. And
two cold scenarios in which every request is distinct (random deep cursors; random score
ranges), so each finds its page (a new mask or cursor) and renders the template. Prints
one JSON line with p50/p95 latency per scenario and appends it to
bench/results/serve_load.jsonl (bench/record.py).

    .venv/bin/python bench/serve_load.py [--rows 1000000] [--clients 16] [--requests 480]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import append_record  # noqa: E402

from deepaudit.pipeline.schema import VERDICT_SCHEMA  # noqa: E402

RUNS = [("20261101T020000Z-aaaaaa", "effnet_lite0_lstm@82ff3282"),
        ("20261108T020000Z-bbbbbb", "effnet_lite0_lstm@82ff3282"),
        ("20261115T020000Z-cccccc", "resnext_lstm@1234abcd"),
        ("20261122T020000Z-dddddd", "effnet_lite0_lstm@82ff3282")]
ERRORS = np.array(["not_media: moov atom not found", "timeout: decode over 120 s",
                   "missing: no such key", "too_large: 96 MP"])


def build(out: Path, rows: int, files_per_run: int = 5, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    per_run = rows // len(RUNS)
    t0 = datetime(2026, 11, 1, 2, tzinfo=timezone.utc)
    for r, (run_id, model) in enumerate(RUNS):
        run_dir = out / "runs" / run_id
        run_dir.mkdir(parents=True)
        n = per_run if r < len(RUNS) - 1 else rows - per_run * (len(RUNS) - 1)
        for f, idx in enumerate(np.array_split(np.arange(n), files_per_run)):
            k = len(idx)
            status = rng.choice(np.array(["ok", "no_face", "error"]), k, p=[0.9, 0.06, 0.04])
            ok = status == "ok"
            p = rng.beta(0.6, 1.4, k).astype(np.float32)
            err = np.where(status == "error", rng.choice(ERRORS, k),
                           np.where(status == "no_face", "no_face: no face in 8 frames", None))
            cam = rng.integers(0, 40, k)
            names = [f"cam{c:02d}/{d}/clip-{i:07d}.mp4" for c, d, i in
                     zip(cam, rng.integers(1, 29, k), idx)]
            frames = 8
            offsets = np.arange(0, (k + 1) * frames, frames, dtype=np.int32)
            cols = {
                "media_id": pa.array(names),
                "uri": pa.array([f"s3://archive/{m}" for m in names]),
                "media_type": pa.array(np.where(rng.random(k) < 0.8, "video", "image")),
                "status": pa.array(status),
                "error": pa.array(err, pa.string()),
                "verdict": pa.array(np.where(ok, np.where(p >= 0.85, "fake", "real"), None),
                                    pa.string()),
                "p_fake": pa.array(p, mask=~ok),
                "margin": pa.array(np.abs(p - 0.85).astype(np.float32), mask=~ok),
                "threshold": pa.array(np.full(k, 0.85, np.float32)),
                "n_frames_sampled": pa.array(np.full(k, frames, np.int32)),
                "n_frames_with_face": pa.array(np.where(ok, frames, 0).astype(np.int32)),
                "n_frames_dropped": pa.array(np.zeros(k, np.int32)),
                "frame_indices": pa.ListArray.from_arrays(
                    offsets, pa.array(np.tile(np.arange(0, 80, 10, dtype=np.int32), k))),
                "frame_p_fake": pa.ListArray.from_arrays(
                    offsets, pa.array(rng.random(k * frames).astype(np.float32))),
                "model": pa.array([model] * k),
                "run_id": pa.array([run_id] * k),
                "audited_at": pa.array(
                    [t0 + timedelta(days=7 * r, milliseconds=int(i)) for i in idx],
                    pa.timestamp("us", tz="UTC")),
                "manifest_row": pa.array(idx.astype(np.int64)),
                "size_bytes": pa.array(rng.integers(10_000, 50_000_000, k)),
            }
            table = pa.table({name: cols.get(name, pa.nulls(k, VERDICT_SCHEMA.field(name).type))
                              for name in VERDICT_SCHEMA.names}, schema=VERDICT_SCHEMA)
            pq.write_table(table, run_dir / f"verdicts-{f:05d}.parquet")
        (run_dir / "_summary.json").write_text(json.dumps({
            "run_id": run_id, "state": "completed", "model": model, "model_trained": True,
            "threshold": 0.85, "started_at": (t0 + timedelta(days=7 * r)).isoformat(),
            "model_quality": {"ood_auc": 0.71, "caveat": "bench data"}}))


def deep_cursors(out: Path, rows: int, n_random: int, seed: int = 1):
    """Keyset cursors (sort p_fake desc), made as the server makes them (row ids in
    (run_id, manifest_row) order): at 10, 50, 90 and 99 % of the table, and ``n_random``
    at random places (each one a distinct request)."""
    import duckdb

    from deepaudit.serve.data import encode_cursor

    con = duckdb.connect()
    t = con.sql("SELECT p_fake, row_number() OVER (ORDER BY run_id, manifest_row) AS _id FROM "
                f"read_parquet('{out}/runs/*/*.parquet') ORDER BY p_fake DESC NULLS LAST, _id"
                ).to_arrow_table()
    p, ids = t["p_fake"].to_pylist(), t["_id"].to_pylist()

    def at(pos: int) -> tuple[str, int]:
        v = p[pos - 1]
        return encode_cursor("p_fake", "desc", v is None, None if v is None else float(v),
                             ids[pos - 1]), pos

    fixed = [at(int(rows * f)) for f in (0.1, 0.5, 0.9, 0.99)]
    rng = np.random.default_rng(seed)
    return fixed, [at(int(x)) for x in rng.integers(1, rows - 1, n_random)]


SORTS = ["p_fake", "media_id", "audited_at", "margin", "status", "uri", "model", "run_id"]


def scenarios(fixed, random_cursors, n: int, seed: int = 2) -> dict[str, list[str]]:
    """Paths per scenario. items, filtered and deep repeat a set of pages (many reviewers,
    the same views: after the first request of each, the page cache answers); the cold_*
    scenarios send only distinct requests (every one a page-cache miss)."""
    rng = np.random.default_rng(seed)
    lo = rng.uniform(0, 0.9, n)
    return {
        "items": ["/items", "/items?limit=100"] +
                 [f"/items?sort={c}&order={o}" for c in SORTS for o in ("asc", "desc")],
        "filtered": ["/items?verdict=fake", "/items?verdict=fake&p_min=0.9&p_max=0.99",
                     "/items?status=error&error_code=timeout", "/items?q=cam07%2F1",
                     f"/items?model=resnext_lstm%401234abcd&run={RUNS[2][0]}",
                     "/items?sort=media_id&order=asc&verdict=real",
                     "/items?sort=audited_at&status=no_face", "/items?q=clip-00042"],
        "deep": [f"/items?after={c}&start={s}" for c, s in fixed] +
                ["/items?before=end", "/items?verdict=fake&before=end"],
        "cold_deep": [f"/items?after={c}&start={s}" for c, s in random_cursors],
        "cold_filtered": [f"/items?verdict=fake&p_min={a:.6f}&p_max={a + 0.05:.6f}"
                          for a in lo],
    }


def load(base: str, paths: list[str], clients: int, total: int, cap_s: float) -> dict:
    lat: list[float] = []
    errors = 0
    lock = threading.Lock()
    per_client = total // clients
    deadline = time.monotonic() + cap_s

    def client(k: int) -> None:
        nonlocal errors
        s = requests.Session()
        for i in range(per_client):
            if time.monotonic() > deadline:
                break
            t = time.perf_counter()
            r = s.get(base + paths[(k + i) % len(paths)], timeout=60)
            dt = (time.perf_counter() - t) * 1e3
            with lock:
                lat.append(dt)
                errors += r.status_code != 200

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    a = np.array(lat)
    return {"n": int(a.size), "errors": errors, "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p95_ms": round(float(np.percentile(a, 95)), 1),
            "max_ms": round(float(a.max()), 1), "rps": round(a.size / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=480, help="per scenario")
    ap.add_argument("--cap-s", type=float, default=120.0, help="time cap per scenario")
    ap.add_argument("--record", default=str(Path(__file__).parent / "results/serve_load.jsonl"))
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    proc = None
    try:
        t = time.perf_counter()
        build(work / "out", args.rows)
        build_s = time.perf_counter() - t
        fixed, random_cursors = deep_cursors(work / "out", args.rows, args.requests)
        with __import__("socket").socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        exe = Path(sys.executable).with_name("deepaudit")
        t = time.perf_counter()
        proc = subprocess.Popen([str(exe), "serve", str(work / "out"), "--port", str(port),
                                 "--no-check"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        base = f"http://127.0.0.1:{port}"
        while True:
            try:
                if requests.get(base + "/healthz", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None:
                raise SystemExit(f"the server exited: {proc.stderr.read()}")
            time.sleep(0.2)
        start_s = time.perf_counter() - t
        results = {}
        load_before = os.getloadavg()[0]  # other work on the machine inflates latency
        for name, paths in scenarios(fixed, random_cursors, args.requests).items():
            if not name.startswith("cold"):  # each page answers 200 before it is timed
                for p in paths:
                    r = requests.get(base + p, timeout=60)
                    assert r.status_code == 200, (p, r.status_code, r.text[:300])
            results[name] = load(base, paths, args.clients, args.requests, args.cap_s)
        line = {"bench": "serve_load", "rows": args.rows, "clients": args.clients,
                "load_avg_1m_before_after": [round(load_before, 1),
                                             round(os.getloadavg()[0], 1)],
                "requests_per_scenario": args.requests, "build_s": round(build_s, 1),
                "server_start_s": round(start_s, 1), **results,
                "goal_p95_ms": 300,
                "goal_met": all(v["p95_ms"] < 300 for k, v in results.items()
                                if not k.startswith("cold")),
                "goal_met_cold": all(v["p95_ms"] < 300 for k, v in results.items()
                                     if k.startswith("cold"))}
        if not args.no_record:
            line = append_record(args.record, line)
        print(json.dumps(line))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
