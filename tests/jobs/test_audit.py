"""The audit job end to end on a local 2-CPU Ray: real FFmpeg, RetinaFace and model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepaudit.infra.storage import StorageConfig
from deepaudit.pipeline.audit import AuditConfig, run_audit
from deepaudit.pipeline.manifest import read_manifest
from deepaudit.pipeline.schema import RESERVED_COLUMNS, STAGE_VERDICT_SCHEMA, VERDICT_SCHEMA
from deepaudit.pipeline.writer import VerdictWriter, read_verdicts

from ..conftest import EXPECTED

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _write_manifest(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _check_ok_row(r: dict) -> None:
    assert r["error"] is None, r
    assert 0.0 < r["p_fake"] < 1.0 and r["verdict"] in ("fake", "real")
    assert r["verdict"] == ("fake" if r["p_fake"] >= r["threshold"] else "real")
    assert 0.0 <= r["margin"] <= 1.0
    assert len(r["frame_p_fake"]) == r["n_frames_with_face"] == len(r["frame_indices"]) >= 1
    assert r["model"].startswith("resnext_lstm_tiny@") and len(r["model_sha256"]) == 64


def test_bad_input_matrix_rows_out_equal_rows_in(ray_local, tiny_model, media, tmp_path):
    rows = [{"uri": str(media[name]), "media_id": name, "camera": f"cam-{i}"}
            for i, name in enumerate(sorted(EXPECTED))]
    rows.append({"uri": "", "media_id": "blank-uri", "camera": "none"})
    manifest = _write_manifest(tmp_path / "manifest.csv", rows)
    summary = run_audit(AuditConfig(manifest=str(manifest), output=str(tmp_path / "out"),
                                    model=str(tiny_model), frames=4))
    table = read_verdicts(summary["output"])
    assert table.num_rows == len(rows) == summary["rows_in"] == summary["rows_out"]
    assert summary["state"] == "completed" and summary["lost_rows"] == 0
    assert summary["frames"] == 4  # --frames over the card's 8
    # The documented schema, then the manifest's extra column.
    assert table.schema.names[: len(VERDICT_SCHEMA)] == VERDICT_SCHEMA.names
    assert table.schema.names[len(VERDICT_SCHEMA):] == ["camera"]
    by_id = {r["media_id"]: r for r in table.to_pylist()}
    assert by_id["blank-uri"]["status"] == "error"
    for i, name in enumerate(sorted(EXPECTED)):
        r = by_id[name]
        status, code = EXPECTED[name]
        assert r["status"] == status, (name, r["error"])
        assert r["camera"] == f"cam-{i}" and r["run_id"] == summary["run_id"]
        if status == "ok":
            _check_ok_row(r)
        else:
            assert r["verdict"] is None and r["p_fake"] is None
            assert r["error"].startswith(code + ":"), r["error"]
    assert summary["status"] == {
        "ok": sum(s == "ok" for s, _ in EXPECTED.values()),
        "no_face": sum(s == "no_face" for s, _ in EXPECTED.values()),
        "error": sum(s == "error" for s, _ in EXPECTED.values()) + 1,
    }
    assert summary["error_codes"]["not_media"] == 3
    on_disk = json.loads(Path(summary["output"], "_summary.json").read_text())
    assert on_disk["run_id"] == summary["run_id"]
    latest = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert latest["run_id"] == summary["run_id"]


def test_untrained_model_withholds_verdicts(ray_local, media, tmp_path):
    manifest = _write_manifest(tmp_path / "m.csv", [{"uri": str(media["face_image"])}])
    summary = run_audit(AuditConfig(manifest=str(manifest), output=str(tmp_path / "out"),
                                    model="resnext_lstm_tiny"))
    (row,) = read_verdicts(summary["output"]).to_pylist()
    assert summary["model_trained"] is False and summary["model"].endswith("@untrained")
    assert row["status"] == "ok" and row["verdict"] is None
    assert row["error"].startswith("untrained_model:") and 0.0 < row["p_fake"] < 1.0


def test_two_runs_never_overwrite_each_other(ray_local, tiny_model, media, tmp_path):
    manifest = _write_manifest(tmp_path / "m.csv", [{"uri": str(media["face_png"])}])
    out = tmp_path / "out"
    a = run_audit(AuditConfig(manifest=str(manifest), output=str(out), model=str(tiny_model)))
    b = run_audit(AuditConfig(manifest=str(manifest), output=str(out), model=str(tiny_model)))
    assert a["run_id"] != b["run_id"]
    assert read_verdicts(a["output"]).num_rows == read_verdicts(b["output"]).num_rows == 1
    # Both runs queryable together with pyarrow, as the README shows.
    assert pq.read_table(out / "runs").num_rows == 2


CRASH_HOOK = """
import os

