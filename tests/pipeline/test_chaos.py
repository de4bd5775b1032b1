"""The chaos soak, small (``bench/chaos.py run``, docs/robustness.md "Chaos soak"): an audit
of generated images, clips and corrupt files on a local S3 behind a fault proxy (500, 503
SlowDown, late answers, TCP resets), while decode and classifier actor processes are
SIGKILLed, then a rerun with the same ledger. Every row comes out exactly once, in each
run and in the ledger; no fault turns into a wrong answer that is not an error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROWS = 24


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.timeout(600)
def test_chaos_soak_every_row_exactly_once(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "chaos.py"), "run", "--rows", str(ROWS),
           "--objects", "8", "--kill-every", "30", "--evidence-max", "4", "--num-cpus", "2",
           "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=560,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    first, again = r["runs"]

    # The chaos happened: workers died mid-run (the first kill comes as soon as an actor
    # runs a task, then one every 30 s as in the full soak), S3 requests failed or were
    # reset.
    why = {k: first[k] for k in ("wall_s", "first_row_s", "kills", "kill_misses", "progress")}
    assert first["workers_killed"] > 0 and first["kills"], why
    assert sum(r["faults_injected"].values()) > 0, r["faults_injected"]
    assert first["faults"]["faults_by_agent"]  # botocore's and/or ffmpeg's requests

    # Exactly once: every manifest row, no row twice, none missing, in both runs.
    assert r["exactly_once"]
    assert first["state"] == "completed" and first["run_error"] is None
    assert first["rows_in"] == first["rows_out"] == first["distinct_ids"] == ROWS
    assert first["duplicates"] == first["missing"] == first["unexpected_ids"] == 0
    # A lost row is one whose task failed on every attempt, then again alone.
    assert first["lost"] <= first["retried_alone"]

    # The rerun audits exactly the rows that errored (the ledger's retry) and skips
    # the rest; the corrupt objects error every time.
    corrupt = r["mix"].get("corrupt", 0)
    assert corrupt >= 1 and again["rows_in"] == again["rows_expected"] >= ROWS // 8
    assert again["rows_out"] == again["distinct_ids"] == again["rows_in"]
    assert again["duplicates"] == again["missing"] == 0
    assert again["items"]["skipped"] == ROWS - again["rows_in"]
    assert r["final"]["media_ids"] == ROWS

    # No fault or kill produced a wrong answer the ledger would never retry, and what
    # errored for a fault was put right by the rerun.
    assert first["silently_wrong"] == again["silently_wrong"] == 0, first["examples"]
    assert r["final"]["wrong_status"] == 0, r["final"]
    # Evidence never exists without its verdict row, and staging is emptied.
    ev = r["evidence"]
    assert ev["orphans"] == ev["missing"] == ev["left_in_staging"] == 0, ev


def test_the_writer_holds_the_run_to_its_evidence_cap(tmp_path):
    """Each classifier actor counts its own evidence items, and one restarted after its
    process died (the chaos soak kills them) counts from 0 again: the writer holds the
    run to --evidence-max, dropping the URIs of rows past it (their staged files are
    never promoted)."""
    import pyarrow as pa

    from deepaudit.infra.storage import StorageConfig
    from deepaudit.pipeline.manifest import read_manifest
    from deepaudit.pipeline.schema import RESERVED_COLUMNS, STAGE_VERDICT_SCHEMA
    from deepaudit.pipeline.writer import VerdictWriter, read_verdicts

    (tmp_path / "m.csv").write_text("uri\n" + "".join(f"/{i}.jpg\n" for i in range(8)))
    manifest = read_manifest(str(tmp_path / "m.csv"), RESERVED_COLUMNS)

    def rows(ids: list[int], evidence: list[str | None]) -> pa.Table:
        cols = {f.name: pa.nulls(len(ids), f.type) for f in STAGE_VERDICT_SCHEMA}
        cols.update(manifest_row=pa.array(ids, pa.int64()),
                    media_id=pa.array([f"/{i}.jpg" for i in ids]),
                    status=pa.array(["ok"] * len(ids)), verdict=pa.array(["fake"] * len(ids)),
                    evidence=pa.array(evidence, pa.string()))
        for name in ("frame_indices", "face_boxes", "frame_p_fake", "dropped_frames"):
            cols[name] = pa.array([[]] * len(ids), STAGE_VERDICT_SCHEMA.field(name).type)
        return pa.table(cols, schema=STAGE_VERDICT_SCHEMA)

    w = VerdictWriter(str(tmp_path / "run"), StorageConfig(), manifest, "r", 1000,
                      evidence_cap=3)
    w.write(rows([0, 1], ["e0", "e1"]))
    w.write(rows([2, 3, 4, 5], [None, "e3", "e4", "e5"]))  # a restarted actor's items
    w.write(rows([6, 7], ["e6", None]))
    w.close()
    got = read_verdicts(str(tmp_path / "run"))["evidence"].to_pylist()
    assert got == ["e0", "e1", None, "e3", None, None, None, None]
    assert w.evidence_written == 3
    uncapped = VerdictWriter(str(tmp_path / "run2"), StorageConfig(), manifest, "r", 1000)
    uncapped.write(rows([0, 1, 2], ["e0", "e1", "e2"]))
    assert uncapped.evidence_written == 3
