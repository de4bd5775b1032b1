"""The media-extension table (infra/mediatypes.py): every listed extension is one FFmpeg
here decodes, and the listing, the audit's decode and training's folder reader agree on
what each file is."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from PIL import Image

from deepaudit.infra.listing import listing_table
from deepaudit.infra.mediatypes import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, media_type_by_name
from deepaudit.infra.storage import StorageConfig
from deepaudit.pipeline.media import DecodeConfig, decode_sampled, open_source, probe
from deepaudit.training.datasets import load_inputs

# Encoders for containers whose default codec would not fit a tiny test clip.
CODECS = {".webm": ["-c:v", "libvpx"], ".ogv": ["-c:v", "libtheora"], ".wmv": ["-c:v", "wmv2"],
          ".flv": ["-c:v", "flv"], ".mxf": ["-c:v", "mpeg2video"], ".mpg": ["-c:v", "mpeg2video"],
          ".mpeg": ["-c:v", "mpeg2video"], ".3gp": ["-c:v", "mpeg4"]}


def _write(path: Path) -> None:
    ext = path.suffix
    if ext == ".avif":  # a still as libavif writes it (an image item, no movie box)
        Image.new("RGB", (128, 96), (180, 40, 40)).save(path)
        return
    # mandelbrot, not testsrc: testsrc's pure green bar reads as decoder fill (frame_defect)
    frames = ["-frames:v", "1"] if ext in IMAGE_EXTENSIONS else ["-frames:v", "6"]
    pix = [] if ext in IMAGE_EXTENSIONS + (".gif",) else ["-pix_fmt", "yuv420p"]
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f",
                    "lavfi", "-i", "mandelbrot=size=128x96:rate=25", *frames,
                    *CODECS.get(ext, []), *pix, str(path)], check=True)


def test_table_is_disjoint_lower_case_and_typed():
    assert not set(VIDEO_EXTENSIONS) & set(IMAGE_EXTENSIONS)
    for ext in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS:
        assert ext == ext.lower() and ext.startswith(".")
        assert media_type_by_name(f"s3://b/x/clip{ext.upper()}") in ("video", "image")
    assert media_type_by_name("a/notes.txt") is None
    assert media_type_by_name("a/photo.heic") is None  # FFmpeg 5.1 cannot open HEIF


def test_every_extension_decodes_and_the_three_readers_agree(tmp_path):
    root = tmp_path / "set"
    (root / "real").mkdir(parents=True)
    expected = {}
    for ext in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS:
        path = root / "real" / f"item{ext}"
        _write(path)
        expected[str(path)] = "video" if ext in VIDEO_EXTENSIONS else "image"
    (root / "real" / "notes.txt").write_text("not media")

    listed = listing_table(str(root))
    assert dict(zip(listed["uri"].to_pylist(), listed["media_type"].to_pylist())) == expected
    training = load_inputs([str(root)]).table
    assert dict(zip(training["uri"].to_pylist(),
                    training["media_type"].to_pylist())) == expected

    cfg = DecodeConfig(frames=2, max_side=128)
    for uri, kind in expected.items():
        with open_source(uri, StorageConfig(), cfg) as src:
            info = probe(src, uri, cfg)
            decoded = decode_sampled(src, info, cfg)
        assert info.media_type == kind, uri
        assert len(decoded.frames) == (1 if kind == "image" else 2), uri


@pytest.mark.parametrize("name", ["a.heic", "a.HEIC"])
def test_heic_is_not_listed(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(16))
    assert listing_table(str(tmp_path)).num_rows == 0
