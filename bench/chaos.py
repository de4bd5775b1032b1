"""Chaos soak: does every row come out exactly once while workers die and storage fails?

``run``: an audit of ``--rows`` manifest rows (distinct media ids) over ``--objects`` S3
objects: small generated images and clips (``bench/soak.py``'s media, from
``deepaudit.pipeline.demo_media``), a faceless photo, and corrupt files (a truncated clip,
a smashed header, text named .jpg, zero bytes). The objects, the Parquet manifest, the
output and the ledger all live on a moto S3 server on 127.0.0.1, reached only through
``deepaudit.infra.faults.FaultProxy``: ``--fault-rate`` of requests get a 500, a 503
SlowDown or a ``--slow-s`` delay, ``--reset-rate`` a TCP reset (before the answer or
halfway through a GET's body). Meanwhile ``WorkerKiller`` SIGKILLs a random decode or
classifier actor process every ``--kill-every`` seconds (never the driver, the raylet or
the GCS): the first as soon as an actor runs a task, a missed one retried every second,
none before the last victim's stage is back to strength. Seconds of the pipeline's clock
by default (``--kill-clock``): its processes' CPU-seconds over the Ray CPUs, so that a
machine shared with other work sees as many kills per row as one left to the bench.
Then a rerun with the same ledger, under the same chaos. Moto and the proxy run in a child
process, so the driver's memory is the audit's alone. A progress line goes to stderr every
minute.

The line holds, per run: rows in and out, ``duplicates`` (rows beyond the first per
media id), ``missing``, ``lost`` (rows whose error starts with ``lost:``), ``inconsistent``
(rows whose outcome differs from the other rows of the same object: status, error code,
faces and ``p_fake``, which never depends on the batch), ``wrong_status`` (against the
object's kind: faces ``ok``, the faceless photo ``no_face``, corrupt files ``error``),
workers killed (by stage), faults injected (by kind and by client; ffmpeg is ``Lavf``),
wall time and the driver's peak RSS; for the rerun also what the ledger skipped and
re-audited; and the final state: the ledger's latest entry per media id.

``memory``: driver memory at ``--rows`` (100,000) against ``--base-rows`` (10,000), each
a separate ``bench/soak.py`` process (one-frame images, the same tiny model): the ratio of
their peak RSS at the end, and the 100k run's own RSS at 100 % against 10 %.

Both print one JSON line; ``--record`` appends it to ``bench/results/chaos.jsonl``.

    python bench/chaos.py run [--rows 10000] [--kill-every 30] [--record]
    python bench/chaos.py memory [--rows 100000] [--base-rows 10000] [--record]
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from record import append_record  # bench/record.py, beside this script
from soak import Watch, hwm_mb, make_media

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])
RESULTS = Path(__file__).parent / "results" / "chaos.jsonl"
BUCKET = "chaos"
# Media kinds of the objects, and their share of them.
MIX = {"image": 0.75, "video": 0.15, "corrupt": 0.10}
FACELESS = {"coffee.jpg"}
SCORE_TOLERANCE = 1e-5
# Fake credentials for the local moto server, set before Ray starts (actors inherit them).
LOCAL_S3_ENV = {"AWS_ACCESS_KEY_ID": "chaos-bench-key",
                "AWS_SECRET_ACCESS_KEY": "chaos-bench-secret",
                "AWS_DEFAULT_REGION": "us-east-1"}
# On a machine loaded far past its cores, Ray's GCS missed the raylet's health checks for a
# minute and declared the only node dead (a 100k-row soak died so at 22k rows). The bench
# kills workers, never nodes: give the checks 100 misses (about 20 minutes) instead of 5.
# At nice 19 beside a busy machine the GCS also went 100 s without CPU and the driver, which
# exits after 60 s without its GCS, died with it: 30 minutes; workers 10 to register.
RAY_ENV = {"RAY_health_check_failure_threshold": "100", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_gcs_rpc_server_reconnect_timeout_s": "1800",
           "RAY_worker_register_timeout_seconds": "600"}
PROGRESS_S = 60.0  # a progress line on stderr at most this often


# --------------------------------------------------------------------------- media


def corrupt_media(folder: Path, clip: Path) -> list[Path]:
    """Broken inputs made from a good clip: truncated (no index), smashed header, text
    named .jpg, zero bytes."""
    good = clip.read_bytes()
    files = {"truncated.mp4": good[: len(good) // 3],
             "smashed.mp4": b"\x00garbage" * 64 + good[512:],
             "notes.jpg": b"this is a text file, not a photo\n" * 20,
             "empty.mp4": b""}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / n for n in files]


def tiny_model(folder: Path) -> Path:
    """A tiny ResNeXt-LSTM checkpoint (random weights, marked trained, as the tests'
    fixture): the run is about the pipeline, not the model. Made in a child process, so
    the driver never loads torch for it."""
    card = folder / "tiny.json"
    if not card.is_file():
        child = multiprocessing.get_context("spawn").Process(target=_save_tiny, args=(card,))
        child.start()
        child.join()
        if child.exitcode != 0 or not card.is_file():
            raise RuntimeError(f"saving the tiny model under {folder} failed")
    return card


def _save_tiny(card: Path) -> None:
    import torch

    from deepaudit.models.checkpoint import save_checkpoint
    from deepaudit.models.registry import create_model

    card.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1234)
    save_checkpoint(create_model("resnext_lstm_tiny"), card.with_suffix(".safetensors"),
                    name="resnext_lstm_tiny", trained=True, notes="chaos bench: random weights")


def plan_objects(media: dict[str, list[Path]], objects: int, seed: int) -> list[tuple[str, Path]]:
    """(kind, file) of each object: kinds drawn by :data:`MIX`, files in turn per kind
    (every kind and file appears when there are enough objects)."""
    rng = random.Random(seed)
    turn: Counter[str] = Counter()
    out = []
    for j in range(objects):
        kind = list(MIX)[j] if j < len(MIX) else rng.choices(list(MIX), list(MIX.values()))[0]
        files = media[kind]
        out.append((kind, files[turn[kind] % len(files)]))
        turn[kind] += 1
    return out


# --------------------------------------------------------------------------- S3 child


def _serve_s3(conn, seed: int, slow_s: float) -> None:
    """moto on 127.0.0.1 behind the fault proxy (faults off until asked), answering the
    parent's commands until it says stop or goes away."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from deepaudit.infra.faults import FaultProxy

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's access log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    direct = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=direct).create_bucket(Bucket=BUCKET)
    proxy = FaultProxy(direct, modes=("500", "503", "slow"), slow_s=slow_s, seed=seed).start()
    conn.send((direct, proxy.endpoint))
    try:
        while True:
            cmd, *args = conn.recv()
            if cmd == "faults":
                proxy.set_faults(*args)
                conn.send(None)
            elif cmd == "counts":  # and start counting afresh
                conn.send(proxy.counts())
                proxy.reset_counts()
            else:
                break
    except EOFError:
        pass
    finally:
        proxy.stop()
        server.stop()


