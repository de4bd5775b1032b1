"""Evidence for flagged media: Grad-CAM strips written beside the verdicts.

For each item the classifier flags as fake, :class:`EvidenceBuilder` (inside the
classifier actor, which already holds the crops and the model) maps the most suspicious
frames with Grad-CAM (:mod:`deepaudit.models.gradcam`) and writes, under
``OUT/evidence/<safe dir>/``:

* ``<run_id>.png``: one row per frame, most suspicious first (by frame score):
  face crop | Grad-CAM of the video score over the crop | Grad-CAM of the frame's own
  score over the crop | the binary suspect-region mask;
* ``<run_id>.json``: the same facts as data (frame indices, scores, mask area and box).

**Predicted region**: when the model has a learnt localisation head (a ``localise(crops)``
method returning ``[k, H, W]`` maps in [0, 1], not None), a fifth column shows its
predicted manipulated region and the JSON gains ``predicted_region``. That head is a
model trained on self-blended fakes' blend masks (:mod:`deepaudit.models.mask_head`):
its region is a model's estimate, not a ground truth.

**Suspect-region mask**: the video score's Grad-CAM map, normalised to its maximum,
thresholded at :data:`MASK_THRESHOLD` (0.5: a pixel is suspect when its evidence is at
least half the frame's strongest). It is a Grad-CAM-derived localisation, not a trained
segmentation: it shows where the classifier looked, not a ground-truth manipulated area.

**Paths**: media ids are hostile (slashes, ``..``, NUL, thousands of characters, bytes that
are not UTF-8). :func:`evidence_dirname` turns any id into one folder name of safe
characters (a readable slug, at most 48 characters, plus 16 hex of the raw id's sha256),
so distinct ids never share a folder and nothing is written outside ``OUT/evidence``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import posixpath
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np

from deepaudit.infra.storage import StorageConfig, filesystem_for, is_s3, join

log = logging.getLogger(__name__)

MASK_THRESHOLD = 0.5  # fraction of the normalised Grad-CAM map's maximum
SLUG_CHARS = 48
HASH_CHARS = 16
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class EvidenceConfig:
    """Where and how much evidence one classifier stage writes."""

    root: str  # OUT/evidence: a local folder or an s3:// prefix
    run_id: str
    storage: StorageConfig = field(default_factory=StorageConfig)
    max_items: int = 500  # per ClassifyStage instance (the audit splits its cap over actors)
    top_k: int = 3  # frames per item, the highest frame scores
    mask_threshold: float = MASK_THRESHOLD
    # Where files are written first (the audit: ``root/_staging/<run_id>``); the driver
    # moves an item's files to ``root`` once its verdict row is on disk (see
    # :func:`promote`), so no evidence exists without its row. None: straight to ``root``.
    staging: str | None = None

    def __post_init__(self) -> None:
        if not self.root:
            raise ValueError("evidence root must be a folder or an s3:// prefix")
        if self.max_items < 0:
            raise ValueError(f"evidence max_items must be >= 0, got {self.max_items}")
        if self.top_k < 1:
            raise ValueError(f"evidence top_k must be >= 1, got {self.top_k}")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must be in (0, 1), got {self.mask_threshold}")


# ---------------------------------------------------------------------------- safe names


def raw_bytes(media_id: str | bytes) -> bytes:
    """The id's bytes: non-UTF-8 bytes decoded with surrogateescape come back as they were."""
    if isinstance(media_id, bytes):
        return media_id
    try:
        return media_id.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # lone surrogates that are not escaped bytes
        return media_id.encode("utf-8", "surrogatepass")


def evidence_dirname(media_id: str | bytes) -> str:
    """A folder name for ``media_id``, by one rule: ``<name>-<hash>``. ``name`` is the id's
    file name (what follows its last ``/`` or ``\\``; the whole id when it has neither),
    each run of characters outside ``[A-Za-z0-9._-]`` made ``_``, cut to its last
    SLUG_CHARS characters, without leading or trailing ``.``, ``_`` or ``-``; ``hash`` is
    the first HASH_CHARS hex of the whole id's sha256 (the folders stay apart). Only
    ``<hash>`` when no safe character is left."""
    raw = raw_bytes(media_id)
    digest = hashlib.sha256(raw).hexdigest()[:HASH_CHARS]
    name = re.split(r"[/\\]", raw.decode("utf-8", "replace").rstrip("/\\"))[-1]
    slug = _UNSAFE.sub("_", name)[-SLUG_CHARS:].strip("._-")
    return f"{slug}-{digest}" if slug else digest


