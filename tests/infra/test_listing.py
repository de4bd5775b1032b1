"""Listing archives: globs, media types by extension and magic bytes, streaming pages,
local folders and S3 prefixes, and the ``deepaudit manifest`` command."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from deepaudit.infra.listing import (
    LISTING_SCHEMA,
    ListingConfig,
    ListingStats,
    glob_match,
    iter_listing,
    listing_table,
    media_type_by_magic,
    write_manifest,
)
from deepaudit.infra.storage import StorageConfig
from deepaudit.jobs.cli import app
from deepaudit.pipeline.manifest import read_manifest
from deepaudit.pipeline.schema import RESERVED_COLUMNS

from ..s3proxy import FaultProxy

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("*.mp4", "a.mp4", True),
        ("*.mp4", "deep/er/a.mp4", True),  # no slash: matches the base name too
        ("*.mp4", "a.mp4.txt", False),
        ("videos/*.mp4", "videos/a.mp4", True),
        ("videos/*.mp4", "videos/x/a.mp4", False),  # * stays in one folder
        ("videos/**/*.mp4", "videos/a.mp4", True),  # **/ may match no folder
        ("videos/**/*.mp4", "videos/x/y/a.mp4", True),
        ("videos/**", "videos/x/y/a.jpg", True),
        ("videos/**", "images/a.jpg", False),
        ("cam[12]/*", "cam1/a.jpg", True),
        ("cam[!12]/*", "cam1/a.jpg", False),
        ("cam?/*", "cam3/a.jpg", True),
    ],
)
def test_glob_semantics(pattern, key, expected):
    assert glob_match(pattern, key) is expected


def test_magic_bytes(media):
    assert media_type_by_magic(media["face_video"].read_bytes()[:512]) == "video"
    assert media_type_by_magic(media["odd_codec"].read_bytes()[:512]) == "video"  # Matroska
    assert media_type_by_magic(media["face_image"].read_bytes()[:512]) == "image"  # JPEG
    assert media_type_by_magic(media["face_png"].read_bytes()[:512]) == "image"
    assert media_type_by_magic(b"this is a text file") is None
    assert media_type_by_magic(b"") is None


def _archive(root: Path, media) -> Path:
    """A small archive: media by extension, extensionless media, non-media, hidden files."""
    (root / "videos" / "cam1").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "misc").mkdir()
    (root / ".cache").mkdir()
    shutil.copy(media["face_video"], root / "videos" / "cam1" / "a.mp4")
    shutil.copy(media["odd_codec"], root / "videos" / "b.mkv")
    shutil.copy(media["face_image"], root / "images" / "c.jpg")
    shutil.copy(media["face_png"], root / "images" / "d.PNG")
    shutil.copy(media["face_image"], root / "misc" / "scan0001")  # JPEG without extension
    shutil.copy(media["face_video"], root / "misc" / "clip")  # MP4 without extension
    (root / "misc" / "README").write_text("not media\n")
    (root / "misc" / "notes.txt").write_text("not media either\n")
    shutil.copy(media["face_image"], root / ".cache" / "hidden.jpg")
    shutil.copy(media["face_image"], root / "images" / ".partial.jpg")
    return root


def test_local_listing_types_globs_hidden_and_pages(media, tmp_path):
    root = _archive(tmp_path / "arch", media)
    stats = ListingStats()
    batches = list(iter_listing(str(root), config=ListingConfig(page_size=2), stats=stats))
    assert len(batches) >= 3 and all(b.schema == LISTING_SCHEMA for b in batches)
    rows = {Path(r["uri"]).relative_to(root).as_posix(): r
            for b in batches for r in b.to_pylist()}
    assert set(rows) == {"videos/cam1/a.mp4", "videos/b.mkv", "images/c.jpg", "images/d.PNG",
                         "misc/scan0001", "misc/clip"}
    assert rows["misc/scan0001"]["media_type"] == "image"
    assert rows["misc/clip"]["media_type"] == "video"
    assert rows["images/d.PNG"]["media_type"] == "image"
    a = root / "videos" / "cam1" / "a.mp4"
    assert rows["videos/cam1/a.mp4"]["size"] == a.stat().st_size
    assert rows["videos/cam1/a.mp4"]["etag"] is None
    mtime = rows["videos/cam1/a.mp4"]["mtime"]
    assert int(mtime.timestamp() * 1e6) == pytest.approx(a.stat().st_mtime_ns // 1000, abs=1)
    assert (stats.listed, stats.kept, stats.not_media, stats.sniffed) == (8, 6, 2, 3)
    assert stats.by_type == {"video": 3, "image": 3}

    only = listing_table(str(root), config=ListingConfig(include=("videos/**",),
                                                         exclude=("*.mkv",)))
    assert [Path(u).name for u in only["uri"].to_pylist()] == ["a.mp4"]
    images = listing_table(str(root), config=ListingConfig(media_types=("image",), sniff=False))
    assert sorted(Path(u).name for u in images["uri"].to_pylist()) == ["c.jpg", "d.PNG"]
    with pytest.raises(FileNotFoundError):
        listing_table(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="--media-type must be video or image"):
        ListingConfig(media_types=("audio",))


def test_manifest_command_local_and_audit_reads_it(media, tmp_path):
    root = _archive(tmp_path / "arch", media)
    out = tmp_path / "m" / "archive.parquet"
    result = runner.invoke(app, ["manifest", str(root), "-o", str(out), "--exclude", "misc/**",
                                 "--json"])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts["kept"] == 4 and counts["excluded"] == 4
    t = pq.read_table(out)
    assert t.schema.equals(LISTING_SCHEMA) and t.num_rows == 4
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left
    manifest = read_manifest(str(out), RESERVED_COLUMNS)
    assert manifest["media_id"].to_pylist() == manifest["uri"].to_pylist()
    # Nothing to list: exit 1 with a message.
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["manifest", str(tmp_path / "empty"), "-o",
                                 str(tmp_path / "e.parquet")])
    assert result.exit_code == 1 and "no media found" in result.output
    result = runner.invoke(app, ["manifest", str(root), "-o", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "Parquet" in result.output


@pytest.mark.s3
def test_s3_listing_streams_pages(media, s3_server, s3fs_client, tmp_path):
    for i in range(7):
        s3fs_client.put(str(media["face_image"]), f"audit/lst/day{i % 2}/img{i}.jpg")
    s3fs_client.put(str(media["face_video"]), "audit/lst/day0/clip")  # extensionless video
    s3fs_client.pipe("audit/lst/day0/notes.txt", b"text")
    s3fs_client.pipe("audit/lst-other/x.jpg", b"not under the prefix")
    proxy = FaultProxy(s3_server).start()
    try:
        storage = StorageConfig(endpoint_url=proxy.endpoint)
        pages = iter_listing("s3://audit/lst", storage, ListingConfig(page_size=3))
        first = next(pages)
        # Lazy: one ListObjectsV2 request for the first page, not the whole prefix.
        assert proxy.listings == 1 and first.num_rows <= 3
        rest = list(pages)
        assert proxy.listings == 3  # 9 keys, 3 a page
        rows = [r for b in [first, *rest] for r in b.to_pylist()]
        uris = sorted(r["uri"] for r in rows)
        assert len(uris) == 8 and "s3://audit/lst/day0/clip" in uris
        assert all(r["etag"] and r["size"] > 0 and r["mtime"] is not None for r in rows)
        assert {r["uri"]: r["media_type"] for r in rows}["s3://audit/lst/day0/clip"] == "video"
        # The sniff was a range read of a few hundred bytes, not the object.
        clip_bytes = proxy.bytes_by_key["/audit/lst/day0/clip"]
        assert 0 < clip_bytes <= 4096 < os.path.getsize(media["face_video"])

        stats = write_manifest("s3://audit/lst/", "s3://audit/manifests/lst.parquet", storage,
                               ListingConfig(include=("day1/*",)))
        assert stats.kept == 3
        with s3fs_client.open("audit/manifests/lst.parquet", "rb") as f:
            t = pq.read_table(f)
        expected = [f"s3://audit/lst/day1/img{i}.jpg" for i in (1, 3, 5)]
        assert sorted(t["uri"].to_pylist()) == expected
    finally:
        proxy.stop()


def test_write_manifest_streams_row_groups(tmp_path):
    """Memory stays flat: rows are flushed in row groups as pages arrive."""
    root = tmp_path / "many"
    root.mkdir()
    for i in range(250):
        (root / f"f{i:04d}.jpg").write_bytes(b"\xff\xd8\xff" + bytes(10))
    out = tmp_path / "many.parquet"
    stats = write_manifest(str(root), str(out), config=ListingConfig(page_size=20),
                           row_group_rows=100)
    meta = pq.ParquetFile(out).metadata
    assert stats.kept == meta.num_rows == 250
    assert meta.num_row_groups == 3  # 100 + 100 + 50, written as the listing streamed
