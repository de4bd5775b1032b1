"""Hostile media: decompression bombs and a video that claims 10^9 frames.

Each is made here from valid pieces (real PNG chunks, a real ffmpeg encode whose
container is then patched), checked to be what it claims with ffprobe, and must become
one ``too_large`` row quickly and without the decoder allocating its declared size:
through the decode functions, a real audit on the local Ray, and ``deepaudit check``.
The per-item timeout and the size limits are covered here too."""

from __future__ import annotations

import csv
import dataclasses
import json
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from deepaudit.infra.storage import StorageConfig
from deepaudit.pipeline.media import (
    DecodeConfig,
    MediaError,
    decode_sampled,
    open_source,
    probe,
)

FRAMES_CLAIMED = 10**9


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_bomb(path: Path, width: int, height: int, bit_depth: int, colour: int) -> Path:
    """A valid PNG of ``width x height`` black pixels: each row is filter byte 0 and zeros,
    deflated a MiB at a time (zeros shrink about 1000x)."""
    channels = {0: 1, 2: 3}[colour]
    row = bytes(1 + (width * channels * bit_depth + 7) // 8)
    per_block = max(1, (1 << 20) // len(row))
    z = zlib.compressobj(9)
    parts, left = [], height
    while left:
        n = min(left, per_block)
        parts.append(z.compress(row * n))
        left -= n
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
                     + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b""))
    return path


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True)


def jpeg_bomb(path: Path, side: int) -> Path:
    """A real 64x64 JPEG whose frame header (SOF0) then claims ``side x side``."""
    small = path.with_name("small.jpg")
    _ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=64x64", "-frames:v", "1", str(small))
    data = bytearray(small.read_bytes())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, side, side)  # length(2) precision(1) height width
    path.write_bytes(bytes(data))
    return path


def webp_bomb(path: Path, side: int) -> Path:
    """A real 64x64 lossy WebP whose VP8 frame header then claims ``side x side``
    (14 bits each: 16,383 at most)."""
    small = path.with_name("small.webp")
    _ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=64x64", "-frames:v", "1", "-c:v", "libwebp",
            str(small))
    data = bytearray(small.read_bytes())
    start = data.index(b"\x9d\x01\x2a")  # the VP8 key frame start code, then width, height
    struct.pack_into("<HH", data, start + 3, side, side)
    if b"VP8X" in data:  # the extended header's canvas size, 24 bits each, minus one
        x = data.index(b"VP8X") + 8 + 4
        data[x: x + 3] = (side - 1).to_bytes(3, "little")
        data[x + 3: x + 6] = (side - 1).to_bytes(3, "little")
    path.write_bytes(bytes(data))
    return path


