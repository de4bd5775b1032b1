"""Pictures of one item for ``deepaudit serve``: its per-frame scores (matplotlib, like
the report's figures) and its sampled frames with the detected face boxes drawn on."""

from __future__ import annotations

import io
import math
import os
import shutil
import tempfile

import numpy as np

from deepaudit.infra.storage import is_s3

MAX_MEDIA_BYTES = 512 * 1024 * 1024  # do not copy bigger media from S3 to draw its boxes
MAX_FRAMES = 8


def scored_frames(frame_idx: list[int] | None, frame_p: list[float | None] | None
                  ) -> tuple[list[int], list[float]]:
    """``(frame indices, p_fake)`` of the frames the detector scored: ``frame_p_fake`` is
    null where it did not (``frame_indices`` is aligned with it, one per face crop); rows
    without indices are numbered 0, 1, ..."""
    frame_p = list(frame_p or [])
    idx = list(frame_idx or [])
    if len(idx) != len(frame_p):
        idx = list(range(len(frame_p)))
    pairs = [(i, float(p)) for i, p in zip(idx, frame_p)
             if p is not None and not math.isnan(p)]
    return [i for i, _ in pairs], [p for _, p in pairs]


def frame_scores_png(frame_idx: list[int], frame_p: list[float | None],
                     threshold: float | None, p_fake: float | None) -> bytes:
    """The per-frame p_fake of an item's scored frames, labelled with their frame indices,
    with its threshold and video score (ValueError when no frame was scored)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, frame_p = scored_frames(frame_idx, frame_p)
    if not frame_p:
        raise ValueError("no frame of this item was scored")
    fig, ax = plt.subplots(figsize=(5.6, 2.6))
    colours = ["#c0392b" if threshold is not None and p >= threshold else "#1e8449"
               for p in frame_p]
    ax.bar(range(len(frame_p)), frame_p, color=colours, width=0.7)
    ax.set_xticks(range(len(frame_p)), [str(i) for i in x],
                  rotation=90 if len(x) > 16 else 0, fontsize=8)
    if threshold is not None:
        ax.axhline(threshold, c="k", ls="--", lw=1, label=f"threshold {threshold:.3f}")
    if p_fake is not None:
        ax.axhline(p_fake, c="#6941c6", ls=":", lw=1.5, label=f"video p_fake {p_fake:.3f}")
    ax.set(xlabel="frame index", ylabel="frame p_fake", ylim=(0, 1))
    ax.legend(fontsize=8, loc="upper right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _read_frames(path: str, indices: list[int], media_type: str | None) -> dict[int, np.ndarray]:
    import cv2

    if media_type == "image":
        img = cv2.imread(path, cv2.IMREAD_COLOR)
        return {0: img} if img is not None else {}
    cap = cv2.VideoCapture(path)
    frames: dict[int, np.ndarray] = {}
    try:
        for i in sorted(set(indices))[:MAX_FRAMES]:
            cap.set(cv2.CAP_PROP_POS_FRAMES, i)
            ok, frame = cap.read()
            if ok:
                frames[i] = frame
    finally:
        cap.release()
    return frames


def faces_jpeg(item: dict, fs, path: str) -> bytes | None:
    """The item's sampled frames (at most 8) with every detected face box (green: the face
    that was scored), tiled, from its media at ``path`` on ``fs`` (local, or S3: copied to
    a temp file first); None when the media cannot be read from here."""
    import cv2

    from deepaudit.serve.common import storage_errors

    boxes = item.get("face_boxes") or []
    indices = [b["frame"] for b in boxes] or list(item.get("frame_indices") or [])[:MAX_FRAMES]
    tmp = None
    try:
        if is_s3(str(item.get("uri"))):
            if fs.size(path) > MAX_MEDIA_BYTES:
                return None
            tmp = tempfile.mkdtemp(prefix="deepaudit-serve-media-")
            local = os.path.join(tmp, "media" + os.path.splitext(path)[1][:8])
            fs.get(path, local)
            path = local
        elif not os.path.isfile(path):
            return None
        frames = _read_frames(path, indices, item.get("media_type"))
    except storage_errors():
        return None
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if not frames:
        return None
    tiles = []
    for idx, frame in sorted(frames.items()):
        frame = frame.copy()
        scale = 360 / max(frame.shape[:2])
        for b in boxes:
            if b["frame"] != idx and item.get("media_type") != "image":
                continue
            colour = (73, 132, 30) if b.get("selected") else (8, 180, 240)
            p1 = (int(b["x1"]), int(b["y1"]))
            p2 = (int(b["x2"]), int(b["y2"]))
            cv2.rectangle(frame, p1, p2, colour, max(2, round(3 / scale)))
        frame = cv2.resize(frame, (round(frame.shape[1] * scale), round(frame.shape[0] * scale)),
                           interpolation=cv2.INTER_AREA)
        cv2.putText(frame, f"frame {idx}", (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                    (255, 255, 255), 2, cv2.LINE_AA)
        tiles.append(frame)
    h = max(t.shape[0] for t in tiles)
    tiles = [cv2.copyMakeBorder(t, 0, h - t.shape[0], 0, 6, cv2.BORDER_CONSTANT,
                                value=(255, 255, 255)) for t in tiles]
    rows = [np.hstack(tiles[i:i + 4]) for i in range(0, len(tiles), 4)]
    w = max(r.shape[1] for r in rows)
    rows = [cv2.copyMakeBorder(r, 0, 6, 0, w - r.shape[1], cv2.BORDER_CONSTANT,
                               value=(255, 255, 255)) for r in rows]
    ok, jpg = cv2.imencode(".jpg", np.vstack(rows), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return jpg.tobytes() if ok else None
