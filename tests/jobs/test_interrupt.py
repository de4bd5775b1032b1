"""Stops that must not lose finished work: SIGTERM/SIGINT flush what is done, a SIGKILLed
driver loses at most one roll interval, and a rerun with the same ledger audits only what
is missing. Real `deepaudit audit` subprocesses (their own 2-CPU Ray), real ffmpeg,
RetinaFace and the tiny model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepaudit.infra.storage import StorageConfig
from deepaudit.pipeline.evidence import drop_staging, promote, staging_root
from deepaudit.pipeline.ledger import Ledger
from deepaudit.pipeline.manifest import read_manifest
from deepaudit.pipeline.schema import RESERVED_COLUMNS, STAGE_VERDICT_SCHEMA
from deepaudit.pipeline.writer import VerdictWriter, read_verdicts

N_ITEMS = 40


def _rows(ids: list[int], evidence: list[str | None] | None = None) -> pa.Table:
    n = len(ids)
    got = {name: [None] * n for name in STAGE_VERDICT_SCHEMA.names}
    got.update(manifest_row=ids, media_id=[f"m{i}" for i in ids], uri=[f"/{i}.mp4" for i in ids],
               status=["no_face"] * n, frame_indices=[[]] * n, face_boxes=[[]] * n,
               frame_p_fake=[[]] * n, dropped_frames=[[]] * n,
               evidence=evidence or [None] * n)
    return pa.table(got, schema=STAGE_VERDICT_SCHEMA)


def _manifest(tmp_path: Path, n: int):
    p = tmp_path / "m.csv"
    p.write_text("uri\n" + "".join(f"/{i}.mp4\n" for i in range(n)))
    return read_manifest(str(p), RESERVED_COLUMNS)


def test_writer_closes_a_file_on_time_without_a_new_batch(tmp_path):
    """The roll timer publishes a file roll_seconds after its first row, even when no
    further batch arrives (a slow item): that bounds what SIGKILL loses."""
    closed = []
    w = VerdictWriter(str(tmp_path / "run"), StorageConfig(), _manifest(tmp_path, 5), "r", 1000,
                      on_file_closed=lambda uri, rows: closed.append(rows.num_rows),
                      roll_seconds=0.3)
    w.start_roll_timer(every_s=0.05)
    w.write(_rows([0, 1]))
    assert closed == []
    deadline = time.monotonic() + 10
    while not closed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert closed == [2]
    assert len(list((tmp_path / "run").glob("verdicts-*.parquet"))) == 1
    w.write(_rows([2]))
    w.close()
    assert closed == [2, 1]
    assert read_verdicts(str(tmp_path / "run"))["manifest_row"].to_pylist() == [0, 1, 2]
    with pytest.raises(ValueError, match="--roll-rows"):
        VerdictWriter(str(tmp_path / "x"), StorageConfig(), _manifest(tmp_path, 1), "r", 0)


def test_evidence_appears_only_with_its_row(tmp_path):
    """Evidence waits in the run's staging folder; a closed verdict file moves its rows'
    evidence out, and what is left (rows never written) is deleted."""
    root = str(tmp_path / "out" / "evidence")
    staging = staging_root(root, "run1")
    for name in ("a", "b"):
        (Path(staging) / name).mkdir(parents=True)
        (Path(staging) / name / "run1.png").write_bytes(b"png")
        (Path(staging) / name / "run1.json").write_text("{}")
    assert promote(root, staging, [f"{root}/a/run1.png"]) == 1
    drop_staging(staging)
    assert sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*")
                  if p.is_file()) == ["a/run1.json", "a/run1.png"]


# ---------------------------------------------------------------------------------------
# Real runs.


def _archive(tmp_path: Path, media: dict[str, Path]) -> Path:
    """N_ITEMS manifest rows over a few small generated files (distinct media ids)."""
    arch = tmp_path / "arch"
    arch.mkdir()
    srcs = [media["face_image"], media["face_png"], media["no_face_image"], media["face_video"]]
    for src in srcs:
        shutil.copy(src, arch / src.name)
    lines = ["uri,media_id"]
    for i in range(N_ITEMS):
        lines.append(f"{arch / srcs[i % len(srcs)].name},item{i:03d}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def _cmd(manifest: Path, out: Path, led: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "deepaudit.jobs.cli", "audit", str(manifest), "-o", str(out),
            "--ledger", str(led), "--model", str(model), "--frames", "2", "--num-cpus", "2",
            "--batch-size", "1", "--decode-actors", "1", "--classify-actors", "1",
            "--no-progress", "--evidence-max", "1000", *extra]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for_file(out: Path, proc: subprocess.Popen, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(out.glob("runs/*/verdicts-00000.parquet")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"audit ended (rc {proc.returncode}) before the signal")
        time.sleep(0.05)
    raise AssertionError("no verdict file was published in time")


def _reap(proc: subprocess.Popen) -> None:
    """Whatever the driver left behind in its session (Ray's processes)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _rerun(manifest: Path, out: Path, led: Path, model: Path, tmp_path: Path) -> dict:
    proc = subprocess.run(_cmd(manifest, out, led, model, "--json"), capture_output=True,
                          text=True, timeout=240, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _all_ids(out: Path) -> list[str]:
    return pq.read_table(out / "runs", columns=["media_id"])["media_id"].to_pylist()


def _check_evidence(out: Path) -> None:
    """Every evidence file belongs to a verdict row on disk; nothing is left in staging."""
    rows = pq.read_table(out / "runs", columns=["evidence"])["evidence"].to_pylist()
    pngs = {str(p) for p in (out / "evidence").rglob("*.png")} if (out / "evidence").exists() \
        else set()
    assert pngs == {u for u in rows if u}
    assert not list((out / "evidence").glob("_staging/*/*")) if (out / "evidence").exists() \
        else True


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigterm_flushes_finished_rows_and_rerun_completes(tiny_model, media, tmp_path):
    manifest = _archive(tmp_path, media)
    out, led = tmp_path / "out", tmp_path / "ledger"
    proc = _start(_cmd(manifest, out, led, tiny_model, "--roll-rows", "2"), tmp_path / "a.log")
    try:
        _wait_for_file(out, proc)
        time.sleep(1.0)  # some rows in the open file too
        os.kill(proc.pid, signal.SIGTERM)  # the driver only, as Kubernetes or `ray job stop`
        rc = proc.wait(120)
    finally:
        _reap(proc)
    log = (tmp_path / "a.log").read_text(errors="replace")
    assert rc == 143, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    (run_dir,) = list((out / "runs").iterdir())
    summary = json.loads((run_dir / "_summary.json").read_text())
    assert summary["state"] == "interrupted"
    done = summary["interrupted"]
    assert done["signal"] == "SIGTERM" and done["done"] + done["not_done"] == N_ITEMS
    on_disk = read_verdicts(str(run_dir))["media_id"].to_pylist()
    assert len(on_disk) == done["done"] == summary["rows_out"] and 1 <= len(on_disk) < N_ITEMS
    assert "lost" not in json.dumps(summary["error_codes"])  # not-done rows are not error rows
    ledger = Ledger(str(led))
    assert sorted(ledger.read()["media_id"].to_pylist()) == sorted(on_disk)
    assert ledger.unfinished_runs() == []
    _check_evidence(out)

    again = _rerun(manifest, out, led, tiny_model, tmp_path)
    assert again["state"] == "completed"
    assert again["items"]["skipped"] == len(on_disk)
    assert again["items"]["audited"] == N_ITEMS - len(on_disk) and again["items"]["recovered"] == 0
    ids = _all_ids(out)
    assert len(ids) == len(set(ids)) == N_ITEMS  # nothing lost, nothing twice
    assert ledger.read().num_rows == N_ITEMS
    _check_evidence(out)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigkill_loses_at_most_the_open_file_and_rerun_recovers(tiny_model, media, tmp_path):
    """kill -9 of the driver: no flush at all. Files closed on time (--roll-seconds) are
    kept; the rerun ledgers any file the dead run published but did not ledger, and
    audits only what is missing."""
    manifest = _archive(tmp_path, media)
    out, led = tmp_path / "out", tmp_path / "ledger"
    proc = _start(_cmd(manifest, out, led, tiny_model, "--roll-rows", "1000",
                       "--roll-seconds", "1"), tmp_path / "k.log")
    try:
        _wait_for_file(out, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
    finally:
        _reap(proc)
    (run_dir,) = list((out / "runs").iterdir())
    assert not (run_dir / "_summary.json").exists()
    published = read_verdicts(str(run_dir))["media_id"].to_pylist()
    assert 1 <= len(published) < N_ITEMS

    again = _rerun(manifest, out, led, tiny_model, tmp_path)
    assert again["state"] == "completed"
    assert again["items"]["skipped"] == len(published)
    assert again["items"]["audited"] == N_ITEMS - len(published)
    ids = _all_ids(out)
    assert len(ids) == len(set(ids)) == N_ITEMS
    ledger = Ledger(str(led))
    assert ledger.read().num_rows == N_ITEMS and ledger.unfinished_runs() == []
    _check_evidence(out)
