"""Fetch, probe and sample-decode media with FFmpeg (ffmpeg-python + Debian's ffmpeg).

Videos and images take the same path; an image is a one-frame video.

* Local files are read in place. s3:// objects are read by ffmpeg through a presigned
  HTTP URL, so a sampled decode only fetches the byte ranges it needs and an MP4 whose
  index (``moov``) sits at the end still decodes (ffmpeg cannot seek a pipe).
* Frames are picked with ffmpeg's ``select`` filter *before* scaling and pixel-format
  conversion, so unused frames are decoded but never converted or shipped. When the
  sampled frames are far apart (long videos), each one is fetched with an input seek
  instead, which decodes only from the nearest keyframe.
* A sampled frame is the frame the video shows at that index, or it is not used
  (docs/decode.md): seeks tell the decoder the stream's x264 build; ffmpeg's error
  output is read on every decode; a seeked frame with a decode error, or one the cheap
  :func:`frame_defect` check flags (decoder fill green), makes the rest of the item
  decode sequentially (``seek+fallback``); a sequentially decoded frame that the check
  flags is dropped and reported (:class:`DecodedFrames`).
* Hostile inputs are refused before they cost anything: a frame size over
  ``max_pixels`` (also what a decoder would allocate for a decompression bomb: ffprobe
  and ffmpeg get the limit too, so neither allocates it) and a frame count over
  ``max_frames`` are ``too_large``; every ffmpeg run of an item shares one deadline.
* Every failure raises :class:`MediaError` with a short code (the row's ``error``
  starts with it) and ffmpeg's own message, with URL credentials redacted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import ffmpeg
import numpy as np

from deepaudit.infra.mediatypes import media_type_by_name
from deepaudit.infra.storage import StorageConfig, filesystem_for, is_s3, redact


class MediaError(Exception):
    """A media item cannot be audited. ``code`` is a stable short reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass(frozen=True)
class DecodeConfig:
    # Frames sampled per video: the model card's, validated there (ModelConfig); the
    # audit passes it in (pipeline.dataset.stage_configs), so it has no default here.
    frames: int
    # Decoded frames are scaled so their long side is at most this (faces are cropped
    # from these frames; detection runs on a smaller copy).
    max_side: int = 1920
    # Inputs above this many pixels per frame are refused rather than decoded (too_large).
    max_pixels: int = 80_000_000
    # Videos that claim more frames than this are refused (too_large): 46 h at 60 fps.
    max_frames: int = 10_000_000
    # Above this spacing between sampled frames, seek to each frame instead of decoding all.
    seek_spacing_s: float = 4.0
    # Per item: its ffprobe and every ffmpeg run of its decode share this budget.
    timeout_s: float = 180.0
    presign_expiry_s: int = 3600
    # Reads over HTTP (s3:// through presigned URLs): ffmpeg reconnects mid-stream by
    # itself; a call that fails on a transient error (5xx, reset) is rerun this often.
    http_retries: int = 3
    # Threads per ffmpeg process (decoder and filters). The pipeline decodes several items
    # at once, so one each is cheapest (docs/decode.md). 0: ffmpeg decides.
    ffmpeg_threads: int = 1

    def __post_init__(self) -> None:
        if self.ffmpeg_threads < 0:
            raise ValueError(f"ffmpeg_threads must be >= 0 (0: ffmpeg decides), got "
                             f"{self.ffmpeg_threads}")
        if self.max_side < 64:
            raise ValueError(f"max_side must be >= 64, got {self.max_side}")
        if self.max_pixels < 1 or self.max_frames < 1 or self.timeout_s <= 0:
            raise ValueError(f"max_pixels and max_frames must be >= 1 and timeout_s > 0, got "
                             f"{self.max_pixels}, {self.max_frames} and {self.timeout_s}")


@dataclass(frozen=True)
class Source:
    """Where ffmpeg reads the media from, and the input's fingerprint."""

    location: str  # a local path or an http(s) URL ffmpeg can read with range requests
    size_bytes: int
    fingerprint: str
    # time.monotonic() by which the item's ffprobe and ffmpeg runs must be done (None:
    # each run gets the whole DecodeConfig.timeout_s).
    deadline: float | None = None


