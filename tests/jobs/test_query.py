"""``deepaudit query``: SQL over an output folder or a ledger, local or on S3, and the
ready-made queries of the README, run as written."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from deepaudit.infra.storage import StorageConfig
from deepaudit.jobs.cli import app
from deepaudit.pipeline.ledger import Ledger, ledger_rows
from deepaudit.pipeline.manifest import validate_manifest
from deepaudit.pipeline.query import QueryError, run_query
from deepaudit.pipeline.schema import RESERVED_COLUMNS, STAGE_VERDICT_SCHEMA
from deepaudit.pipeline.writer import VerdictWriter

runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"})
README = Path(__file__).resolve().parents[2] / "README.md"

# (source folder, name, status, error, p_fake) for two runs; run 2 re-audits "cam1/b".
RUN1 = [("cam1", "a", "ok", None, 0.9), ("cam1", "b", "ok", None, 0.2),
        ("cam2", "c", "ok", None, 0.7), ("cam2", "d", "error", "not_media: bad", None),
        ("cam2", "e", "error", "timeout: slow", None), ("cam2", "f", "no_face", "no_face: x", None)]
RUN2 = [("cam1", "b", "ok", None, 0.95), ("cam3", "g", "ok", None, 0.1),
        ("cam3", "h", "error", "not_media: bad", None)]


def _write_run(out: str, run_id: str, rows, prefix: str, when: datetime,
               storage: StorageConfig, ledger: Ledger | None, extra: str) -> None:
    manifest = validate_manifest(pa.table({
        "uri": [f"{prefix}/{src}/{name}.mp4" for src, name, *_ in rows],
        extra: [f"{extra}-{i}" for i in range(len(rows))],  # extras differ between runs
    }), RESERVED_COLUMNS)
    plan = pa.table({"manifest_row": manifest["manifest_row"], "media_id": manifest["media_id"],
                     "uri": manifest["uri"], "change_key": manifest["uri"],
                     "attempt": pa.array([1] * len(rows), pa.int32()),
                     "reason": ["new"] * len(rows)})

    def on_close(uri, file_rows):
        ledger.append(f"{run_id}-{uri[-13:-8]}", ledger_rows(file_rows, plan, "m@1", run_id, uri))

    w = VerdictWriter(f"{out}/runs/{run_id}", storage, manifest, run_id, 100,
                      on_file_closed=on_close if ledger else None)
    cols = {n: [None] * len(rows) for n in STAGE_VERDICT_SCHEMA.names}
    cols.update(
        manifest_row=list(range(len(rows))), media_id=manifest["media_id"].to_pylist(),
        uri=manifest["uri"].to_pylist(), status=[r[2] for r in rows],
        error=[r[3] for r in rows], p_fake=[r[4] for r in rows],
        verdict=[None if r[4] is None else "fake" if r[4] >= 0.5 else "real" for r in rows],
        margin=[None if r[4] is None else abs(r[4] - 0.5) * 2 for r in rows],
        model=["m@1"] * len(rows), frame_indices=[[]] * len(rows),
        face_boxes=[[]] * len(rows), frame_p_fake=[[]] * len(rows))
    import unittest.mock as mock

    with mock.patch("deepaudit.pipeline.audit.datetime") as dt:  # a fixed audited_at per run
        dt.now.return_value = when
        w.write(pa.table(cols, schema=STAGE_VERDICT_SCHEMA))
    w.close()


def _archive(out: str, prefix: str, storage: StorageConfig, ledger: Ledger | None = None):
    t0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
    _write_run(out, "run-1", RUN1, prefix, t0, storage, ledger, "camera")
    _write_run(out, "run-2", RUN2, prefix, t0 + timedelta(days=1), storage, ledger, "shift")


def _readme_queries() -> dict[str, str]:
    block = re.search(r"Ready-made queries.*?```sql\n(.*?)```", README.read_text(), re.S)[1]
    out = {}
    for chunk in block.strip().split("\n\n"):
        title, *sql = chunk.strip().splitlines()
        out[title.removeprefix("-- ").strip()] = "\n".join(sql)
    return out


def _check_readme_queries(target: str, prefix: str, storage: StorageConfig) -> None:
    q = _readme_queries()
    assert len(q) == 3
    flagged = run_query(target, q["Flagged media in the last run, most confident first"], storage)
    assert flagged["media_id"].to_pylist() == [f"{prefix}/cam1/b.mp4"]  # run 2 only
    errors = run_query(target, q["The error breakdown: what failed, how often, one example each"],
                       storage).to_pylist()
    assert [(r["code"], r["n"]) for r in errors] == [("not_media", 2), ("timeout", 1)]
    dist = {r["source"]: r for r in run_query(
        target, q["Score distribution per source (the folder that holds each file)"],
        storage).to_pylist()}
    assert set(dist) == {"cam1", "cam2", "cam3"}
    assert dist["cam1"]["n"] == 2 and dist["cam1"]["fakes"] == 2  # latest b is 0.95
    assert dist["cam1"]["mean"] == pytest.approx((0.9 + 0.95) / 2, abs=1e-3)
    assert dist["cam2"]["n"] == 1 and dist["cam3"]["fakes"] == 0


def test_query_a_local_output_folder(tmp_path):
    out = str(tmp_path / "out")
    _archive(out, "/archive", StorageConfig())
    runs = run_query(out, "SELECT run_id, rows, fakes, errors FROM runs ORDER BY started")
    assert runs.to_pylist() == [
        {"run_id": "run-1", "rows": 6, "fakes": 2, "errors": 2},
        {"run_id": "run-2", "rows": 3, "fakes": 1, "errors": 1}]
    # Runs with different manifest columns are queried together (schemas unified).
    both = run_query(out, "SELECT count(camera) AS c, count(shift) AS s FROM verdicts")
    assert both.to_pylist() == [{"c": 6, "s": 3}]
    assert run_query(out, "SELECT count(*) AS n FROM latest").to_pylist() == [{"n": 8}]
    _check_readme_queries(out, "/archive", StorageConfig())

    result = runner.invoke(app, ["query", out, "SELECT media_id, p_fake FROM last_run "
                                 "ORDER BY media_id", "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["media_id"] for r in rows] == ["/archive/cam1/b.mp4", "/archive/cam3/g.mp4",
                                             "/archive/cam3/h.mp4"]
    result = runner.invoke(app, ["query", out, "SELECT * FROM runs", "-f", "jsonl"])
    assert [json.loads(x)["run_id"] for x in result.stdout.splitlines()] in (
        ["run-1", "run-2"], ["run-2", "run-1"])
    result = runner.invoke(app, ["query", out, "SELECT media_id FROM verdicts", "--limit", "2"])
    assert result.exit_code == 0 and "7 more rows" in result.output


def test_query_errors_exit_2_with_a_message(tmp_path):
    out = str(tmp_path / "out")
    _archive(out, "/archive", StorageConfig())
    result = runner.invoke(app, ["query", out, "SELECT nope FROM verdicts"])
    assert result.exit_code == 2 and "nope" in result.output
    result = runner.invoke(app, ["query", str(tmp_path), "SELECT 1"])
    assert result.exit_code == 2 and "neither an audit output" in result.output
    with pytest.raises(QueryError, match="does not exist"):
        run_query(str(tmp_path / "missing"), "SELECT 1")


@pytest.mark.s3
def test_query_s3_output_and_ledger(s3_server, s3fs_client):
    storage = StorageConfig(endpoint_url=s3_server)
    ledger = Ledger("s3://audit/q-ledger", storage)
    _archive("s3://audit/q-out", "s3://audit", storage, ledger)
    _check_readme_queries("s3://audit/q-out", "s3://audit", storage)
    # The ledger target: the same views, over the files the ledger points to.
    _check_readme_queries("s3://audit/q-ledger", "s3://audit", storage)
    led = run_query("s3://audit/q-ledger", "SELECT count(*) AS n, count(DISTINCT run_id) AS r "
                    "FROM ledger", storage).to_pylist()
    assert led == [{"n": 9, "r": 2}]
    result = runner.invoke(app, ["query", "s3://audit/q-ledger", "SELECT status, count(*) AS n "
                                 "FROM ledger_latest GROUP BY ALL ORDER BY n DESC", "-f", "jsonl",
                                 "--s3-endpoint", s3_server])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[0]) == {"status": "ok", "n": 4}