class LocalS3:
    """The S3 child process: ``direct`` reaches moto, ``proxy`` the fault proxy."""

    def __init__(self, seed: int, slow_s: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve_s3, args=(child, seed, slow_s), daemon=True)
        self.proc.start()
        if not self.conn.poll(120):
            self.proc.kill()
            raise RuntimeError("the local S3 server did not start within 120 s")
        self.direct, self.proxy = self.conn.recv()

    def ask(self, *cmd):
        self.conn.send(cmd)
        return self.conn.recv()

    def stop(self) -> None:
        try:
            self.conn.send(("stop",))
        except OSError:
            pass
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


def upload(fs, plan: list[tuple[str, Path]], rows: int, manifest_uri: str) -> dict[str, str]:
    """Put the objects and a Parquet manifest of ``rows`` rows over them (with size and
    ETag, so the ledger needs no HEAD per row); returns each object's kind by uri."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kinds, names = {}, []
    for j, (kind, path) in enumerate(plan):
        key = f"{BUCKET}/archive/{j:04d}-{path.name}"
        fs.put(str(path), key)
        kinds[f"s3://{key}"] = kind
        names.append(key)
    info = {f"s3://{k}": fs.info(k) for k in names}
    uris = [f"s3://{names[i % len(names)]}" for i in range(rows)]
    table = pa.table({
        "uri": uris,
        "media_id": [f"chaos-{i:06d}" for i in range(rows)],
        "size": [int(info[u]["size"]) for u in uris],
        "etag": [str(info[u].get("ETag", "")).strip('"') for u in uris],
        "kind": [kinds[u] for u in uris],
    })
    with fs.open(manifest_uri.removeprefix("s3://"), "wb") as f:
        pq.write_table(table, f)
    return kinds


# --------------------------------------------------------------------------- checks


def expected_status(uri: str, kinds: dict[str, str]) -> str:
    """What an object gives without faults: faces ``ok``, the faceless photo ``no_face``,
    corrupt files ``error``."""
    if uri.rsplit("-", 1)[-1] in FACELESS:
        return "no_face"
    return "error" if kinds[uri] == "corrupt" else "ok"


def check_rows(table, media_ids: list[str], kinds: dict[str, str]) -> dict:
    """Exactly-once and outcome checks of one run's verdict rows (see the docstring)."""
    rows = table.select(["media_id", "uri", "status", "error", "p_fake",
                         "n_frames_with_face"]).to_pylist()
    per_id = Counter(r["media_id"] for r in rows)
    want = set(media_ids)
    lost = [r for r in rows if (r["error"] or "").startswith("lost:")]
    kept = [r for r in rows if not (r["error"] or "").startswith("lost:")]

    def outcome(r: dict) -> tuple:
        code = (r["error"] or "").split(":", 1)[0] if r["status"] == "error" else None
        return r["status"], code, r["n_frames_with_face"]

    by_object: dict[str, Counter] = {}
    scores: dict[str, list[float]] = {}
    for r in kept:
        by_object.setdefault(r["uri"], Counter())[outcome(r)] += 1
        if r["p_fake"] is not None:
            scores.setdefault(r["uri"], []).append(r["p_fake"])
    usual = {uri: c.most_common(1)[0][0] for uri, c in by_object.items()}
    score = {uri: Counter(p).most_common(1)[0][0] for uri, p in scores.items()}
    # The same file scores alike in any batch: up to float32 rounding of the CNN trunk's
    # batched convolutions (about 1e-7 seen), never more than SCORE_TOLERANCE.
    odd = [r for r in kept if outcome(r) != usual[r["uri"]] or (
        r["p_fake"] is not None and abs(r["p_fake"] - score[r["uri"]]) > SCORE_TOLERANCE)]
    spread = max((max(p) - min(p) for p in scores.values()), default=0.0)
    wrong = [r for r in kept if r["status"] != expected_status(r["uri"], kinds)]
    # Wrong but not an error: no rerun retries it (a face image read short as no_face).
    silent = {r["media_id"] for r in odd + wrong if r["status"] != "error"}
    return {
        "rows_out": len(rows),
        "distinct_ids": len(per_id),
        "duplicates": sum(n - 1 for n in per_id.values()),
        "missing": len(want - set(per_id)),
        "unexpected_ids": len(set(per_id) - want),
        "lost": len(lost),
        "inconsistent": len(odd),
        "p_fake_spread_max": spread,
        "wrong_status": len(wrong),
        "silently_wrong": len(silent),
        "status": dict(Counter(r["status"] for r in rows)),
        "error_codes": dict(Counter((r["error"] or "").split(":", 1)[0] for r in rows
                                    if r["status"] == "error")),
        "examples": [{k: (str(v)[:160] if k == "error" else v) for k, v in r.items()}
                     for r in (lost + odd + wrong)[:5]],
    }