@dataclass(frozen=True)
class MediaInfo:
    media_type: str  # "video" or "image"
    width: int  # display size, after rotation
    height: int
    n_frames: int  # exact or estimated from duration x frame rate
    fps: float
    duration_s: float
    codec: str


def media_type_of(uri: str) -> str:
    """``image`` for an image extension (infra/mediatypes.py); anything else is decoded as
    a video."""
    return "image" if media_type_by_name(uri) == "image" else "video"


def _sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def open_source(uri: str, storage: StorageConfig, config: DecodeConfig) -> Iterator[Source]:
    """Resolve ``uri`` to something ffmpeg can read; raise MediaError if it is missing."""
    if not uri:
        raise MediaError("bad_uri", "the manifest row has an empty uri")
    fs, path = filesystem_for(uri, storage)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise MediaError("missing", f"no such object: {uri}") from None
    except PermissionError as exc:
        raise MediaError("access_denied", redact(str(exc))) from None
    except Exception as exc:  # network, bad bucket name, etc.
        raise MediaError("fetch_failed", f"{type(exc).__name__}: {redact(str(exc))}") from None
    deadline = time.monotonic() + config.timeout_s
    if info.get("type") == "directory":
        raise MediaError("not_a_file", f"{uri} is a directory")
    size = int(info.get("size") or 0)
    if size == 0:
        raise MediaError("empty", f"{uri} is zero bytes")
    if is_s3(uri):
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        fingerprint = f"size={size};etag={etag}"
        url = fs.url(path, expires=config.presign_expiry_s)
        yield Source(location=url, size_bytes=size, fingerprint=fingerprint, deadline=deadline)
    else:
        mtime = os.stat(path).st_mtime
        fingerprint = f"size={size};mtime={mtime:.6f};sha256={_sha256_file(path)}"
        yield Source(location=path, size_bytes=size, fingerprint=fingerprint, deadline=deadline)


# ffmpeg/ffprobe messages that mean the network failed, not the media.
_TRANSIENT = re.compile(
    r"Server returned 5\d\d|5XX|Connection reset|Connection refused|Connection timed out|"
    r"Broken pipe|Input/output error|I/O error|End of file|Stream ends prematurely|"
    r"timed out|Network is unreachable|HTTP error 50[0-9]", re.I)


def _video_input(source: Source, config: DecodeConfig, **options):
    """The input's video stream for ffmpeg-python, with every decode's input options: quiet,
    ``config.ffmpeg_threads`` for the decoder and filter graph, the decoder's pixel limit,
    reconnects over HTTP."""
    n = config.ffmpeg_threads
    threads = {"threads": n, "filter_threads": n} if n else {}
    return ffmpeg.input(source.location, loglevel="error", max_pixels=config.max_pixels,
                        **threads, **options, **http_input_options(source.location)).video


def time_left(source: Source, config: DecodeConfig) -> float:
    """Seconds the item has left for its next ffmpeg run; ``timeout`` when none."""
    if source.deadline is None:
        return config.timeout_s
    left = source.deadline - time.monotonic()
    if left <= 0:
        raise MediaError("timeout", f"decoding took longer than the {config.timeout_s:g} s "
                                    "limit per item")
    return left


def http_input_options(location: str) -> dict:
    """ffmpeg input options that ride out dropped connections and 5xx answers mid-read."""
    if not location.startswith(("http://", "https://")):
        return {}
    return {"reconnect": 1, "reconnect_on_network_error": 1, "reconnect_on_http_error": "5xx",
            "reconnect_delay_max": 4}


