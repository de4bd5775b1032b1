"""The ledger folder reads as plain Parquet: one row per entry, bookkeeping excluded."""

from __future__ import annotations

import json
import shutil

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from deepaudit.pipeline.audit import AuditConfig, run_audit
from deepaudit.pipeline.ledger import LEDGER_SCHEMA, Ledger


def _plain_reads(folder) -> tuple[pa.Table, int]:
    table = pads.dataset(str(folder), format="parquet").to_table()
    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{folder}/**/*.parquet')").fetchall()[0][0]
    return table, n


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_three_runs_plain_dataset_read_is_exactly_the_entries(ray_local, tiny_model, media,
                                                              tmp_path):
    arch = tmp_path / "arch"
    arch.mkdir()
    for name in ("face_image", "face_png", "no_face_image", "not_media", "zero_byte"):
        shutil.copy(media[name], arch / f"{name}{media[name].suffix}")
    out, led = tmp_path / "out", tmp_path / "ledger"
    summaries = [run_audit(AuditConfig(manifest=str(arch), output=str(out), model=str(tiny_model),
                                       frames=2, ledger=str(led)))
                 for _ in range(3)]
    # Run 1 audits 5; the errored two are retried by runs 2 and 3 (max 3 attempts).
    assert [s["items"]["audited"] for s in summaries] == [5, 2, 2]
    entries = Ledger(str(led)).read()
    assert entries.num_rows == 9
    table, n_duck = _plain_reads(led)
    assert table.num_rows == n_duck == entries.num_rows
    assert table.schema.names == LEDGER_SCHEMA.names
    assert sorted(table["media_id"].to_pylist()) == sorted(entries["media_id"].to_pylist())
    assert table["status"].null_count == 0  # no plan rows mixed in
    assert len(list((led / "_runs").iterdir())) == 3 and not (led / "runs").exists()


def test_a_legacy_ledger_is_migrated_on_first_use(tmp_path):
    """runs/<id>/{run.json,plan.parquet} of an older ledger move to _runs/ and still drive
    crash recovery."""
    led = Ledger(str(tmp_path / "ledger"))
    plan = pa.table({"manifest_row": [0], "media_id": ["a"], "uri": ["/a"], "change_key": ["k"],
                     "attempt": pa.array([1], pa.int32()), "reason": ["new"]})
    old = tmp_path / "ledger" / "runs" / "old"
    old.mkdir(parents=True)
    pq.write_table(plan, old / "plan.parquet")
    run_dir = tmp_path / "out" / "runs" / "old"
    (old / "run.json").write_text(json.dumps({"run_id": "old", "output": str(run_dir),
                                              "model": "A@1"}))
    run_dir.mkdir(parents=True)
    pq.write_table(pa.table({"manifest_row": [0], "status": ["ok"], "error": [None],
                             "audited_at": pa.array([0], pa.timestamp("us", tz="UTC"))},
                            schema=pa.schema([("manifest_row", pa.int64()),
                                              ("status", pa.string()), ("error", pa.string()),
                                              ("audited_at", pa.timestamp("us", tz="UTC"))])),
                   run_dir / "verdicts-00000.parquet")
    assert led.migrate() == 1
    assert not (tmp_path / "ledger" / "runs").exists()
    assert sorted(p.name for p in (tmp_path / "ledger" / "_runs" / "old").iterdir()) == [
        "plan.arrow", "run.json"]
    assert led.read_plan("old").to_pylist() == plan.to_pylist()
    assert [r["run_id"] for r in led.unfinished_runs()] == ["old"]
    assert led.reconcile(led.read(), current_run="new").num_rows == 1
    table, n_duck = _plain_reads(tmp_path / "ledger")
    assert table.num_rows == n_duck == 1
    assert led.migrate() == 0  # idempotent