def check_evidence(fs, run_ids: list[str], storage) -> dict:
    """Evidence never exists without its verdict row: the PNGs under OUT/evidence against
    the ``evidence`` URIs of the runs' rows; staging must be empty."""
    from deepaudit.pipeline.writer import read_verdicts

    rows = set()
    for run_id in run_ids:
        t = read_verdicts(f"s3://{BUCKET}/out/runs/{run_id}", storage)
        rows |= {u for u in t["evidence"].to_pylist() if u}
    root = f"{BUCKET}/out/evidence"
    files = fs.find(root) if fs.exists(root) else []
    pngs = {f"s3://{f}" for f in files if f.endswith(".png") and "/_staging/" not in f}
    return {"rows_with_evidence": len(rows), "png_files": len(pngs),
            "orphans": len(pngs - rows), "missing": len(rows - pngs),
            "left_in_staging": sum("/_staging/" in f for f in files)}


# --------------------------------------------------------------------------- run


def start_ray(num_cpus: int, attempts: int = 3) -> str:
    """The audit's local Ray, started here (``run_audit`` reuses it): on an overloaded
    machine the raylet can miss Ray's fixed 30 s start-up deadline, so try again."""
    import ray

    from deepaudit.infra.ray_runtime import connect

    for attempt in range(attempts):
        try:
            return connect("local", num_cpus=num_cpus or None)
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception here
            if "timed out during startup" not in str(exc) or attempt + 1 == attempts:
                raise
            ray.shutdown()
            time.sleep(10)
    raise AssertionError("unreachable")