def _retrying(location: str, config: DecodeConfig, call):
    """Run ``call()``; for HTTP inputs, rerun it on transient network errors."""
    attempts = 1 + (config.http_retries if location.startswith(("http://", "https://")) else 0)
    for attempt in range(attempts):
        try:
            return call()
        except (ffmpeg.Error, subprocess.CalledProcessError) as exc:
            text = (exc.stderr or b"").decode("utf-8", "replace")
            if attempt + 1 >= attempts or not _TRANSIENT.search(text):
                raise
            time.sleep(min(2.0, 0.2 * 2**attempt))
    raise AssertionError("unreachable")


def _ffmpeg_error(code: str, exc: ffmpeg.Error | subprocess.CalledProcessError) -> MediaError:
    stderr = (exc.stderr or b"").decode("utf-8", "replace").strip().splitlines()
    # ffmpeg's last lines carry the reason; the banner is noise.
    tail = " | ".join(line.strip() for line in stderr[-3:] if line.strip()) or "no message"
    return MediaError(code, redact(tail)[:500])


def _rate(text: str | None) -> float:
    try:
        value = float(Fraction(text)) if text and text != "0/0" else 0.0
    except (ValueError, ZeroDivisionError):
        value = 0.0
    return value


def _rotation(stream: dict) -> int:
    for side in stream.get("side_data_list", []) or []:
        if "rotation" in side:
            return int(float(side["rotation"]))
    return int(float((stream.get("tags") or {}).get("rotate", 0) or 0))


# What libavcodec says when a decoder refuses a frame size: over ``max_pixels``, or too
# large for it at all (``Picture size 50000x50000 is invalid``).
_PICTURE_SIZE = re.compile(r"Picture size (\d+)x(\d+) (?:exceeds|is invalid)")


def no_stdin(args: list[str]) -> list[str]:
    """``args`` with ffmpeg's ``-nostdin``: ffmpeg reads its standard input for interactive
    keys, and a Ray worker in a background process group of a terminal's session that
    touches the terminal is stopped by SIGTTIN (the run then hangs). ffprobe reads no keys."""
    if args and os.path.basename(args[0]) == "ffmpeg" and "-nostdin" not in args:
        return [args[0], "-nostdin", *args[1:]]
    return list(args)


