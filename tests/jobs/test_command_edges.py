"""Commands on the edges a new user hits: report after a run that audited nothing, rich
markup in data, one clock for a run's start, and evaluate's manifest checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from io import StringIO
from pathlib import Path

import pyarrow as pa
import pytest
from rich.console import Console
from typer.testing import CliRunner

from deepaudit.infra.storage import StorageConfig
from deepaudit.jobs.cli import app
from deepaudit.pipeline.evaluation import validate_eval_manifest
from deepaudit.pipeline.manifest import ManifestError, read_manifest
from deepaudit.pipeline.query import run_query
from deepaudit.pipeline.schema import RESERVED_COLUMNS, STAGE_VERDICT_SCHEMA
from deepaudit.pipeline.terminal import print_summary
from deepaudit.pipeline.writer import VerdictWriter

runner = CliRunner()
FFMPEG_ERROR = "not_media: [mov,mp4,m4a,3gp,3g2,mj2 @ 0x55d0c0] moov atom not found"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def _run(out: Path, run_id: str, n: int, started: datetime, tmp_path: Path) -> dict:
    """A run folder as the audit writes it: verdict rows (n may be 0) and its summary."""
    m = tmp_path / f"{run_id}.csv"
    m.write_text("uri\n" + "".join(f"/a/{i}.mp4\n" for i in range(max(n, 1))))
    manifest = read_manifest(str(m), RESERVED_COLUMNS)
    w = VerdictWriter(str(out / "runs" / run_id), StorageConfig(), manifest, run_id, 100)
    if n:
        got = {name: [None] * n for name in STAGE_VERDICT_SCHEMA.names}
        got.update(manifest_row=list(range(n)), media_id=[f"/a/{i}.mp4" for i in range(n)],
                   uri=[f"/a/{i}.mp4" for i in range(n)], status=["error"] * n,
                   error=[FFMPEG_ERROR] * n, frame_indices=[[]] * n, face_boxes=[[]] * n,
                   frame_p_fake=[[]] * n, dropped_frames=[[]] * n)
        w.write(pa.table(got, schema=STAGE_VERDICT_SCHEMA))
    w.close()
    summary = {"run_id": run_id, "state": "completed", "started_at": started.isoformat(),
               "finished_at": (started + timedelta(minutes=5)).isoformat(), "rows_in": n,
               "rows_out": n, "output": str(out / "runs" / run_id), "files": w.files,
               "model": "m@1", "model_trained": True, "threshold": 0.5, "status": {},
               "verdicts": {}, "error_codes": {}, "wall_s": 1.0, "cluster": {}}
    for path in (out / "runs" / run_id / "_summary.json", out / "_summary.json"):
        path.write_text(json.dumps(summary))
    return summary


def test_report_after_a_run_that_audited_nothing_reports_the_latest_with_rows(tmp_path):
    out = tmp_path / "out"
    _run(out, "night1", 3, T0, tmp_path)
    _run(out, "night2", 2, T0 + timedelta(days=1), tmp_path)
    _run(out, "night3", 0, T0 + timedelta(days=2), tmp_path)  # everything skipped
    html = tmp_path / "r.html"
    r = runner.invoke(app, ["report", str(out), "-o", str(html)])
    assert r.exit_code == 0, r.output
    assert "night3" in r.output and "reporting run night2" in r.output, r.output
    page = html.read_text()
    assert "night2" in page and "audited nothing" in page
    # Asked for by id, a run without rows is still an error, not another run.
    r = runner.invoke(app, ["report", str(out), "-o", str(html), "--run-id", "night3"])
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_tables_show_square_brackets_from_the_data(tmp_path):
    out = tmp_path / "out"
    _run(out, "r1", 2, T0, tmp_path)
    r = runner.invoke(app, ["query", str(out), "SELECT error, '[bold]x[/bold]' AS t "
                            "FROM verdicts LIMIT 1"])
    assert r.exit_code == 0, r.output
    assert "[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55d0c0]" in r.output.replace("\n", "")
    assert "[bold]x[/bold]" in r.output
    buf = StringIO()
    print_summary({
        "run_id": "r[1]", "state": "completed", "model": "m[x]@1", "model_trained": True,
        "rows_in": 1, "rows_out": 1, "status": {"error": 1}, "verdicts": {},
        "error_codes": {"[red]odd": 1}, "wall_s": 1.0, "throughput_items_per_s": 1.0,
        "cluster": {"where": "local", "gpus": 0}, "output": "/out/[a]", "run_error": "x [b]"},
        Console(file=buf, width=200))
    text = buf.getvalue()
    for shown in ("r[1]", "m[x]@1", "[red]odd 1", "/out/[a]", "x [b]"):
        assert shown in text, text


def test_runs_view_started_is_the_summarys_started_at(tmp_path):
    out = tmp_path / "out"
    summary = _run(out, "r1", 2, T0, tmp_path)  # rows are written now, long after T0
    got = run_query(str(out), "SELECT run_id, started, finished FROM runs").to_pylist()
    assert got == [{"run_id": "r1", "started": T0,
                    "finished": datetime.fromisoformat(summary["finished_at"])}]


def test_evaluate_reads_manifests_like_audit_and_train(tmp_path):
    """The shared MANIFEST.tsv (relative_path, no uri) is accepted; paths are relative to
    the manifest's folder, as train reads them."""
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a b.mp4").write_bytes(b"x")
    tsv = tmp_path / "MANIFEST.tsv"
    tsv.write_text("relative_path\tlabel\tsource_repo\tkind\n"
                   "videos/a b.mp4\tfake\tx/y\tvideo\nimages/c.jpg\treal\tx/y\timage\n")
    m = validate_eval_manifest(str(tsv))
    assert m["uri"].to_pylist() == [f"{tmp_path}/videos/a b.mp4", f"{tmp_path}/images/c.jpg"]
    assert m["media_id"].to_pylist() == ["videos/a b.mp4", "images/c.jpg"]
    assert m["label"].to_pylist() == ["fake", "real"]
    no_uri = tmp_path / "bad.csv"
    no_uri.write_text("path,label\n/a.mp4,fake\n")
    with pytest.raises(ManifestError, match="no 'uri' column"):
        validate_eval_manifest(str(no_uri))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_evaluate_without_a_uri_column_exits_2_every_time(tmp_path):
    """Once seen aborting (SIGABRT, exit 134) after printing its error 3 times in 36."""
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\n/a.mp4,fake\n/b.mp4,real\n")
    env = {**os.environ, "COLUMNS": "200"}
    for i in range(10):
        proc = subprocess.run([sys.executable, "-m", "deepaudit.jobs.cli", "evaluate", str(bad),
                               "-o", str(tmp_path / f"ev{i}")], capture_output=True, text=True,
                              timeout=120, env=env)
        assert proc.returncode == 2, (i, proc.returncode, proc.stderr[-2000:])
        assert "no 'uri' column" in proc.stderr and "Traceback" not in proc.stderr
        assert "terminate called" not in proc.stderr
        assert not (tmp_path / f"ev{i}").exists()  # stopped before any work