def safe_filename(text: str) -> str:
    """``text`` when it is already a safe file name (e.g. a generated run id), else its
    slug plus a hash, as for media ids."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", text) and ".." not in text:
        return text
    return evidence_dirname(text)


class EvidenceWriter:
    """Writes files under ``root/<evidence_dirname(media_id)>/`` (local or s3://), or under
    ``staging`` in the same layout while still returning the URI under ``root``."""

    def __init__(self, root: str, storage: StorageConfig | None = None,
                 staging: str | None = None) -> None:
        self.root = root.rstrip("/") or root
        self.fs, self.base = filesystem_for(staging or root, storage)
        self.base = self.base.rstrip("/")

    def path_for(self, media_id: str | bytes, name: str) -> tuple[str, str]:
        """``(filesystem path, URI)`` of file ``name`` in ``media_id``'s folder."""
        folder = evidence_dirname(media_id)
        name = safe_filename(name)
        path = posixpath.normpath(f"{self.base}/{folder}/{name}")
        if not path.startswith(self.base + "/") or path.count("/") != self.base.count("/") + 2:
            raise ValueError(f"evidence path {path!r} escapes {self.base!r}")  # cannot happen
        return path, join(self.root, folder, name)

    def write(self, media_id: str | bytes, name: str, data: bytes) -> str:
        path, uri = self.path_for(media_id, name)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with self.fs.open(path, "wb") as f:
            f.write(data)
        return uri


# ------------------------------------------------------------------------------ pictures


def top_frames(frame_p: list[float | None], k: int) -> list[int]:
    """Positions of the ``k`` highest frame scores, highest first (ties: earlier first);
    frames without a score (None) are never picked."""
    scored = [i for i, p in enumerate(frame_p) if p is not None]
    order = sorted(scored, key=lambda i: (-frame_p[i], i))
    return order[: max(0, k)]


def suspect_mask(heatmap: np.ndarray, threshold: float = MASK_THRESHOLD) -> np.ndarray:
    """Boolean mask of a [0, 1]-normalised heatmap: ``heatmap >= threshold``. An all-zero
    map (nothing raised the score) gives an empty mask."""
    if heatmap.max(initial=0.0) <= 0.0:
        return np.zeros(heatmap.shape, bool)
    return heatmap >= threshold


def mask_stats(mask: np.ndarray) -> dict:
    """Area fraction and bounding box ``[x1, y1, x2, y2]`` (crop pixels, inclusive)."""
    ys, xs = np.nonzero(mask)
    box = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())] if xs.size else None
    return {"mask_area": round(float(mask.mean()), 4), "mask_box": box}


def _ascii(text: str, limit: int) -> str:
    """Printable ASCII for Hershey fonts (OpenCV draws nothing else), at most ``limit``
    characters: a long text loses its middle, so both ends stay readable."""
    out = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
    if len(out) <= limit:
        return out
    keep = max(0, limit - 3)
    return out[: keep // 2] + "..." + out[len(out) - (keep - keep // 2):]


def strip_title(verdict: str, p_fake: float, threshold: float, media_id: str,
                limit: int) -> str:
    """The strip's header: verdict and score first, always whole; then the media id,
    shortened from its middle to fit (the file name at its end stays)."""
    head = f"{verdict.upper()} p={p_fake:.3f} (threshold {threshold:.4g})"
    room = limit - len(head) - 2
    return head if room < 8 else f"{head}  {_ascii(media_id, room)}"


def _text(img: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.45,
          colour: tuple[int, int, int] = (255, 255, 255)) -> None:
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)


def _overlay(crop_bgr: np.ndarray, heat: np.ndarray) -> np.ndarray:
    colour = cv2.applyColorMap(np.uint8(np.round(heat * 255)), cv2.COLORMAP_JET)
    return cv2.addWeighted(crop_bgr, 0.5, colour, 0.5, 0.0)


def title_chars(width: int) -> int:
    """Characters of the header that fit a strip ``width`` px wide (Hershey, scale 0.5)."""
    return int(width / 8.2)