def run_quiet(args: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run ffmpeg or ffprobe detached from any terminal (``-nostdin``, stdin from
    /dev/null), capturing both outputs: every ffmpeg the project starts goes through here."""
    return subprocess.run(no_stdin(args), stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=timeout, check=False)


def _ffprobe(source: Source, config: DecodeConfig) -> tuple[dict, str]:
    """ffprobe's streams and format as JSON, and its error output. The decoder gets the
    pixel limit: for some formats (PNG) ffprobe decodes the first frame to learn its pixel
    format, and a small bomb would otherwise allocate its whole declared frame here."""
    args = ["ffprobe", "-v", "error", "-max_pixels", str(config.max_pixels),
            *(a for k, v in http_input_options(source.location).items() for a in (f"-{k}", str(v))),
            "-show_format", "-show_streams", "-of", "json", source.location]

    def once() -> tuple[dict, str]:
        timeout = time_left(source, config)
        try:
            proc = run_quiet(args, timeout)
        except subprocess.TimeoutExpired:
            raise MediaError("timeout", f"ffprobe was stopped after {timeout:.3g} s: the "
                             f"item's {config.timeout_s:g} s limit ran out") from None
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, args, proc.stdout, proc.stderr)
        return json.loads(proc.stdout or b"{}"), proc.stderr.decode("utf-8", "replace")

    try:
        return _retrying(source.location, config, once)
    except subprocess.CalledProcessError as exc:
        refused = _PICTURE_SIZE.search((exc.stderr or b"").decode("utf-8", "replace"))
        if refused:  # some demuxers (H.264) fail outright when the decoder refuses
            raise _too_many_pixels(int(refused.group(1)), int(refused.group(2)), config) from None
        raise _ffmpeg_error("not_media", exc) from None


def _too_many_pixels(width: int, height: int, config: DecodeConfig) -> MediaError:
    return MediaError("too_large",
                      f"{width}x{height} exceeds the {config.max_pixels / 1e6:g} MP limit")


def probe(source: Source, uri: str, config: DecodeConfig) -> MediaInfo:
    """ffprobe the input: picks the first video stream and estimates its frame count.
    Refuses (``too_large``) a frame over ``max_pixels`` or more than ``max_frames``."""
    meta, stderr = _ffprobe(source, config)
    streams = [s for s in meta.get("streams", []) if s.get("codec_type") == "video"]
    # Cover art attached to audio files is a "video" stream of one picture: not a video.
    real = [s for s in streams if not (s.get("disposition") or {}).get("attached_pic")]
    if not real:
        kinds = sorted({s.get("codec_type", "?") for s in meta.get("streams", [])})
        raise MediaError("no_video_stream",
                         f"no video stream (streams: {', '.join(kinds) or 'none'})")
    s = real[0]
    width, height = int(s.get("width") or 0), int(s.get("height") or 0)
    if width <= 0 or height <= 0:
        refused = _PICTURE_SIZE.search(stderr)  # the decoder refused the declared size
        if refused:
            width, height = int(refused.group(1)), int(refused.group(2))
        else:
            raise MediaError("not_media",
                             f"video stream has no frame size ({s.get('codec_name')})")
    if width * height > config.max_pixels:
        raise _too_many_pixels(width, height, config)
    if abs(_rotation(s)) % 180 == 90:
        width, height = height, width
    fmt = meta.get("format", {})
    is_image = media_type_of(uri) == "image" or fmt.get("format_name", "").endswith("_pipe")
    fps = _rate(s.get("avg_frame_rate")) or _rate(s.get("r_frame_rate"))
    duration = float(s.get("duration") or fmt.get("duration") or 0.0)
    n_frames = int(s.get("nb_frames") or 0)
    if n_frames <= 0:
        n_frames = int(round(duration * fps)) if duration > 0 and fps > 0 else 1
    if is_image:
        n_frames, duration = 1, 0.0
    elif n_frames > config.max_frames:
        raise MediaError("too_large", f"the video claims {n_frames:,} frames "
                         f"({duration:,.0f} s), over the {config.max_frames:,}-frame limit")
    return MediaInfo(
        media_type="image" if is_image else "video",
        width=width,
        height=height,
        n_frames=max(1, n_frames),
        fps=fps,
        duration_s=duration,
        codec=str(s.get("codec_name") or "unknown"),
    )


def sample_indices(n_frames: int, k: int) -> list[int]:
    """``k`` evenly spaced frame indices (centres of k equal segments), unique, sorted."""
    k = max(1, min(k, n_frames))
    return sorted({min(n_frames - 1, int((i + 0.5) * n_frames / k)) for i in range(k)})


def output_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(2, int(round(width * scale))) // 2 * 2, max(2, int(round(height * scale))) // 2 * 2


def _run(args: list[str], timeout: float, location: str,
         config: DecodeConfig) -> tuple[bytes, str]:
    """Run ffmpeg; returns (stdout, stderr). Output with a failed exit is still output
    (a truncated input gives its first frames); no output at all is an error."""
    def once() -> tuple[bytes, str]:
        try:
            proc = run_quiet(args, timeout)
        except subprocess.TimeoutExpired:
            raise MediaError("timeout", f"ffmpeg was stopped after {timeout:.3g} s: the "
                             f"item's {config.timeout_s:g} s limit ran out") from None
        if proc.returncode != 0 and not proc.stdout:
            raise subprocess.CalledProcessError(proc.returncode, args, b"", proc.stderr)
        return proc.stdout, proc.stderr.decode("utf-8", "replace")

    try:
        return _retrying(location, config, once)
    except subprocess.CalledProcessError as exc:
        raise _ffmpeg_error("decode_failed", exc) from None


# Error-level lines ffmpeg prints when a decode starts at an open-GOP keyframe: the
# stream asks to unmark reference pictures from before the seek point, which the decoder
# never had. They change no pixel at or after the keyframe (docs/decode.md).
_ENTRY_POINT_NOISE = re.compile(r"mmco: unref (short|long) failure")


def decode_errors(stderr: str) -> list[str]:
    """ffmpeg's error-level lines that can mean wrong pixels (concealed macroblocks,
    missing references, damaged input), without the open-GOP entry-point noise."""
    lines = (line.strip() for line in stderr.splitlines())
    return [line for line in lines if line and not _ENTRY_POINT_NOISE.search(line)]


_X264_VERSION = re.compile(rb"x264 - core (\d+)")


def x264_build(source: Source, config: DecodeConfig) -> int | None:
    """The x264 version that encoded the stream, from the SEI of its first packet.

    ffmpeg's H.264 decoder works around bugs of old x264 builds only once it has seen
    that SEI, which is in the first frame alone, so a seek past it can decode garbage;
    passing the version back fixes the seek (docs/decode.md)."""
    args = (
        ffmpeg.input(source.location, loglevel="error", **http_input_options(source.location))
        .output("pipe:", map="0:v:0", c="copy", format="h264", vframes=1)
        .compile()
    )
    try:
        data, _ = _run(args, min(time_left(source, config), 60.0), source.location, config)
    except MediaError:
        return None  # the decode itself reports what is wrong with the input
    match = _X264_VERSION.search(data[:1 << 20])
    return int(match.group(1)) if match else None


# Decoder fill colour of a picture concealed from nothing: YUV (0, 0, 0), which converts
# to saturated green (RGB (0, 135..255, 0) by range and chroma format), the "green frame".
_GREEN_SHARE = 0.05  # share of the frame in fill green that marks it corrupt


def frame_defect(frame: np.ndarray) -> str | None:
    """A cheap check for decoder garbage that ffmpeg did not report; None if the frame
    looks like a picture. ``frame``: RGB uint8 [H, W, 3].

    The sign is a share of the frame in fill green; what it catches and misses is in
    docs/decode.md. Synthetic pictures with a pure green area are flagged too."""
    f = frame[::2, ::2]  # every other pixel is plenty for a share
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    green = float(np.mean((r <= 8) & (b <= 8) & (g >= 120)))
    if green >= _GREEN_SHARE:
        return f"corrupt: {green:.0%} of the frame is decoder fill green"
    return None


DECODE_SEEK, DECODE_SEQUENTIAL, DECODE_FALLBACK = "seek", "sequential", "seek+fallback"


@dataclass(frozen=True)
class DroppedFrame:
    frame: int  # the sampled frame index
    reason: str  # "corrupt: ..." (frame_defect) or "not_decoded: ..." (input ended early)


@dataclass(frozen=True)
class DecodedFrames:
    """What :func:`decode_sampled` returns: the frames used and how they were had."""

    indices: list[int]
    frames: np.ndarray  # RGB uint8 [k, H, W, 3], one per index
    mode: str  # DECODE_SEEK, DECODE_SEQUENTIAL or DECODE_FALLBACK
    # ffmpeg error lines that can mean wrong pixels (decode_errors), over every ffmpeg
    # run of the item, including seeks whose frames were then decoded again.
    warnings: int
    dropped: tuple[DroppedFrame, ...] = ()


def _seek_time(idx: int, info: MediaInfo, spacing: float) -> float:
    # Half a frame early: accurate seek keeps the first frame at or after the time, so
    # rounding can never skip to the next frame.
    if info.fps > 0:
        return max(0.0, (idx - 0.5) / info.fps)
    return idx * spacing


def _sequential(source: Source, info: MediaInfo, config: DecodeConfig, indices: list[int],
                w: int, h: int) -> tuple[list[bytes], list[str]]:
    """The frames at ``indices`` decoded from the start with the ``select`` filter."""
    stream = _video_input(source, config)
    if info.media_type == "video":
        stream = stream.filter("select", "+".join(f"eq(n,{i})" for i in indices))
    args = (
        stream.filter("scale", w, h)
        .output("pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough",
                vframes=len(indices))
        .compile()
    )
    raw, stderr = _run(args, time_left(source, config), source.location, config)
    size = w * h * 3
    return [raw[i: i + size] for i in range(0, len(raw) - size + 1, size)], decode_errors(stderr)


def decode_sampled(source: Source, info: MediaInfo, config: DecodeConfig) -> DecodedFrames:
    """Decode the sampled frames (see the module docstring for how they are checked).

    Truncated inputs may yield fewer frames than asked; zero frames is an error, and so is
    every frame dropped as corrupt."""
    indices = sample_indices(info.n_frames, config.frames)
    w, h = output_size(info.width, info.height, config.max_side)
    frame_bytes = w * h * 3
    spacing = (info.duration_s / len(indices)) if info.media_type == "video" else 0.0
    got: list[tuple[int, bytes]] = []
    dropped: list[DroppedFrame] = []
    warnings = 0
    rest = indices  # frames still to decode sequentially
    mode = DECODE_SEQUENTIAL
    if info.media_type == "video" and len(indices) > 1 and spacing >= config.seek_spacing_s:
        mode = DECODE_SEEK
        build = x264_build(source, config) if info.codec == "h264" else None
        decoder = {"x264_build": build} if build is not None else {}
        rest = []
        for k, idx in enumerate(indices):
            t = _seek_time(idx, info, spacing)
            args = (
                _video_input(source, config, ss=f"{t:.6f}", **decoder)
                .filter("scale", w, h)
                .output("pipe:", format="rawvideo", pix_fmt="rgb24", vframes=1)
                .compile()
            )
            try:
                data, stderr = _run(args, time_left(source, config), source.location, config)
                errors = decode_errors(stderr)
            except MediaError as exc:
                if exc.code != "decode_failed":
                    raise
                data, errors = b"", [str(exc)]  # ffmpeg failed on this seek: fall back
            warnings += len(errors)
            if len(data) < frame_bytes and not errors:
                # Past the end (the frame count was an estimate).
                dropped.append(DroppedFrame(idx, "not_decoded: past the end of the input"))
                continue
            if not errors and frame_defect(
                    np.frombuffer(data[:frame_bytes], np.uint8).reshape(h, w, 3)) is None:
                got.append((idx, data[:frame_bytes]))
                continue
            # Seeking failed on this file once: the rest is decoded sequentially.
            mode, rest = DECODE_FALLBACK, indices[k:]
            break
    if rest:
        try:
            chunks, errors = _sequential(source, info, config, rest, w, h)
        except MediaError as exc:
            if mode == DECODE_SEQUENTIAL or exc.code != "decode_failed":
                raise
            chunks, errors = [], [str(exc)]  # keep the frames the seeks gave
        warnings += len(errors)
        missing = "not_decoded: the input ended before this frame"
        if not chunks and errors:
            missing = f"not_decoded: {errors[0][:200]}"
        for idx, data in zip(rest, chunks):
            defect = frame_defect(np.frombuffer(data, np.uint8).reshape(h, w, 3))
            if defect:
                dropped.append(DroppedFrame(idx, defect))
            else:
                got.append((idx, data))
        if len(chunks) < len(rest):
            dropped.extend(DroppedFrame(i, missing) for i in rest[len(chunks):])
    if not got:
        if dropped and any(d.reason.startswith("corrupt") for d in dropped):
            raise MediaError("corrupt_frames", f"every decoded frame was corrupt "
                             f"({len(dropped)} dropped: {dropped[0].reason})")
        raise MediaError("decode_failed", "ffmpeg produced no frames (corrupt or truncated input)")
    got.sort()
    frames = np.frombuffer(b"".join(d for _, d in got), np.uint8).reshape(len(got), h, w, 3)
    return DecodedFrames(indices=[i for i, _ in got], frames=frames, mode=mode,
                         warnings=warnings, dropped=tuple(dropped))


def decode_frames(
    source: Source, info: MediaInfo, config: DecodeConfig
) -> tuple[list[int], np.ndarray]:
    """Decode the sampled frames as RGB uint8 ``[k, H, W, 3]``; returns (indices, frames).
    :func:`decode_sampled` also says how they were decoded and which were dropped."""
    out = decode_sampled(source, info, config)
    return out.indices, out.frames