def audit_under_chaos(cfg, rows: int, kill_every: float, seed: int,
                      kill_cpus: float | None) -> dict:
    """One audit with the worker killer on; its summary, kills and the driver's RSS."""
    from deepaudit.infra.faults import WorkerKiller
    from deepaudit.pipeline.audit import run_audit

    watch = Watch(rows)
    killer = WorkerKiller(kill_every, seed=seed, cpus=kill_cpus)
    last = [0.0]

    def on_rows(done: int, total: int) -> None:
        watch.on_rows(done, total)
        now = time.perf_counter() - t0
        if now - last[0] >= PROGRESS_S or done == total:  # where a long soak is, on stderr
            last[0] = now
            print(f"chaos: {done}/{total} rows at {now:.0f} s, {len(killer.kills)} "
                  f"workers killed", file=sys.stderr, flush=True)

    watch.start()
    killer.start()
    t0 = time.perf_counter()
    try:
        summary = run_audit(cfg, on_rows=on_rows)
    finally:
        killer.stop()
        watch.stop()
    first_row_s, _ = watch.windows()
    return {"summary": summary, "wall_s": round(time.perf_counter() - t0, 1),
            "first_row_s": round(first_row_s, 1) if first_row_s is not None else None,
            "workers_killed": len(killer.kills), "killed_by_stage": killer.by_stage(),
            "killed_busy": sum(k.busy for k in killer.kills),
            "kills": [(k.at_s, k.stage, k.busy) for k in killer.kills],
            "kill_misses": killer.misses, "kill_waited_s": round(killer.waited_s, 1),
            "kill_clock_s": round(killer.clock(), 1),
            "progress": [(round(t, 1), done) for t, done, _ in watch.points][::max(
                1, len(watch.points) // 20)],
            "driver_peak_rss_mb": round(watch.peak, 1)}


@app.command()
def run(
    rows: Annotated[int, typer.Option(help="Manifest rows (distinct media ids).")] = 10_000,
    objects: Annotated[int, typer.Option(help="Distinct S3 objects the rows point at.")] = 100,
    kill_every: Annotated[float, typer.Option(help="Seconds between worker kills.")] = 30.0,
    kill_clock: Annotated[str, typer.Option(help="'pipeline': those seconds are the CPU-s of "
                                                 "the bench's processes over the Ray CPUs "
                                                 "(a shared machine kills no more often per "
                                                 "row); 'wall': wall seconds.")] = "pipeline",
    fault_rate: Annotated[float, typer.Option(help="Share of S3 requests answered 500, 503 "
                                                   "SlowDown or late.")] = 0.10,
    reset_rate: Annotated[float, typer.Option(help="Share of S3 requests whose connection "
                                                   "is reset.")] = 0.02,
    slow_s: Annotated[float, typer.Option(help="Delay of a throttled (late) answer.")] = 1.0,
    frames: Annotated[int, typer.Option(help="Frames sampled per clip.")] = 4,
    clip_seconds: Annotated[float, typer.Option(help="Length of the clips.")] = 2.0,
    num_cpus: Annotated[int, typer.Option(help="CPUs for the local Ray (0: all).")] = 0,
    evidence_max: Annotated[int, typer.Option(help="Evidence cap (the audit's default: "
                                                   "500).")] = 500,
    rerun: Annotated[bool, typer.Option(help="Rerun with the same ledger afterwards.")] = True,
    seed: Annotated[int, typer.Option(help="Seeds the objects, the faults and the kills.")] = 0,
    workdir: Annotated[Path, typer.Option(help="Media and the tiny model.")] = Path(
        "bench-out/chaos"),
    record: Annotated[bool, typer.Option(help="Append the line to bench/results/.")] = False,
) -> None:
    """The chaos soak: an audit, then a rerun with the same ledger, under S3 faults and
    worker kills."""
    import ray

    from deepaudit.infra.storage import StorageConfig, s3_filesystem
    from deepaudit.pipeline.audit import AuditConfig
    from deepaudit.pipeline.ledger import Ledger
    from deepaudit.pipeline.writer import read_verdicts

    if rows < 10 or objects < len(MIX):
        raise typer.BadParameter(f"--rows must be >= 10 and --objects >= {len(MIX)}")
    if kill_clock not in ("pipeline", "wall"):
        raise typer.BadParameter("--kill-clock must be 'pipeline' or 'wall'")
    kill_cpus = float(num_cpus or os.cpu_count() or 1) if kill_clock == "pipeline" else None
    for key, value in {**LOCAL_S3_ENV, **RAY_ENV}.items():
        os.environ.setdefault(key, value)
    workdir = workdir.absolute()
    images, clips = make_media(workdir / "media", clip_seconds)
    media = {"image": images, "video": clips,
             "corrupt": corrupt_media(workdir / "media", clips[0])}
    model = tiny_model(workdir / "model")
    plan = plan_objects(media, objects, seed)

    s3 = LocalS3(seed, slow_s)
    try:
        direct = StorageConfig(endpoint_url=s3.direct)  # the checks read past the faults
        fs = s3_filesystem(direct)
        manifest = f"s3://{BUCKET}/manifest.parquet"
        kinds = upload(fs, plan, rows, manifest)
        media_ids = [f"chaos-{i:06d}" for i in range(rows)]
        cfg = AuditConfig(manifest=manifest, output=f"s3://{BUCKET}/out",
                          ledger=f"s3://{BUCKET}/ledger", model=str(model), frames=frames,
                          num_cpus=num_cpus or None, evidence_max=evidence_max,
                          storage=StorageConfig(endpoint_url=s3.proxy))
        start_ray(num_cpus)
        s3.ask("faults", fault_rate, reset_rate)
        s3.ask("counts")  # from here on

        runs, expected = [], media_ids
        for k in range(2 if rerun else 1):
            got = audit_under_chaos(cfg, rows, kill_every, seed + k, kill_cpus)
            summary = got.pop("summary")
            table = read_verdicts(summary["output"], direct)
            runs.append({
                "run_id": summary["run_id"], "state": summary["state"],
                "run_error": summary["run_error"], "rows_in": summary["rows_in"],
                "rows_expected": len(expected), **check_rows(table, expected, kinds),
                "items": summary["items"], "retried_alone": summary["retried_alone"],
                "plan": summary["plan"],
                **got, "faults": s3.ask("counts"),
            })
            # The rerun audits exactly the rows that errored (the ledger's "retry").
            expected = [r["media_id"] for r in table.select(["media_id", "status"]).to_pylist()
                        if r["status"] == "error"]
        s3.ask("faults", 0.0, 0.0)
        latest = Ledger(cfg.ledger, direct).latest().to_pylist()
        evidence = check_evidence(fs, [r["run_id"] for r in runs], direct)
    finally:
        ray.shutdown()
        s3.stop()

    final = Counter(e["status"] for e in latest)
    first = runs[0]
    faults = Counter()
    for r in runs:
        faults.update(r["faults"]["faults"])
    result = {
        "rows": rows, "objects": objects,
        "mix": dict(Counter(kind for kind, _ in plan)),
        "model": "resnext_lstm_tiny (random weights)", "frames": frames,
        "kill_every_s": kill_every, "kill_clock": kill_clock,
        "fault_rate": fault_rate, "reset_rate": reset_rate,
        "slow_s": slow_s, "evidence_max": evidence_max, "seed": seed,
        # The first run's figures, then each run's in full.
        "rows_in": first["rows_in"], "rows_out": first["rows_out"],
        "duplicates": first["duplicates"], "missing": first["missing"],
        "lost": first["lost"], "workers_killed": first["workers_killed"],
        "faults_injected": first["faults"]["faults"], "faults_injected_all_runs": dict(faults),
        "wall_s": first["wall_s"],
        "driver_peak_rss_mb": max(r["driver_peak_rss_mb"] for r in runs),
        "driver_rss_hwm_mb": round(hwm_mb(), 1),
        "runs": runs,
        "final": {"media_ids": len(latest), "status": dict(final),
                  "lost": sum(1 for e in latest if e["error_code"] == "lost"),
                  "wrong_status": sum(e["status"] != expected_status(e["uri"], kinds)
                                      for e in latest)},
        "evidence": evidence,
    }
    result["exactly_once"] = all(
        r["rows_out"] == r["rows_in"] == r["rows_expected"] == r["distinct_ids"]
        and r["duplicates"] == r["missing"] == r["unexpected_ids"] == 0 for r in runs) \
        and len(latest) == rows
    print(json.dumps(result))
    if record:
        append_record(RESULTS, {"bench": "chaos", **result})
    if not result["exactly_once"]:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- memory


def soak(rows: int, workdir: Path, model: Path, num_cpus: int, real_every: int) -> dict:
    """One ``bench/soak.py`` run of ``rows`` one-frame images, in its own process."""
    cmd = [sys.executable, str(Path(__file__).parent / "soak.py"), "--rows", str(rows),
           "--workdir", str(workdir), "--clip-every", "0", "--model", str(model),
           "--num-cpus", str(num_cpus), "--real-every", str(real_every)]
    for _ in range(2):  # once more when Ray missed its start-up deadline (see start_ray)
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**RAY_ENV, **os.environ})
        if "timed out during startup" not in proc.stderr:
            break
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"soak of {rows} rows failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


