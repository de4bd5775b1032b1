"""Synthetic face media for the demo, the tests and the benchmarks.

Everything is made from photos that ship inside installed packages (scikit-image and
matplotlib), so no download is needed: slow pan/zoom ("Ken Burns") clips of the photos
are the untouched media, and a landmark-aligned, colour-matched, Poisson-blended face
swap is the manipulated media.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import os
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import ffmpeg
import matplotlib
import numpy as np
import retinaface

Size = tuple[int, int]  # (width, height)
Box = tuple[float, float, float, float]  # x, y, width, height

MANIFEST_COLUMNS = ("uri", "media_id", "label", "kind", "note")
FAKE_PAIRS = (("grace_hopper", "astronaut"), ("astronaut", "grace_hopper"),
              ("cameraman", "astronaut"))  # (target, source): source's face onto target


def face_photos() -> dict[str, np.ndarray]:
    """RGB uint8 photos with one clearly visible human face each."""
    from skimage import data  # scikit-image is the optional "demo" dependency

    hopper = cv2.imread(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))
    return {
        "astronaut": data.astronaut(),
        "grace_hopper": cv2.cvtColor(hopper, cv2.COLOR_BGR2RGB),
        "cameraman": cv2.cvtColor(data.camera(), cv2.COLOR_GRAY2RGB),
    }


def no_face_photos() -> dict[str, np.ndarray]:
    """RGB uint8 photos without a human face: a cat and a cup of coffee."""
    from skimage import data

    return {"chelsea": data.chelsea(), "coffee": data.coffee()}


# --------------------------------------------------------------------------- encoding


def _same_shape(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """``first`` then ``rest``, checking every frame against the first one."""
    yield first
    for frame in rest:
        if frame.shape != first.shape or frame.dtype != first.dtype:
            raise ValueError(f"frame {frame.dtype} {frame.shape} differs from the first "
                             f"frame {first.dtype} {first.shape}")
        yield frame


def _quality_options(codec: str, crf: int) -> dict[str, object]:
    """Rate-control options: CRF where the encoder has it, a fixed quantiser otherwise."""
    if codec in ("libx264", "libx265"):
        return {"crf": crf, "preset": "veryfast"}
    if codec == "libvpx-vp9":
        return {"crf": crf, "b:v": 0, "deadline": "realtime", "cpu-used": 8, "row-mt": 1}
    # mpeg4 and other quantiser-based encoders: map CRF 0..51 onto q 2..31.
    return {"q:v": int(np.clip(round(crf / 51 * 31), 2, 31))}


def encode_clip(frames: Iterable[np.ndarray], path: str | os.PathLike, fps: float = 25,
                crf: int = 23, codec: str = "libx264", faststart: bool = False) -> Path:
    """Encode RGB uint8 frames (all the same even width and height) to ``path`` with ffmpeg.

    The container follows the file extension. Without ``faststart`` an MP4 keeps its
    index (``moov``) after the media data, as ffmpeg writes it by default.
    Raises ``ValueError`` for bad frames and ``RuntimeError`` (with ffmpeg's log) when
    ffmpeg fails.
    """
    path = Path(path)
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError("encode_clip needs at least one frame")
    h, w = first.shape[:2]
    if first.dtype != np.uint8 or first.shape != (h, w, 3) or h % 2 or w % 2:
        raise ValueError(f"frames must be uint8 RGB with even width and height, "
                         f"got {first.dtype} {first.shape}")
    options = {"vcodec": codec, "pix_fmt": "yuv420p", **_quality_options(codec, crf)}
    if faststart:
        options["movflags"] = "+faststart"
    cmd = (ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", framerate=fps)
           .output(str(path), **options)
           .global_args("-nostdin", "-loglevel", "error")  # never read keys from a terminal
           .overwrite_output()
           .compile())
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log)
        try:
            for frame in _same_shape(first, it):
                proc.stdin.write(np.ascontiguousarray(frame).data)
        except BrokenPipeError:
            pass  # ffmpeg stopped reading: its exit status and log say why
        except BaseException:
            proc.kill()
            proc.wait()
            path.unlink(missing_ok=True)
            raise
        finally:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            rc = proc.wait()
        if rc != 0:
            log.seek(0)
            tail = log.read()[-2000:].decode(errors="replace").strip()
            path.unlink(missing_ok=True)
            raise RuntimeError(f"ffmpeg failed (exit {rc}) writing {path}: {tail}")
    return path


# --------------------------------------------------------------------------- faces


@dataclass(frozen=True)
class _Face:
    box: Box
    landmarks: np.ndarray  # (5, 2) float32: right eye, left eye, nose, right/left mouth


def _detect_face(photo: np.ndarray) -> _Face | None:
    """The most confident RetinaFace detection in an RGB photo, or None."""
    faces = retinaface.detect_faces(np.ascontiguousarray(photo))
    if not faces:
        return None
    best = max(faces, key=lambda f: f.score)
    lms = np.array([(p.x, p.y) for p in best.landmarks], np.float32)
    return _Face((best.x, best.y, best.width, best.height), lms)


# --------------------------------------------------------------------------- Ken Burns


def _camera_path(photo_hw: tuple[int, int], box: Box | None, n_frames: int, size: Size,
                 seed: int) -> Iterator[tuple[np.ndarray, float]]:
    """Per frame, the 2x3 matrix mapping output pixels to photo pixels and a brightness gain.

    With a face box the face fills 30-45 % of the frame height and stays inside the view
    (with a margin) while it zooms and pans; without one the view zooms into the photo.
    The view never leaves the photo along a side where the photo is larger than it; along
    a side where it is smaller, the photo is centred between black bars (letterbox).
    """
    rng = np.random.default_rng(seed)
    out_wh = np.array(size, np.float64)
    photo_wh = np.array(photo_hw[::-1], np.float64)
    if box is None:
        cover = np.min(photo_wh / out_wh)  # photo pixels per output pixel
        scales = np.array([cover, cover / rng.uniform(1.08, 1.15)])
        centre, slack = photo_wh / 2, np.tile(photo_wh / 2, (2, 1))
    else:
        x, y, w, h = box
        fractions = rng.permutation([rng.uniform(0.30, 0.34), rng.uniform(0.40, 0.45)])
        scales = h / (fractions * out_wh[1])
        centre, face_wh = np.array([x + w / 2, y + h / 2]), np.array([w, h])
        # The face box plus a 10 % margin stays inside the view at both ends of the path,
        # hence all along it; keeping the view on the photo below never uncovers the face.
        slack = np.stack([out_wh * s / 2 - face_wh * 0.6 for s in scales])
    offsets = rng.uniform(-0.6, 0.6, (2, 2)) * np.maximum(slack, 0)
    phase = rng.uniform(0, 2 * np.pi)
    jitter = rng.uniform(-0.4, 0.4, (n_frames, 2))  # output pixels
    for i in range(n_frames):
        t = i / max(n_frames - 1, 1)
        t = t * t * (3 - 2 * t)  # ease in and out
        s = scales[0] + (scales[1] - scales[0]) * t
        half = out_wh * s / 2
        c = centre + offsets[0] + (offsets[1] - offsets[0]) * t + jitter[i] * s
        c = np.where(half <= photo_wh / 2, np.clip(c, half, photo_wh - half), photo_wh / 2)
        matrix = np.array([[s, 0, c[0] - s * (out_wh[0] - 1) / 2],
                           [0, s, c[1] - s * (out_wh[1] - 1) / 2]])
        gain = 1 + 0.06 * np.sin(phase + 2 * np.pi * i / max(n_frames, 50))
        yield matrix, gain


def _render(photo: np.ndarray, matrix: np.ndarray, gain: float, size: Size) -> np.ndarray:
    frame = cv2.warpAffine(photo, matrix, size, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    return cv2.convertScaleAbs(frame, alpha=gain)


def ken_burns_frames(photo: np.ndarray, seconds: float, fps: float = 25,
                     size: Size = (640, 360), seed: int = 0) -> Iterator[np.ndarray]:
    """RGB frames that slowly pan and zoom over ``photo`` (deterministic for a seed).

    The view is framed on the photo's face (found with RetinaFace) so that it stays fully
    visible at 30-45 % of the frame height; a photo without a face is zoomed into whole.
    """
    face = _detect_face(photo)
    n = max(1, round(seconds * fps))
    for matrix, gain in _camera_path(photo.shape[:2], face.box if face else None, n, size, seed):
        yield _render(photo, matrix, gain, size)


# --------------------------------------------------------------------------- face swap


@dataclass(frozen=True)
class _Swap:
    """A prepared face swap: the target, the target with the source face cloned in,
    the inner-face mask (uint8, 0/255) in target coordinates and the target's face."""

    target: np.ndarray
    cloned: np.ndarray
    mask: np.ndarray
    face: _Face


def _inner_face_mask(shape: tuple[int, ...], lms: np.ndarray) -> np.ndarray:
    """Convex hull of the landmarks extended to brows, cheeks and chin, grown by 10 %."""
    right_eye, left_eye, _, right_mouth, left_mouth = lms
    eyes, mouth = (right_eye + left_eye) / 2, (right_mouth + left_mouth) / 2
    down, across = mouth - eyes, left_eye - right_eye
    points = np.vstack([
        lms,
        right_eye - 0.45 * down - 0.15 * across, left_eye - 0.45 * down + 0.15 * across,  # brows
        right_eye + 0.5 * down - 0.3 * across, left_eye + 0.5 * down + 0.3 * across,  # cheeks
        mouth + 0.6 * down,  # chin
    ])
    centre = points.mean(axis=0)
    points = centre + (points - centre) * 1.1
    mask = np.zeros(shape[:2], np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(points.round().astype(np.int32)), 255)
    return mask


def _match_colours(source: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Shift and scale ``source`` per LAB channel to the target's statistics inside the mask."""
    src = cv2.cvtColor(source.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
    dst = cv2.cvtColor(target.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
    inside = mask > 0
    s_mean, s_std = src[inside].mean(axis=0), src[inside].std(axis=0) + 1e-3
    d_mean, d_std = dst[inside].mean(axis=0), dst[inside].std(axis=0)
    matched = cv2.cvtColor((src - s_mean) / s_std * d_std + d_mean, cv2.COLOR_LAB2RGB)
    return (np.clip(matched, 0, 1) * 255).round().astype(np.uint8)


def _prepare_swap(target: np.ndarray, source: np.ndarray) -> _Swap:
    """Align the source face to the target's landmarks and Poisson-clone it in."""
    t_face, s_face = _detect_face(target), _detect_face(source)
    if t_face is None or s_face is None:
        raise ValueError(f"no face found in the {'target' if t_face is None else 'source'} photo")
    # A reprojection threshold far above any landmark error keeps all five points as
    # inliers, so the final refinement is a least-squares similarity over all of them.
    matrix, _ = cv2.estimateAffinePartial2D(s_face.landmarks, t_face.landmarks,
                                            method=cv2.RANSAC, ransacReprojThreshold=1e4)
    h, w = target.shape[:2]
    warped = cv2.warpAffine(source, matrix, (w, h), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REFLECT)
    mask = _inner_face_mask(target.shape, t_face.landmarks)
    warped = _match_colours(warped, target, mask)
    # seamlessClone puts the mask's bounding box at (cx - w // 2, cy - h // 2): keep it in place.
    x, y, w_box, h_box = cv2.boundingRect(mask)
    centre = (x + w_box // 2, y + h_box // 2)
    # A copy: OpenCV 5's seamlessClone overwrites the mask it is given.
    cloned = cv2.seamlessClone(warped, target, mask.copy(), centre, cv2.NORMAL_CLONE)
    return _Swap(target, cloned, mask, t_face)


def _composite(swap: _Swap, shift: tuple[float, float], feather: float) -> np.ndarray:
    """Paste the cloned face over the target, shifted by ``shift`` px, with a soft mask."""
    h, w = swap.target.shape[:2]
    x, y, bw, bh = cv2.boundingRect(swap.mask)
    pad = int(3 * feather) + 2  # room for the blur and the shift
    x0, y0, x1, y1 = max(x - pad, 0), max(y - pad, 0), min(x + bw + pad, w), min(y + bh + pad, h)
    move = np.array([[1, 0, shift[0]], [0, 1, shift[1]]], np.float32)
    face = cv2.warpAffine(swap.cloned[y0:y1, x0:x1], move, (x1 - x0, y1 - y0),
                          borderMode=cv2.BORDER_REPLICATE)
    mask = cv2.warpAffine(swap.mask[y0:y1, x0:x1], move, (x1 - x0, y1 - y0))
    alpha = cv2.GaussianBlur(mask, (0, 0), feather).astype(np.float32)[..., None] / 255
    out = swap.target.copy()
    base = out[y0:y1, x0:x1].astype(np.float32)
    out[y0:y1, x0:x1] = (base + (face - base) * alpha).round().astype(np.uint8)
    return out


def _reblend_jitter(rng: np.random.Generator, face: _Face) -> tuple[tuple[float, float], float]:
    """A ±1 px shift and a mask feather of 2-5 % of the face height."""
    shift = tuple(rng.integers(-1, 2, 2).astype(float))
    return shift, float(rng.uniform(0.02, 0.05) * face.box[3])


def blend_face(target: np.ndarray, source: np.ndarray, seed: int = 0) -> np.ndarray:
    """``target`` with its inner face replaced by the face from ``source`` (RGB uint8).

    The source face is aligned on the five RetinaFace landmarks (similarity transform),
    colour-matched in LAB inside an inner-face mask and Poisson-blended in; ``seed``
    picks the small shift/feather jitter of the final paste. Raises ``ValueError`` when
    either photo has no face.
    """
    swap = _prepare_swap(target, source)
    return _composite(swap, *_reblend_jitter(np.random.default_rng(seed), swap.face))


def fake_clip_frames(target: np.ndarray, source: np.ndarray, seconds: float, fps: float = 25,
                     size: Size = (640, 360), seed: int = 0) -> Iterator[np.ndarray]:
    """Ken Burns frames over a face swap, re-blended every frame with a little jitter
    (±1 px shift, varying feather) so the pasted face flickers like real swaps do."""
    swap = _prepare_swap(target, source)
    rng = np.random.default_rng([seed, 1])
    n = max(1, round(seconds * fps))
    for matrix, gain in _camera_path(target.shape[:2], swap.face.box, n, size, seed):
        yield _render(_composite(swap, *_reblend_jitter(rng, swap.face)), matrix, gain, size)


# --------------------------------------------------------------------------- archive


def _write_image(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise RuntimeError(f"could not write {path}")
    return path


def _complete_manifest(manifest: Path) -> bool:
    """True when ``manifest`` exists and every file it lists exists."""
    if not manifest.is_file():
        return False
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return bool(rows) and all(Path(r["uri"]).is_file() for r in rows)


def build_demo_archive(dest: str | os.PathLike, seconds: float = 4.0, fps: int = 25) -> Path:
    """Build (once) a small labelled archive of real, fake, faceless and broken media.

    Returns ``dest/manifest.csv`` (columns ``uri`` as absolute paths, ``media_id``,
    ``label`` real/fake/empty, ``kind`` video/image, ``note``). When it already exists and
    every file it lists exists, it is returned as is. Prints nothing.
    """
    dest = Path(dest).resolve()
    manifest = dest / "manifest.csv"
    if _complete_manifest(manifest):
        return manifest
    faces, others = face_photos(), no_face_photos()
    rows: list[dict[str, str]] = []

    def add(path: Path, label: str, kind: str, note: str) -> None:
        rows.append({"uri": str(path), "media_id": path.relative_to(dest).as_posix(),
                     "label": label, "kind": kind, "note": note})

    for i, (name, photo) in enumerate(faces.items()):
        frames = ken_burns_frames(photo, seconds, fps, seed=i)
        clip = encode_clip(frames, dest / "real" / f"{name}.mp4", fps)
        add(clip, "real", "video", f"pan/zoom over the {name} photo")
    add(_write_image(dest / "real" / "grace_hopper.jpg", faces["grace_hopper"]), "real", "image",
        "untouched photo (JPEG)")
    add(_write_image(dest / "real" / "astronaut.png", faces["astronaut"]), "real", "image",
        "untouched photo (PNG)")

    for i, (target, source) in enumerate(FAKE_PAIRS):
        frames = fake_clip_frames(faces[target], faces[source], seconds, fps, seed=i)
        clip = encode_clip(frames, dest / "fake" / f"{target}_swap_{source}.mp4", fps)
        add(clip, "fake", "video", f"{source}'s face blended onto {target}, re-blended per frame")
    still = blend_face(faces["astronaut"], faces["grace_hopper"])
    add(_write_image(dest / "fake" / "astronaut_swap_grace_hopper.jpg", still), "fake", "image",
        "grace_hopper's face blended onto astronaut (JPEG)")

    frames = itertools.chain(ken_burns_frames(others["chelsea"], seconds / 2, fps),
                             ken_burns_frames(others["coffee"], seconds / 2, fps, seed=1))
    add(encode_clip(frames, dest / "noface" / "chelsea_coffee.mp4", fps), "", "video",
        "a cat, then a cup of coffee: no human face")
    add(_write_image(dest / "noface" / "coffee.jpg", others["coffee"]), "", "image",
        "a cup of coffee: no human face")

    broken = dest / "broken"
    broken.mkdir(parents=True, exist_ok=True)
    good = (dest / "real" / "astronaut.mp4").read_bytes()
    truncated = broken / "truncated.mp4"
    truncated.write_bytes(good[: int(len(good) * 0.3)])
    add(truncated, "", "video", "first 30 % of an MP4 whose index (moov) is at the end")
    text = broken / "not_a_video.mp4"
    text.write_text("This is a text file with a video extension.\n" * 10)
    add(text, "", "video", "a text file named .mp4")

    # Written last and renamed into place, so an interrupted build is never taken as done.
    partial = manifest.with_suffix(".csv.partial")
    with partial.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(manifest)
    return manifest


def make_test_clip(path: str | os.PathLike, seconds: float = 2.0, fps: float = 25,
                   size: Size = (320, 240), face: str = "astronaut", codec: str = "libx264",
                   faststart: bool = False) -> Path:
    """A Ken Burns clip of one bundled photo (a key of ``face_photos()`` or
    ``no_face_photos()``), for tests and benchmarks."""
    photos = face_photos() | no_face_photos()
    if face not in photos:
        raise KeyError(f"unknown photo {face!r}; choose one of {sorted(photos)}")
    return encode_clip(ken_burns_frames(photos[face], seconds, fps, size), path, fps,
                       codec=codec, faststart=faststart)