from deepaudit.pipeline import stages

_process = stages.DecodeCropStage.process


def _die_on_poison(self, row):
    if "POISON" in (row.get("uri") or ""):
        os._exit(1)  # the worker process dies, as on a native crash or the OOM killer
    return _process(self, row)


def install():
    stages.DecodeCropStage.process = _die_on_poison
"""

CRASH_DRIVER = """
import json, sys

import ray

from deepaudit.pipeline.audit import AuditConfig, run_audit

ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
         log_to_driver=False, runtime_env={"worker_process_setup_hook": "crashhook.install"})
try:
    for manifest, out in zip(sys.argv[2::2], sys.argv[3::2]):
        summary = run_audit(AuditConfig(manifest=manifest, output=out, model=sys.argv[1],
                                        frames=4, evidence=False))
        print("SUMMARY " + json.dumps(summary, default=str), flush=True)
finally:
    ray.shutdown()
"""


@pytest.mark.slow
def test_an_input_that_kills_its_worker_every_time_becomes_a_lost_row(tiny_model, media,
                                                                      tmp_path):
    """Fault injection (the test's own Ray, in a subprocess): the decode worker dies on one
    input, on every attempt. Ray Data's defaults retried it forever and the audit never
    ended; now the item becomes a ``lost`` error row after its retries and the run goes on.
    Each death also fails the items queued on the same actor (its other thread, and up to
    twice its calls in flight), so in CI all three items beside the poison were once lost
    with it; they run again, each alone in its worker, and come back ``ok``."""
    import os
    import shutil
    import subprocess
    import sys

    from deepaudit.pipeline.dataset import ISOLATED_RETRIES, TASK_RETRIES

    (tmp_path / "crashhook.py").write_text(CRASH_HOOK)
    (tmp_path / "driver.py").write_text(CRASH_DRIVER)
    poison = tmp_path / "POISON.mp4"
    shutil.copy(media["face_video"], poison)
    good = ["face_video", "face_image", "face_video_2", "face_png"]
    rows = [{"uri": str(media[name]), "media_id": name} for name in good]
    rows.insert(1, {"uri": str(poison), "media_id": "poison"})
    manifest = _write_manifest(tmp_path / "m.csv", rows)
    # Every item kills its worker: the stages are broken, and the run says it failed.
    all_poison = _write_manifest(tmp_path / "all.csv", [{"uri": str(poison)}])
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "driver.py"), str(tiny_model),
         str(manifest), str(tmp_path / "out"), str(all_poison), str(tmp_path / "out2")],
        env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, broken = [json.loads(ln.removeprefix("SUMMARY "))
                       for ln in proc.stdout.splitlines() if ln.startswith("SUMMARY ")]
    assert broken["state"] == "failed" and broken["rows_out"] == 1 and broken["lost_rows"] == 1
    assert broken["run_error"].startswith("no item came back from the pipeline")
    assert broken["retried_alone"] == 0  # broken stages: nothing is worth running again

    assert summary["state"] == "completed" and summary["rows_out"] == summary["rows_in"] == 5
    by_id = {r["media_id"]: r for r in read_verdicts(summary["output"]).to_pylist()}
    assert by_id["poison"]["status"] == "error"
    error = by_id["poison"]["error"]
    assert error.startswith("lost: its task failed for good:"), error
    assert (f"died on each of {1 + TASK_RETRIES} attempts beside other items and on each of "
            f"{1 + ISOLATED_RETRIES} attempts alone") in error
    # Whatever the poison took down with it ran again alone, and every good item is scored.
    assert {name: by_id[name]["status"] for name in good} == dict.fromkeys(good, "ok"), \
        {n: by_id[n]["error"] for n in good}
    assert summary["lost_rows"] == 1 and 1 <= summary["retried_alone"] <= 5


def test_writer_fills_rows_the_pipeline_lost(tmp_path):
    """The driver's safety net: rows missing from the pipeline become error rows."""
    p = tmp_path / "m.csv"
    p.write_text("uri,media_id,site\n/a.mp4,a,x\n/b.mp4,b,y\n/c.mp4,c,z\n")
    manifest = read_manifest(str(p), RESERVED_COLUMNS)
    w = VerdictWriter(str(tmp_path / "run"), StorageConfig(), manifest, "r1", 1)
    got = {n: [None] for n in STAGE_VERDICT_SCHEMA.names}
    got.update(manifest_row=[1], media_id=["b"], uri=["/b.mp4"], status=["no_face"],
               frame_indices=[[]], face_boxes=[[]], frame_p_fake=[[]])
    w.write(pa.table(got, schema=STAGE_VERDICT_SCHEMA))
    w.write(pa.table(got, schema=STAGE_VERDICT_SCHEMA))  # a retried task repeats a row
    assert w.fill_missing(manifest, "actor died") == 2
    w.close()
    t = read_verdicts(str(tmp_path / "run"))
    assert t.column("media_id").to_pylist() == ["a", "b", "c"]
    assert t.column("status").to_pylist() == ["error", "no_face", "error"]
    assert t.column("error").to_pylist()[0] == "lost: actor died"
    assert t.column("site").to_pylist() == ["x", "y", "z"]
    assert len(w.files) == 2  # files roll between batches once 1 row is reached


def test_writer_groups_small_batches_into_few_row_groups(tmp_path, monkeypatch):
    """The pipeline hands over one or two rows at a time; files must not be made of
    thousands of one-row groups."""
    import deepaudit.pipeline.writer as writer

    monkeypatch.setattr(writer, "ROW_GROUP_ROWS", 8)
    n = 45
    p = tmp_path / "m.csv"
    p.write_text("uri,media_id\n" + "".join(f"/{i}.mp4,m{i}\n" for i in range(n)))
    manifest = read_manifest(str(p), RESERVED_COLUMNS)
    w = VerdictWriter(str(tmp_path / "run"), StorageConfig(), manifest, "r1", 20)
    for start in range(0, n, 2):
        rows = list(range(start, min(start + 2, n)))
        got = {name: [None] * len(rows) for name in STAGE_VERDICT_SCHEMA.names}
        got.update(manifest_row=rows, media_id=[f"m{i}" for i in rows],
                   uri=[f"/{i}.mp4" for i in rows], status=["no_face"] * len(rows),
                   frame_indices=[[]] * len(rows), face_boxes=[[]] * len(rows),
                   frame_p_fake=[[]] * len(rows))
        w.write(pa.table(got, schema=STAGE_VERDICT_SCHEMA))
    w.close()
    files = sorted((tmp_path / "run").glob("verdicts-*.parquet"))
    groups = [[pq.ParquetFile(f).metadata.row_group(i).num_rows
               for i in range(pq.ParquetFile(f).metadata.num_row_groups)] for f in files]
    # Files roll at the first batch after 20 rows; each file's rows go out 8 at a time.
    assert groups == [[8, 8, 4], [8, 8, 4], [5]]
    t = read_verdicts(str(tmp_path / "run"))
    assert t.column("media_id").to_pylist() == [f"m{i}" for i in range(n)]


@pytest.mark.s3
def test_audit_on_s3_manifest_and_output(ray_local, tiny_model, media, s3_server, s3fs_client):
    names = ["face_video", "face_image", "no_face_image", "not_media"]
    for n in names:
        s3fs_client.put(str(media[n]), f"audit/archive/{media[n].name}")
    body = "uri,media_id,label\n" + "".join(
        f"s3://audit/archive/{media[n].name},{n},\n" for n in names) + "s3://audit/archive/gone.mp4,gone,\n"
    s3fs_client.pipe("audit/manifest.csv", body.encode())
    summary = run_audit(AuditConfig(manifest="s3://audit/manifest.csv", output="s3://audit/results",
                                    model=str(tiny_model), frames=4,
                                    storage=StorageConfig(endpoint_url=s3_server)))
    assert summary["output"].startswith("s3://audit/results/runs/")
    table = read_verdicts(summary["output"], StorageConfig(endpoint_url=s3_server))
    by_id = {r["media_id"]: r for r in table.to_pylist()}
    assert set(by_id) == set(names) | {"gone"}
    _check_ok_row(by_id["face_video"])
    _check_ok_row(by_id["face_image"])
    assert "etag=" in by_id["face_video"]["fingerprint"]
    assert by_id["no_face_image"]["status"] == "no_face"
    assert by_id["not_media"]["error"].startswith("not_media:")
    assert by_id["gone"]["error"].startswith("missing:")
    assert s3fs_client.exists("audit/results/_summary.json")
    # No presigned URL or key material leaks into the output.
    text = json.dumps(table.to_pylist(), default=str) + json.dumps(summary)
    assert "X-Amz-Signature" not in text and "deepaudit-test-secret" not in text


def _shared_manifest(shared_data: Path, tmp_path: Path, kinds=("video", "image")) -> Path:
    rows = []
    with (shared_data / "MANIFEST.tsv").open() as f:
        for r in csv.DictReader(f, delimiter="\t"):
            if r["kind"] in kinds:
                rows.append({"uri": str(shared_data / r["relative_path"]),
                             "media_id": r["relative_path"], "label": r["label"]})
    return _write_manifest(tmp_path / "shared.csv", rows)


@pytest.mark.slow
@pytest.mark.shared_data
def test_audit_all_shared_media(ray_local, tiny_model, shared_data, tmp_path):
    """Every video and image in ../shared/data, the faceless ones included."""
    manifest = _shared_manifest(shared_data, tmp_path)
    n_in = sum(1 for _ in manifest.open()) - 1
    summary = run_audit(AuditConfig(manifest=str(manifest), output=str(tmp_path / "out"),
                                    model=str(tiny_model), frames=4))
    table = read_verdicts(summary["output"])
    assert table.num_rows == n_in == summary["rows_out"]
    by_id = {r["media_id"]: r for r in table.to_pylist()}
    assert by_id["videos/unknown/deepsafe__sample_video_big_buck_bunny.mp4"]["status"] == "no_face"
    assert by_id["images/unknown/dlib__faces_dogs.jpg"]["status"] == "no_face"
    assert summary["status"]["error"] == 0, summary["error_codes"]
    ok = [r for r in by_id.values() if r["status"] == "ok"]
    assert len(ok) >= 0.9 * n_in
    for r in ok:
        _check_ok_row(r)
    videos = [r for r in ok if r["media_type"] == "video"]
    assert len(videos) == 15 and all(r["n_frames_sampled"] == 4 for r in videos)


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.s3
def test_audit_all_shared_media_on_s3(ray_local, tiny_model, shared_data, s3_server,
                                      s3fs_client, tmp_path):
    """The same media as objects on the S3 test server, the manifest there too, and the
    verdicts written back to it: one row per object, in the documented schema."""
    manifest = _shared_manifest(shared_data, tmp_path)
    rows = list(csv.DictReader(manifest.open()))
    for r in rows:
        s3fs_client.put(r["uri"], f"audit/shared/{r['media_id']}")
        r["uri"] = f"s3://audit/shared/{r['media_id']}"
    body = "uri,media_id,label\n" + "".join(
        f"{r['uri']},{r['media_id']},{r['label']}\n" for r in rows)
    s3fs_client.pipe("audit/shared.csv", body.encode())
    summary = run_audit(AuditConfig(manifest="s3://audit/shared.csv",
                                    output="s3://audit/shared-results", model=str(tiny_model),
                                    frames=4, storage=StorageConfig(endpoint_url=s3_server),
                                    evidence=False))
    table = read_verdicts(summary["output"], StorageConfig(endpoint_url=s3_server))
    assert table.num_rows == len(rows) == summary["rows_out"] and summary["lost_rows"] == 0
    assert table.schema.names[: len(VERDICT_SCHEMA)] == VERDICT_SCHEMA.names
    by_id = {r["media_id"]: r for r in table.to_pylist()}
    assert by_id["videos/unknown/deepsafe__sample_video_big_buck_bunny.mp4"]["status"] == "no_face"
    assert by_id["images/unknown/dlib__faces_dogs.jpg"]["status"] == "no_face"
    assert summary["status"]["error"] == 0, summary["error_codes"]
    ok = [r for r in by_id.values() if r["status"] == "ok"]
    assert len(ok) >= 0.9 * len(rows)
    for r in ok:
        _check_ok_row(r)
        assert "etag=" in r["fingerprint"]
    assert s3fs_client.exists("audit/shared-results/_summary.json")