def _boxes(buf: bytes, start: int, end: int):
    while start < end:
        size, kind = struct.unpack(">I4s", buf[start: start + 8])
        yield kind, start
        if kind in (b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts"):
            yield from _boxes(buf, start + 8, start + size)
        start += size


def mp4_claiming_frames(path: Path, frames: int) -> Path:
    """A real 2 s 25 fps H.264 MP4 whose index then claims ``frames`` frames: the time to
    sample table (stts) counts them, and the movie, track and media headers and the edit
    list claim the longest duration their 32 bits hold."""
    # Gray: testsrc's pure green bar would pass for decoder fill (frame_defect).
    _ffmpeg("-f", "lavfi", "-i", "testsrc=s=160x120:r=25", "-t", "2", "-vf", "hue=s=0",
            "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path))
    b = bytearray(path.read_bytes())
    for kind, at in list(_boxes(bytes(b), 0, len(b))):
        body = at + 8
        if kind == b"stts":  # version/flags, entry count (1), then (sample count, delta)
            assert struct.unpack(">I", b[body + 4: body + 8])[0] == 1
            struct.pack_into(">I", b, body + 8, frames)
        elif kind in (b"mvhd", b"mdhd"):  # v0: flags, created, modified, timescale, duration
            struct.pack_into(">I", b, body + 16, 0xFFFFFFFF)
        elif kind == b"tkhd":  # v0: flags, created, modified, track id, reserved, duration
            struct.pack_into(">I", b, body + 20, 0xFFFFFFFF)
        elif kind == b"elst":  # v0: flags, entry count, segment duration
            struct.pack_into(">I", b, body + 8, 0xFFFFFFFF)
    path.write_bytes(bytes(b))
    return path


def ffprobe_stream(path: Path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "quiet", "-select_streams", "v:0", "-show_entries",
                          "stream=width,height,nb_frames,duration", "-of", "json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["streams"][0]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hostile")
    return {
        # Beyond what libavcodec decodes at all: ffprobe reports no size, only an error.
        "png_50k": png_bomb(d / "bomb-50000.png", 50_000, 50_000, 1, 0),
        # 256 MP, under libavcodec's own limit: without a pixel limit ffprobe decodes it
        # to learn its pixel format (~300 MB for this 250 KB file).
        "png_16k": png_bomb(d / "bomb-16000.png", 16_000, 16_000, 8, 0),
        "jpeg": jpeg_bomb(d / "bomb.jpg", 60_000),
        "webp": webp_bomb(d / "bomb.webp", 16_383),
        "frames": mp4_claiming_frames(d / "billion-frames.mp4", FRAMES_CLAIMED),
    }


EXPECTED_ERROR = {
    "png_50k": "50000x50000 exceeds the 80 MP limit",
    "png_16k": "16000x16000 exceeds the 80 MP limit",
    "jpeg": "60000x60000 exceeds the 80 MP limit",
    "webp": "16383x16383 exceeds the 80 MP limit",
    "frames": f"the video claims {FRAMES_CLAIMED:,} frames",
}


def test_the_hostile_files_claim_what_they_should(hostile):
    assert all(p.stat().st_size < 1_000_000 for p in hostile.values())
    claimed = ffprobe_stream(hostile["frames"])
    assert int(claimed["nb_frames"]) == FRAMES_CLAIMED
    assert float(claimed["duration"]) > 300_000  # 93 h, in a 10 KB file of 2 s
    assert (claimed["width"], claimed["height"]) == (160, 120)
    # ffprobe with no pixel limit decodes the 256 MP PNG to report its size.
    assert ffprobe_stream(hostile["png_16k"])["width"] == 16_000


@pytest.mark.parametrize("name", sorted(EXPECTED_ERROR))
def test_hostile_media_is_refused_as_too_large(hostile, name):
    cfg = DecodeConfig(frames=4)
    t0 = time.perf_counter()
    with pytest.raises(MediaError) as err, \
            open_source(str(hostile[name]), StorageConfig(), cfg) as src:
        info = probe(src, str(hostile[name]), cfg)
        decode_sampled(src, info, cfg)
    assert err.value.code == "too_large" and EXPECTED_ERROR[name] in str(err.value)
    assert time.perf_counter() - t0 < 10


PEAK_CHILD_RSS = """
import resource, sys
from deepaudit.infra.storage import StorageConfig
from deepaudit.pipeline.media import DecodeConfig, MediaError, open_source, probe
cfg = DecodeConfig(frames=4)
try:
    with open_source(sys.argv[1], StorageConfig(), cfg) as src:
        probe(src, sys.argv[1], cfg)
except MediaError as exc:
    print(exc.code)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
"""


def test_ffprobe_never_allocates_a_bombs_frame(hostile):
    """The 256 MP PNG: ffprobe decodes a PNG's first frame, so without the decoder's pixel
    limit it peaked at ~300 MB; with it, at what probing a small file costs."""
    out = subprocess.run([sys.executable, "-c", PEAK_CHILD_RSS, str(hostile["png_16k"])],
                         capture_output=True, text=True, check=True, timeout=60).stdout.split()
    assert out[0] == "too_large"
    assert int(out[1]) < 150, f"ffprobe peaked at {out[1]} MiB"


def test_a_billion_frames_under_a_raised_limit_still_ends_quickly(hostile):
    """With the frame limit raised past the claim, sampling picks 4 of 10^9 frames (never
    enumerating them), every seek lands past the real end, and the item ends at once."""
    cfg = DecodeConfig(frames=4, max_frames=2 * FRAMES_CLAIMED)
    t0 = time.perf_counter()
    with open_source(str(hostile["frames"]), StorageConfig(), cfg) as src:
        info = probe(src, "x.mp4", cfg)
        assert info.n_frames == FRAMES_CLAIMED
        with pytest.raises(MediaError) as err:
            decode_sampled(src, info, cfg)
    assert err.value.code == "decode_failed"
    assert time.perf_counter() - t0 < 20


def test_size_limits_are_configurable(media):
    with open_source(str(media["face_video"]), StorageConfig(), DecodeConfig(4)) as src:
        info = probe(src, "x.mp4", DecodeConfig(4, max_frames=50, max_pixels=1_000_000))
        assert info.n_frames == 50 and info.width * info.height <= 1_000_000
        with pytest.raises(MediaError, match="too_large: the video claims 50 frames"):
            probe(src, "x.mp4", DecodeConfig(4, max_frames=49))
        limit = f"too_large: {info.width}x{info.height} exceeds the 0.076799 MP limit"
        with pytest.raises(MediaError, match=limit):
            probe(src, "x.mp4", DecodeConfig(4, max_pixels=info.width * info.height - 1))
    with pytest.raises(ValueError):
        DecodeConfig(4, max_frames=0)


def test_one_deadline_covers_every_ffmpeg_run_of_an_item(media):
    """``timeout_s`` is per item: probe and every ffmpeg run of the decode share it, and
    a run still going when it ends is killed."""
    cfg = DecodeConfig(frames=4, max_side=160)
    with open_source(str(media["face_video"]), StorageConfig(), cfg) as src:
        assert src.deadline is not None
        info = probe(src, "x.mp4", cfg)
        spent = dataclasses.replace(src, deadline=time.monotonic() - 1)
        with pytest.raises(MediaError, match="timeout: decoding took longer than the 180 s"):
            decode_sampled(spent, info, cfg)
        with pytest.raises(MediaError, match="^timeout:"):
            probe(spent, "x.mp4", cfg)
        # Time left, but not enough for ffmpeg to start and decode: killed, not waited for.
        t0 = time.perf_counter()
        soon = dataclasses.replace(src, deadline=time.monotonic() + 0.005)
        # (On a loaded machine the 5 ms can be gone before ffmpeg starts: either stops it.)
        with pytest.raises(MediaError, match="^timeout: (ffmpeg was stopped after .* s: the "
                                             "item's 180 s limit ran out|decoding took)"):
            decode_sampled(soon, info, cfg)
        assert time.perf_counter() - t0 < 2


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_real_audit_gives_one_too_large_row_each(ray_local, tiny_model, media, hostile,
                                                   tmp_path):
    from deepaudit.pipeline.audit import AuditConfig, run_audit
    from deepaudit.pipeline.writer import read_verdicts

    rows = [{"uri": str(p), "media_id": name} for name, p in sorted(hostile.items())]
    rows.append({"uri": str(media["face_image"]), "media_id": "good"})
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["uri", "media_id"])
        w.writeheader()
        w.writerows(rows)
    summary = run_audit(AuditConfig(manifest=str(manifest), output=str(tmp_path / "out"),
                                    model=str(tiny_model), frames=4, evidence=False))
    by_id = {r["media_id"]: r for r in read_verdicts(summary["output"]).to_pylist()}
    assert summary["rows_out"] == summary["rows_in"] == len(rows) == len(by_id)
    assert summary["state"] == "completed" and summary["error_codes"] == {"too_large": 5}
    assert by_id["good"]["status"] == "ok"
    for name, expected in EXPECTED_ERROR.items():
        r = by_id[name]
        assert r["status"] == "error" and r["p_fake"] is None, r
        assert r["error"].startswith("too_large: ") and expected in r["error"], r["error"]
        assert r["fingerprint"] and r["size_bytes"] < 1_000_000


@pytest.mark.timeout(300)
def test_check_reports_each_as_too_large_and_exits_3(tiny_model, hostile, tmp_path):
    from typer.testing import CliRunner

    from deepaudit.jobs.cli import app

    runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    files = [str(hostile[name]) for name in sorted(EXPECTED_ERROR)]
    result = runner.invoke(app, ["check", *files, "--model", str(tiny_model), "--json",
                                 "--evidence-dir", str(tmp_path / "ev")])
    assert result.exit_code == 3, result.output
    doc = json.loads(result.stdout)
    assert [f["file"] for f in doc["files"]] == files
    for name, f in zip(sorted(EXPECTED_ERROR), doc["files"]):
        assert f["status"] == "error" and f["verdict"] is None
        assert f["error"].startswith("too_large: ") and EXPECTED_ERROR[name] in f["error"]
