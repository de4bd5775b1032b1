"""The ledger and incremental audits: skip decisions, retries, a new model, a growing
archive on S3, two runs that never overwrite each other, and a run killed halfway."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepaudit.infra.storage import StorageConfig
from deepaudit.pipeline.audit import AuditConfig, run_audit
from deepaudit.pipeline.ledger import (
    LEDGER_SCHEMA,
    Ledger,
    LedgerPolicy,
    change_keys,
    decide,
    latest_entries,
)
from deepaudit.pipeline.manifest import read_manifest
from deepaudit.pipeline.schema import RESERVED_COLUMNS, STAGE_VERDICT_SCHEMA
from deepaudit.pipeline.writer import VerdictWriter, read_verdicts

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _entries(rows: list[tuple]) -> pa.Table:
    """(media_id, change_key, model, status, attempts, minutes after T0) per entry."""
    cols = {name: [] for name in LEDGER_SCHEMA.names}
    for i, (mid, key, model, status, attempts, minutes) in enumerate(rows):
        cols["media_id"].append(mid)
        cols["uri"].append(f"/a/{mid}")
        cols["change_key"].append(key)
        cols["model"].append(model)
        cols["run_id"].append(f"r{minutes}")
        cols["status"].append(status)
        cols["error_code"].append("fetch_failed" if status == "error" else None)
        cols["attempts"].append(attempts)
        cols["verdict_file"].append(f"/out/runs/r{minutes}/verdicts-00000.parquet")
        cols["manifest_row"].append(i)
        cols["audited_at"].append(T0 + timedelta(minutes=minutes))
    return pa.table(cols, schema=LEDGER_SCHEMA)


def _items(pairs: list[tuple[str, str | None]]) -> pa.Table:
    return pa.table({"manifest_row": list(range(len(pairs))),
                     "media_id": [m for m, _ in pairs],
                     "change_key": pa.array([k for _, k in pairs], pa.string())})


def test_decide_every_case():
    entries = _entries([
        ("done", "k1", "A", "ok", 1, 0),
        ("noface", "k1", "A", "no_face", 1, 0),
        ("changed", "old", "A", "ok", 1, 0),
        ("err1", "k1", "A", "error", 1, 0),
        ("err3", "k1", "A", "error", 3, 0),
        ("other", "k1", "B", "ok", 1, 0),  # audited by another model only
        ("other-changed", "old", "B", "ok", 1, 0),
        ("fixed", "k1", "A", "error", 2, 0),  # errored, then fixed by a later run
        ("fixed", "k1", "A", "ok", 3, 5),
        ("gone", None, "A", "error", 1, 0),  # missing object: null key
    ])
    items = _items([("done", "k1"), ("noface", "k1"), ("changed", "new"), ("err1", "k1"),
                    ("err3", "k1"), ("other", "k1"), ("other-changed", "new"), ("fixed", "k1"),
                    ("brand-new", "k1"), ("gone", None)])
    d = decide(items, entries, "A", LedgerPolicy(max_attempts=3))
    got = dict(zip(items["media_id"].to_pylist(), zip(d["reason"].to_pylist(),
                                                       d["attempt"].to_pylist())))
    assert got == {
        "done": ("skipped", 1), "noface": ("skipped", 1), "changed": ("changed", 1),
        "err1": ("retry", 2), "err3": ("gave_up", 4), "other": ("new_model", 1),
        "other-changed": ("changed", 1), "fixed": ("skipped", 1), "brand-new": ("new", 1),
        "gone": ("retry", 2),
    }
    forced = decide(items, entries, "A", LedgerPolicy(max_attempts=3, retry_errors=True))
    assert dict(zip(items["media_id"].to_pylist(), forced["reason"].to_pylist()))["err3"] == "retry"
    anym = decide(items, entries, "A", LedgerPolicy(any_model=True))
    reasons = dict(zip(items["media_id"].to_pylist(), anym["reason"].to_pylist()))
    assert reasons["other"] == "skipped"
    # An empty ledger: everything is new.
    assert set(decide(items, LEDGER_SCHEMA.empty_table(), "A", LedgerPolicy())["reason"]
               .to_pylist()) == {"new"}
    with pytest.raises(ValueError):
        LedgerPolicy(max_attempts=0)


def test_latest_entry_wins_by_time_not_by_read_order():
    entries = _entries([("x", "k", "A", "ok", 1, 9), ("x", "k", "A", "error", 1, 1),
                        ("x", "k", "B", "error", 1, 2)])
    latest = latest_entries(entries)
    assert sorted(zip(latest["model"].to_pylist(), latest["status"].to_pylist())) == [
        ("A", "ok"), ("B", "error")]


def test_change_keys_from_listing_columns_or_stat(tmp_path):
    f = tmp_path / "a.jpg"
    f.write_bytes(b"12345")
    m = tmp_path / "m.csv"
    m.write_text(f"uri\n{f}\n{tmp_path / 'missing.jpg'}\n")
    keys = change_keys(read_manifest(str(m), RESERVED_COLUMNS)).to_pylist()
    assert keys == [f"size=5;mtime_us={f.stat().st_mtime_ns // 1000}", None]
    listed = pa.table({"uri": ["s3://b/k", "/x"], "size": [7, 3], "etag": ["abc", None],
                       "mtime": pa.array([1_000_000, 2_000_000], pa.timestamp("us", tz="UTC"))})
    assert change_keys(listed).to_pylist() == ["size=7;etag=abc", "size=3;mtime_us=2000000"]


def test_reconcile_ledgers_a_crashed_runs_orphan_file_once(tmp_path):
    """A verdict file that landed without its ledger part (the run died in between)."""
    out, ledger = tmp_path / "out", Ledger(str(tmp_path / "ledger"))
    plan = pa.table({"manifest_row": [0, 1], "media_id": ["a", "b"], "uri": ["/a", "/b"],
                     "change_key": ["ka", "kb"], "attempt": pa.array([1, 2], pa.int32()),
                     "reason": ["new", "retry"]})
    run_dir = out / "runs" / "crashed"
    ledger.start_run("crashed", str(run_dir), "A@1", plan)
    run_dir.mkdir(parents=True)
    pq.write_table(pa.table({
        "manifest_row": [0, 1], "status": ["ok", "error"], "error": [None, "timeout: slow"],
        "audited_at": pa.array([T0, T0], pa.timestamp("us", tz="UTC"))}),
        run_dir / "verdicts-00000.parquet")
    assert [r["run_id"] for r in ledger.unfinished_runs()] == ["crashed"]
    got = ledger.reconcile(ledger.read(), current_run="next")
    assert got.num_rows == 2 and ledger.read().num_rows == 2
    row = {r["media_id"]: r for r in ledger.read().to_pylist()}
    assert row["b"]["error_code"] == "timeout" and row["b"]["attempts"] == 2
    assert row["a"]["change_key"] == "ka" and row["a"]["model"] == "A@1"
    assert row["a"]["verdict_file"] == f"{run_dir}/verdicts-00000.parquet"
    # The run was in fact still alive and ledgers the same file itself: it counts once.
    ledger.append("crashed-00000", got)
    assert ledger.read().num_rows == 2 and len(ledger.parts()) == 2
    # The crashed run is now closed: a second reconcile adds nothing.
    assert ledger.unfinished_runs() == []
    assert ledger.reconcile(ledger.read(), current_run="later").num_rows == 0
    assert ledger.read().num_rows == 2


def test_writer_on_a_filtered_manifest_ledgers_each_file_after_close(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("uri,site\n/a.mp4,x\n/b.mp4,y\n/c.mp4,z\n/d.mp4,w\n")
    manifest = read_manifest(str(p), RESERVED_COLUMNS)
    todo = manifest.filter(pa.array([False, True, False, True]))  # rows 1 and 3 only
    closed = []

    def on_close(uri, rows):
        assert Path(uri).is_file()  # the file is complete and visible before it is ledgered
        closed.append((uri, rows["manifest_row"].to_pylist()))

    w = VerdictWriter(str(tmp_path / "run"), StorageConfig(), todo, "r1", 1,
                      on_file_closed=on_close)
    got = {n: [None] for n in STAGE_VERDICT_SCHEMA.names}
    got.update(manifest_row=[3], media_id=["/d.mp4"], uri=["/d.mp4"], status=["no_face"],
               frame_indices=[[]], face_boxes=[[]], frame_p_fake=[[]])
    w.write(pa.table(got, schema=STAGE_VERDICT_SCHEMA))
    # A full file is published (and ledgered) at once, not when the next batch comes.
    assert [rows for _, rows in closed] == [[3]]
    # While a file is open it is invisible under its final name.
    w2 = VerdictWriter(str(tmp_path / "run2"), StorageConfig(), todo, "r2", 10)
    w2.write(pa.table(got, schema=STAGE_VERDICT_SCHEMA))
    assert not list((tmp_path / "run2").glob("verdicts-*.parquet"))
    w2.close()
    assert len(list((tmp_path / "run2").glob("verdicts-*.parquet"))) == 1
    assert w.fill_missing(todo, "actor died") == 1
    w.close()
    t = read_verdicts(str(tmp_path / "run"))
    assert t["media_id"].to_pylist() == ["/b.mp4", "/d.mp4"]
    assert t["site"].to_pylist() == ["y", "w"]  # extras follow the original rows
    assert [rows for _, rows in closed] == [[3], [1]]
    assert not [f for f in (tmp_path / "run").iterdir() if f.name.startswith(".")]


def test_abort_publishes_nothing(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("uri\n/a.mp4\n")
    manifest = read_manifest(str(p), RESERVED_COLUMNS)
    w = VerdictWriter(str(tmp_path / "run"), StorageConfig(), manifest, "r1", 10)
    w.fill_missing(manifest, "x")
    w.abort()
    assert list((tmp_path / "run").iterdir()) == [] and w.files == []


# ---------------------------------------------------------------------------------------
# Real runs: local 2-CPU Ray, real ffmpeg, RetinaFace and the tiny model.


def _audit(manifest: str, out: str, ledger: str, model, frames: int = 2, **kw) -> dict:
    return run_audit(AuditConfig(manifest=manifest, output=out, model=str(model), frames=frames,
                                 ledger=ledger, **kw))


def _ledger_dupes(ledger: Ledger) -> int:
    t = ledger.read()
    keys = [(m, mo) for m, mo in zip(t["media_id"].to_pylist(), t["model"].to_pylist())]
    return len(keys) - len(set(keys))


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_growing_archive_on_s3(ray_local, tiny_model, media, s3_server, s3fs_client, tmp_path):
    """Run 1 audits N; run 2 audits 0 and skips N; after K more land, run 3 audits K.
    A new model then re-audits everything. The ledger never holds a duplicate."""
    first = ["face_image", "face_png", "face_video"]
    later = ["no_face_image", "odd_codec"]
    for name in first:
        s3fs_client.put(str(media[name]), f"audit/growing/{name}{media[name].suffix}")
    s3fs_client.pipe("audit/growing/readme.txt", b"not media")
    prefix, out, led = "s3://audit/growing/", "s3://audit/grow-out", "s3://audit/grow-ledger"
    storage = StorageConfig(endpoint_url=s3_server)
    kw = {"storage": StorageConfig(endpoint_url=s3_server)}

    r1 = _audit(prefix, out, led, tiny_model, **kw)
    assert r1["items"]["new"] == r1["items"]["audited"] == r1["rows_out"] == 3
    assert r1["items"]["skipped"] == 0 and r1["items"]["failed"] == 0
    r2 = _audit(prefix, out, led, tiny_model, **kw)
    assert r2["items"]["audited"] == 0 and r2["items"]["skipped"] == 3 and r2["files"] == []
    assert r2["cluster"]["where"].startswith("not started")
    for name in later:
        s3fs_client.put(str(media[name]), f"audit/growing/{name}{media[name].suffix}")
    r3 = _audit(prefix, out, led, tiny_model, **kw)
    assert r3["items"]["new"] == r3["items"]["audited"] == 2 and r3["items"]["skipped"] == 3
    new_ids = set(read_verdicts(r3["output"], storage)["media_id"].to_pylist())
    assert new_ids == {f"s3://audit/growing/{n}{media[n].suffix}" for n in later}

    ledger = Ledger(led, storage)
    assert ledger.read().num_rows == 5 and _ledger_dupes(ledger) == 0
    assert ledger.unfinished_runs() == []
    # Every run wrote under its own id; none overwrote another.
    runs = {r["run_id"] for r in (r1, r2, r3)}
    assert len(runs) == 3
    assert {p.rsplit("/", 1)[-1] for p in s3fs_client.ls("audit/grow-out/runs")} == runs
    # Each ledger entry points at the file that holds its verdict row.
    for e in ledger.read().to_pylist():
        with s3fs_client.open(e["verdict_file"].removeprefix("s3://"), "rb") as f:
            ids = pq.read_table(f, columns=["media_id"])["media_id"].to_pylist()
        assert e["media_id"] in ids

    # Changing one object's bytes makes it "changed"; a new model re-audits everything.
    s3fs_client.put(str(media["face_video_2"]), "audit/growing/face_video.mp4")
    r4 = _audit(prefix, out, led, tiny_model, **kw)
    assert (r4["items"]["changed"], r4["items"]["audited"], r4["items"]["skipped"]) == (1, 1, 4)
    other = tmp_path / "other.safetensors"
    _retrained(tiny_model, other)
    r5 = _audit(prefix, out, led, other, **kw)
    assert r5["items"]["new_model"] == r5["items"]["audited"] == 5
    r6 = _audit(prefix, out, led, tiny_model, **kw, ledger_policy=LedgerPolicy(any_model=True))
    assert r6["items"]["audited"] == 0 and r6["items"]["skipped"] == 5
    assert _ledger_dupes(ledger) == 1  # only face_video, audited twice because it changed


def _retrained(src: Path, dest: Path) -> None:
    """A second checkpoint with other weights: another model id."""
    import torch

    from deepaudit.models.checkpoint import save_checkpoint
    from deepaudit.models.registry import create_model

    torch.manual_seed(99)
    save_checkpoint(create_model("resnext_lstm_tiny"), dest, name="resnext_lstm_tiny",
                    trained=True, notes="test fixture: other random weights")


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_errors_are_retried_up_to_the_limit(ray_local, tiny_model, media, tmp_path):
    arch = tmp_path / "arch"
    arch.mkdir()
    shutil.copy(media["not_media"], arch / "broken.mp4")
    shutil.copy(media["face_image"], arch / "good.jpg")
    out, led = str(tmp_path / "out"), str(tmp_path / "ledger")
    pol = LedgerPolicy(max_attempts=2)

    r1 = _audit(str(arch), out, led, tiny_model, ledger_policy=pol)
    assert (r1["items"]["audited"], r1["items"]["failed"]) == (2, 1)
    r2 = _audit(str(arch), out, led, tiny_model, ledger_policy=pol)
    assert (r2["items"]["retry"], r2["items"]["skipped"], r2["items"]["audited"]) == (1, 1, 1)
    r3 = _audit(str(arch), out, led, tiny_model, ledger_policy=pol)
    assert (r3["items"]["gave_up"], r3["items"]["audited"]) == (1, 0)
    r4 = _audit(str(arch), out, led, tiny_model,
                ledger_policy=LedgerPolicy(max_attempts=2, retry_errors=True))
    assert (r4["items"]["retry"], r4["items"]["audited"], r4["items"]["failed"]) == (1, 1, 1)
    attempts = [e["attempts"] for e in Ledger(led).read().to_pylist()
                if e["media_id"].endswith("broken.mp4")]
    assert attempts == [1, 2, 3]


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_run_killed_halfway_is_rerun_without_duplicates(ray_local, tiny_model, media, tmp_path):
    """A real interruption: an audit subprocess is SIGKILLed as soon as its first verdict
    file lands. The rerun audits only what is missing; every item ends with exactly one
    verdict row across both runs, and the ledger holds each item once."""
    arch = tmp_path / "arch"
    arch.mkdir()
    names = []
    for i in range(12):
        src = media["face_video"] if i % 2 else media["face_video_2"]
        shutil.copy(src, arch / f"clip{i:02d}.mp4")
        names.append(str(arch / f"clip{i:02d}.mp4"))
    out, led = tmp_path / "out", tmp_path / "ledger"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "deepaudit.jobs.cli", "audit", str(arch), "-o", str(out),
           "--ledger", str(led), "--model", str(tiny_model), "--frames", "4", "--num-cpus", "2",
           "--batch-size", "1", "--roll-rows", "1", "--decode-actors", "1",
           "--classify-actors", "1", "--no-progress"]
    log = (tmp_path / "crashed.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_for(lambda: list(out.glob("runs/*/verdicts-00000.parquet")) or proc.poll(),
                  300, "the first verdict file")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)
        log.close()
    (crashed_dir,) = list((out / "runs").iterdir())
    assert not (crashed_dir / "_summary.json").exists(), "the run finished before the kill"
    crashed_files = sorted(crashed_dir.glob("verdicts-*.parquet"))
    crashed_rows = sum(pq.read_metadata(f).num_rows for f in crashed_files)
    assert 1 <= crashed_rows < 12
    ledgered_before = Ledger(str(led)).read().num_rows

    summary = _audit(str(arch), str(out), str(led), tiny_model, frames=4)
    items = summary["items"]
    assert items["recovered"] == crashed_rows - ledgered_before
    assert items["skipped"] == crashed_rows and items["audited"] == 12 - crashed_rows
    every = pq.read_table(out / "runs", columns=["media_id", "run_id"])
    assert sorted(every["media_id"].to_pylist()) == sorted(names)  # once each, none lost
    ledger = Ledger(str(led))
    assert ledger.read().num_rows == 12 and _ledger_dupes(ledger) == 0
    assert ledger.unfinished_runs() == []
    # And a third run has nothing left to do.
    again = _audit(str(arch), str(out), str(led), tiny_model, frames=4)
    assert again["items"]["audited"] == 0 and again["items"]["skipped"] == 12