COLUMNS = ("face crop", "Grad-CAM: video score", "Grad-CAM: frame score", "suspect mask")
REGION_COLUMN = "predicted region (model estimate)"
REGION_THRESHOLD = 0.5  # the localisation head's probability
REGION_METHOD = (
    "a learnt model's estimate of the manipulated region: a mask decoder on the CLIP "
    "tower's patch tokens, trained on self-blended fakes' blend masks; region = predicted "
    f"probability >= {REGION_THRESHOLD:g}. Not a ground truth")


def _fit_text(text: str, width: int, scale: float = 0.42) -> float:
    """The largest scale <= ``scale`` at which ``text`` fits ``width`` px."""
    w = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0]
    return scale if w <= width else max(0.25, scale * width / w)


def _region_panel(crop_bgr: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The crop under the region's probability map, the region's outline in green."""
    panel = _overlay(crop_bgr, region)
    inside = (region >= REGION_THRESHOLD).astype(np.uint8)
    contours, _ = cv2.findContours(inside, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(panel, contours, -1, (0, 255, 0), 2)
    return panel


def render_strip(
    crops: np.ndarray,
    video_cam: np.ndarray,
    frame_cam: np.ndarray,
    frame_indices: list[int],
    frame_p: list[float],
    title: str,
    mask_threshold: float = MASK_THRESHOLD,
    min_panel: int = 192,
    region: np.ndarray | None = None,
) -> bytes:
    """The evidence strip as PNG bytes: one row per frame, four panels per row, five with
    ``region`` (a localisation head's ``[k, H, W]`` probabilities: its predicted region).

    ``crops`` are RGB uint8 ``[k, H, W, 3]``; the maps ``[k, H, W]`` in [0, 1]. Small crops
    are enlarged to ``min_panel`` px so the tiny test model's strips stay legible."""
    k, h, w = crops.shape[:3]
    if video_cam.shape != (k, h, w) or frame_cam.shape != (k, h, w):
        raise ValueError(
            f"maps {video_cam.shape}/{frame_cam.shape} do not match crops {crops.shape}")
    if region is not None and region.shape != (k, h, w):
        raise ValueError(f"region maps {region.shape} do not match crops {crops.shape}")
    n_cols = 4 if region is None else 5
    if len(frame_indices) != k or len(frame_p) != k:
        raise ValueError("need one frame index and one score per crop")
    side = max(h, min_panel)
    gap, title_h, head_h = 4, 30, 22
    width = n_cols * side + (n_cols + 1) * gap
    height = title_h + head_h + k * (side + gap) + gap
    img = np.full((height, width, 3), 32, np.uint8)
    _text(img, _ascii(title, title_chars(width)), (gap + 2, 20), 0.5)
    thr = f"suspect mask (>= {mask_threshold:g} x max)"
    names = COLUMNS[:3] + (thr,) + ((REGION_COLUMN,) if region is not None else ())
    for c, name in enumerate(names):
        _text(img, name, (gap + c * (side + gap) + 2, title_h + 15),
              _fit_text(name, side - 4), (200, 200, 200))
    up = cv2.INTER_CUBIC if side > h else cv2.INTER_AREA
    for r in range(k):
        crop = cv2.cvtColor(crops[r], cv2.COLOR_RGB2BGR)
        mask = suspect_mask(video_cam[r], mask_threshold)
        panels = [
            crop,
            _overlay(crop, video_cam[r]),
            _overlay(crop, frame_cam[r]),
            np.repeat((mask.astype(np.uint8) * 255)[:, :, None], 3, axis=2),
        ]
        if region is not None:
            panels.append(_region_panel(crop, region[r]))
        y = title_h + head_h + r * (side + gap)
        for c, panel in enumerate(panels):
            interp = cv2.INTER_NEAREST if c == 3 else up
            panel = cv2.resize(panel, (side, side), interpolation=interp) if side != h else panel
            x = gap + c * (side + gap)
            img[y : y + side, x : x + side] = panel
        if not mask.any():  # nothing raised the video score: say so, not just black
            x3 = gap + 3 * (side + gap)
            _text(img, "empty: no region", (x3 + 8, y + side // 2 - 8), 0.45, (160, 160, 160))
            _text(img, "raised the score", (x3 + 8, y + side // 2 + 12), 0.45, (160, 160, 160))
        label = f"frame {frame_indices[r]}  p={frame_p[r]:.3f}"
        cv2.rectangle(img, (gap, y + side - 20), (gap + side, y + side), (0, 0, 0), -1)
        _text(img, label, (gap + 4, y + side - 6), 0.45)
    ok, png = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return png.tobytes()


# ------------------------------------------------------------------------ in the actor


class EvidenceBuilder:
    """Grad-CAM evidence for flagged rows, inside a classifier actor.

    ``model`` is a detector (:mod:`deepaudit.models.detector`): its ``explain`` maps the
    picked frames from their uint8 crops and the features its ``score`` kept. Writes at
    most ``max_items`` items over the builder's life; rows past the cap, or whose
    evidence fails, keep ``evidence`` null (a failure is logged, never fails the row).
    """

    def __init__(self, config: EvidenceConfig, model, autocast) -> None:
        self.config, self.model, self.autocast = config, model, autocast
        self.writer = EvidenceWriter(config.root, config.storage, config.staging)
        self.written = 0
        self.failed = 0

    def remaining(self) -> int:
        return max(0, self.config.max_items - self.written)

    def add(self, rows: list[dict], arrays: list[np.ndarray], features, lengths: list[int]) -> None:
        """``rows[j]`` was scored from crops ``arrays[j]`` and pooled features
        ``features[offset_j : offset_j + lengths[j]]``. Sets ``row['evidence']`` on the
        flagged rows it explains."""
        flagged = [j for j, r in enumerate(rows) if r.get("verdict") == "fake"]
        flagged = flagged[: self.remaining()]
        if not flagged:
            return
        offsets = [0, *np.cumsum(lengths).tolist()]
        feats = [features[offsets[j] : offsets[j] + lengths[j]] for j in flagged]
        positions = [top_frames(rows[j]["frame_p_fake"], self.config.top_k) for j in flagged]
        picked = np.concatenate([arrays[j][pos] for j, pos in zip(flagged, positions)])
        import torch

        with self.autocast():
            maps = self.model.explain(torch.cat(feats), [lengths[j] for j in flagged],
                                      positions, picked)
        regions = self._localise(picked)
        starts = [0, *np.cumsum([len(pos) for pos in positions]).tolist()]  # rows of picked
        for n, (j, pos, ex) in enumerate(zip(flagged, positions, maps)):
            row = rows[j]
            region = None if regions is None else regions[starts[n]:starts[n + 1]]
            try:
                row["evidence"] = self._write(row, arrays[j][list(pos)], ex, region)
                self.written += 1
            except Exception as exc:  # storage or encoding trouble: keep the verdict
                self.failed += 1
                log.error("evidence for %r failed: %s: %s", row.get("media_id"),
                          type(exc).__name__, exc)

    def _localise(self, picked: np.ndarray) -> np.ndarray | None:
        """The model's predicted-region maps of the picked crops, or None (no
        localisation head, or it failed: logged, and the strip keeps four columns)."""
        localise = getattr(self.model, "localise", None)
        if localise is None:
            return None
        try:
            maps = localise(picked)
        except Exception as exc:
            log.error("localisation failed: %s: %s", type(exc).__name__, exc)
            return None
        if maps is None:
            return None
        maps = np.asarray(maps, np.float32)
        if maps.shape != picked.shape[:3]:
            log.error("localisation maps %s do not match crops %s", maps.shape, picked.shape)
            return None
        return maps

    def _write(self, row: dict, crops: np.ndarray, ex, region: np.ndarray | None = None
               ) -> str:
        cfg = self.config
        frame_idx = [int(row["frame_indices"][p]) for p in ex.positions]
        frame_p = [float(row["frame_p_fake"][p]) for p in ex.positions]
        side = max(crops.shape[1], 192)  # render_strip's panel size
        n_cols = 4 if region is None else 5
        title = strip_title(row["verdict"] or "fake", row["p_fake"], row["threshold"],
                            str(row["media_id"]), title_chars(n_cols * side + (n_cols + 1) * 4))
        png = render_strip(crops, ex.video_cam, ex.frame_cam, frame_idx, frame_p, title,
                           cfg.mask_threshold, region=region)
        frames = []
        for r, (pos, idx, p) in enumerate(zip(ex.positions, frame_idx, frame_p)):
            frames.append({
                "frame_index": idx, "position": int(pos), "frame_p_fake": round(p, 6),
                **mask_stats(suspect_mask(ex.video_cam[r], cfg.mask_threshold)),
                "video_cam_peak": float(ex.video_peak[r]),
                "frame_cam_peak": float(ex.frame_peak[r]),
            })
        name = safe_filename(cfg.run_id)
        uri = self.writer.write(row["media_id"], f"{name}.png", png)
        meta = {
            "media_id": row["media_id"], "uri": row.get("uri"), "run_id": cfg.run_id,
            "verdict": row["verdict"], "p_fake": row["p_fake"], "threshold": row["threshold"],
            "model": row.get("model"), "strip": uri,
            "method": f"{self.model.cam_method}; mask = video-score map >= "
                      f"{cfg.mask_threshold:g} x its max (a localisation, not a segmentation)",
            "columns": list(COLUMNS), "frames": frames,
        }
        if region is not None:
            meta["columns"].append(REGION_COLUMN)
            meta["predicted_region"] = {
                "method": REGION_METHOD, "threshold": REGION_THRESHOLD,
                "frames": [{"frame_index": idx,
                            "peak": round(float(region[r].max(initial=0.0)), 4),
                            **{k.replace("mask_", ""): v for k, v in mask_stats(
                                region[r] >= REGION_THRESHOLD).items()}}
                           for r, idx in enumerate(frame_idx)],
            }
        self.writer.write(row["media_id"], f"{name}.json",
                          json.dumps(meta, indent=2, default=str).encode())
        return uri


STAGING = "_staging"


def staging_root(root: str, run_id: str) -> str:
    """Where a run's evidence waits for its verdict rows: ``root/_staging/<run_id>``."""
    return join(root, STAGING, safe_filename(run_id))


# Moves promote() runs at once: each is a few sequential requests (HEAD, copy, delete on
# S3), and the driver's writer waits for all of them before it ledgers the file.
PROMOTE_THREADS = 16


def promote(root: str, staging: str, uris: list[str], storage: StorageConfig | None = None
            ) -> int:
    """Move the evidence of ``uris`` (PNG URIs under ``root``, from verdict rows now on
    disk) and their JSON from ``staging`` to ``root``. Returns the items moved."""
    fs, _ = filesystem_for(root, storage)
    moves = []  # (source, destination, counts as an item)
    for uri in uris:
        if not uri or not uri.startswith(root.rstrip("/") + "/"):
            continue
        rel = uri[len(root.rstrip("/")) + 1:]
        src = filesystem_for(join(staging, rel), storage)[1]
        dst = filesystem_for(uri, storage)[1]
        moves.append((src, dst, True))
        moves.append((src.removesuffix(".png") + ".json", dst.removesuffix(".png") + ".json",
                      False))

    def move(job: tuple[str, str, bool]) -> int:
        src, dst, item = job
        if not is_s3(root):
            if not fs.exists(src):
                return 0
            fs.makedirs(posixpath.dirname(dst), exist_ok=True)
            fs.mv(src, dst)
        else:  # a HEAD, a copy and a delete; fsspec's mv would also list the source twice
            try:
                fs.cp_file(src, dst)
            except FileNotFoundError:
                return 0
            fs.rm_file(src)
        return int(item)

    if not moves:
        return 0
    with ThreadPoolExecutor(min(PROMOTE_THREADS, len(moves)),
                            thread_name_prefix="promote") as pool:
        return sum(pool.map(move, moves))


def drop_staging(staging: str, storage: StorageConfig | None = None) -> None:
    """Delete what is left in a run's staging folder: evidence of rows never written."""
    fs, path = filesystem_for(staging, storage)
    for attempt in range(3):
        try:
            if fs.exists(path):
                fs.rm(path, recursive=True)
            break
        except OSError as exc:  # a killed run's dying worker may still be writing here
            if attempt == 2:
                log.warning("left evidence staging %s in place (%s); nothing published "
                            "points into it", staging, exc)
                return
            time.sleep(1.0)
    parent = path.rstrip("/").rsplit("/", 1)[0]
    try:  # the shared _staging folder, once no run uses it (locally; S3 has no folders)
        if fs.exists(parent) and not fs.ls(parent, detail=False):
            fs.rmdir(parent)
    except OSError:
        pass  # another run just staged something there


def per_actor_cap(max_items: int, actors: int) -> int:
    """The run's cap split over classifier actors: ``ceil(max_items / actors)`` each, so a
    run writes at most ``max_items + actors - 1`` items (actors do not coordinate)."""
    return math.ceil(max_items / max(1, actors)) if max_items > 0 else 0
