"""Manifest reading and validation: formats, errors that say what to fix, carry-through."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepaudit.pipeline.manifest import ManifestError, read_manifest
from deepaudit.pipeline.schema import RESERVED_COLUMNS


def _read(path):
    return read_manifest(str(path), RESERVED_COLUMNS)


def test_csv_jsonl_parquet_agree(tmp_path):
    rows = [
        {"uri": "/a/1.mp4", "media_id": "007", "label": "fake", "camera": "north"},
        {"uri": "/a/2.jpg", "media_id": "008", "label": "real", "camera": "south"},
    ]
    (tmp_path / "m.csv").write_text(
        "uri,media_id,label,camera\n" + "".join(
            f"{r['uri']},{r['media_id']},{r['label']},{r['camera']}\n" for r in rows))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    tables = [_read(tmp_path / f"m.{ext}") for ext in ("csv", "jsonl", "parquet")]
    for t in tables:
        assert t.column("media_id").to_pylist() == ["007", "008"]  # ids stay strings
        assert t.column("camera").to_pylist() == ["north", "south"]
        assert t.column("manifest_row").to_pylist() == [0, 1]


def test_media_id_defaults_to_uri_and_clashing_columns_are_renamed(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("uri,status,p_fake\n/x/a.mp4,archived,0.1\n/x/b.mp4,new,0.2\n")
    t = _read(p)
    assert t.column("media_id").to_pylist() == ["/x/a.mp4", "/x/b.mp4"]
    assert "manifest_status" in t.column_names and "manifest_p_fake" in t.column_names
    assert "status" not in t.column_names


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("path,label\n/a.mp4,real\n", "no 'uri' column"),
        ("uri,label\n", "no rows"),
        ("", "is empty"),
        ("uri\n/a.mp4\n/b.mp4\n/a.mp4\n", "duplicate media ids"),
        ("uri,media_id\n/a.mp4,x\n/b.mp4,x\n", "'x' x2"),
    ],
)
def test_bad_manifests_raise_before_work(tmp_path, content, message):
    p = tmp_path / "m.csv"
    p.write_text(content)
    with pytest.raises(ManifestError, match=message):
        _read(p)


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(ManifestError, match="cannot tell the manifest format"):
        _read(tmp_path / "m.xlsx")
    with pytest.raises(ManifestError, match="not found"):
        _read(tmp_path / "nope.csv")


def test_empty_uri_row_is_kept_for_an_error_row(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"uri": "/a.mp4"}\n{"uri": null, "media_id": "blank"}\n')
    t = _read(p)
    assert t.column("uri").to_pylist() == ["/a.mp4", ""]
    assert t.num_rows == 2


@pytest.mark.s3
def test_manifest_on_s3(s3_server, s3fs_client):
    from deepaudit.infra.storage import StorageConfig

    s3fs_client.pipe("audit/manifests/m.csv", b"uri,label\ns3://audit/v/1.mp4,real\n")
    t = read_manifest("s3://audit/manifests/m.csv", RESERVED_COLUMNS,
                      StorageConfig(endpoint_url=s3_server))
    assert t.column("uri").to_pylist() == ["s3://audit/v/1.mp4"]
    assert t.column("label").to_pylist() == ["real"]