@app.command()
def memory(
    rows: Annotated[int, typer.Option(help="Rows of the large run.")] = 100_000,
    base_rows: Annotated[int, typer.Option(help="Rows of the run it is compared with.")] = 10_000,
    num_cpus: Annotated[int, typer.Option(help="CPUs for the local Ray (0: all).")] = 0,
    real_every: Annotated[int, typer.Option(help="One row in this many is a real image, the "
                                                 "others a zero-byte file that errors at "
                                                 "once (1: all real).")] = 1,
    goal: Annotated[float, typer.Option(help="Goal: peak RSS ratio at most this.")] = 1.1,
    workdir: Annotated[Path, typer.Option(help="Soak media, manifests and output.")] = Path(
        "bench-out/chaos-memory"),
    record: Annotated[bool, typer.Option(help="Append the line to bench/results/.")] = False,
) -> None:
    """Driver memory at ``--rows`` against ``--base-rows``: two soak runs, one process each."""
    workdir = workdir.absolute()
    model = tiny_model(workdir / "model")
    runs = [soak(n, workdir, model, num_cpus, real_every) for n in (base_rows, rows)]
    keep = ("rows", "images", "empty", "state", "rows_out", "seconds", "startup_s",
            "items_per_s", "rss_mb_before", "marks",
            "rss_mb", "rss_ratio", "rss_mb_hwm", "parquet_files", "plan", "other_cores")
    base, big = runs
    ratio = round(big["rss_mb"]["100%"] / base["rss_mb"]["100%"], 3)
    result = {
        "memory_rows": [base_rows, rows],
        "model": "resnext_lstm_tiny (random weights)", "real_every": real_every,
        "driver_peak_rss_mb": [base["rss_mb"]["100%"], big["rss_mb"]["100%"]],
        "memory_ratio": ratio,
        # The large run's own RSS when it had done base_rows (10 %) and all of them.
        "memory_ratio_within_run": big["rss_ratio"],
        # The RSS at the end by kind: the driver's own heap (anon) against the shared
        # object-store pages it has touched (shmem), which are not its to free.
        "driver_rss_parts_mb": [r.get("marks", {}).get("100%", {}).get("rss_now_mb")
                                for r in runs],
        "memory_goal": goal, "memory_ok": ratio <= goal,
        "soak": [{k: r.get(k) for k in keep} for r in runs],
    }
    print(json.dumps(result))
    if record:
        append_record(RESULTS, {"bench": "chaos_memory", **result})


if __name__ == "__main__":
    app()
