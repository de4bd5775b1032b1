"""Arrow schemas of the data that moves between stages and of the verdict table.

Every stage builds its output with an explicit schema, so blocks from different
actors always concatenate (an all-failed batch still has typed list columns).
"""

from __future__ import annotations

import pyarrow as pa

STATUS_OK = "ok"
STATUS_NO_FACE = "no_face"
STATUS_ERROR = "error"
STATUSES = (STATUS_OK, STATUS_NO_FACE, STATUS_ERROR)

FACE_BOX = pa.struct(
    [
        ("frame", pa.int32()),  # index of the frame in the video
        ("x1", pa.float32()),  # pixels of the original media
        ("y1", pa.float32()),
        ("x2", pa.float32()),
        ("y2", pa.float32()),
        ("score", pa.float32()),
        ("selected", pa.bool_()),  # the face that was cropped and scored for this frame
    ]
)

DROPPED_FRAME = pa.struct(
    [
        ("frame", pa.int32()),  # index of the sampled frame in the video
        ("reason", pa.string()),  # "corrupt: ..." or "not_decoded: ..."
    ]
)

# What the CPU stage emits per media item: metadata plus the face crops, never frames.
MEDIA_FIELDS = [
    ("manifest_row", pa.int64()),
    ("media_id", pa.string()),
    ("uri", pa.string()),
    ("media_type", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("n_frames_sampled", pa.int32()),
    ("n_frames_with_face", pa.int32()),
    ("frame_indices", pa.list_(pa.int32())),  # frames the crops come from, in order
    ("face_boxes", pa.list_(FACE_BOX)),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("duration_s", pa.float32()),
    ("codec", pa.string()),
    ("size_bytes", pa.int64()),
    ("fingerprint", pa.string()),
    # How the frames were decoded (docs/decode.md): "seek", "sequential" or
    # "seek+fallback" (seeking gave a decode error or a corrupt frame, so the rest of the
    # item was decoded sequentially).
    ("decode_mode", pa.string()),
    # ffmpeg error lines that can mean wrong pixels, over every decode of the item.
    ("decode_warnings", pa.int32()),
    # Sampled frames not used: corrupt (a decoder-garbage check) or never decoded.
    ("n_frames_dropped", pa.int32()),
    ("dropped_frames", pa.list_(DROPPED_FRAME)),
    ("decode_ms", pa.float32()),
    ("detect_ms", pa.float32()),
]
CROPS_FIELDS = [
    ("crops", pa.binary()),  # uint8 [n_frames_with_face, crop_size, crop_size, 3], C order
    ("crop_size", pa.int32()),
]
CROP_SCHEMA = pa.schema(MEDIA_FIELDS + CROPS_FIELDS)

VERDICT_FIELDS = [
    ("verdict", pa.string()),  # "fake" / "real" / null (no score, or untrained model)
    ("p_fake", pa.float32()),
    ("margin", pa.float32()),  # distance from the threshold, [0, 1]; not a probability
    ("threshold", pa.float32()),
    ("frame_p_fake", pa.list_(pa.float32())),
    # The temporal attention's weight of each sampled frame (which frames decided), for
    # heads with attention; null otherwise
    ("frame_weights", pa.list_(pa.float32())),
    # Which head gave p_fake: "sequence" (the LSTM), "fused" (CNN + CLIP), ...
    ("score_head", pa.string()),
    ("model", pa.string()),
    ("model_sha256", pa.string()),
    ("classify_ms", pa.float32()),
    ("evidence", pa.string()),  # URI of the Grad-CAM evidence strip (flagged rows), else null
]
RUN_FIELDS = [
    ("run_id", pa.string()),
    ("audited_at", pa.timestamp("us", tz="UTC")),
]

# The verdict table, in column order. The manifest's extra columns follow these.
_ORDER = [
    "media_id", "uri", "media_type", "status", "error", "verdict", "p_fake", "margin",
    "threshold", "n_frames_sampled", "n_frames_with_face", "n_frames_dropped",
    "frame_indices", "frame_p_fake", "frame_weights", "score_head", "evidence",
    "face_boxes", "model", "model_sha256", "fingerprint", "size_bytes", "width", "height",
    "duration_s", "codec", "decode_mode", "decode_warnings", "dropped_frames", "decode_ms",
    "detect_ms", "classify_ms", "run_id", "audited_at",
    "manifest_row",
]
_ALL = dict(MEDIA_FIELDS + VERDICT_FIELDS + RUN_FIELDS)
VERDICT_SCHEMA = pa.schema([(name, _ALL[name]) for name in _ORDER])
STAGE_VERDICT_SCHEMA = pa.schema([f for f in VERDICT_SCHEMA if f.name not in dict(RUN_FIELDS)])
RESERVED_COLUMNS = set(VERDICT_SCHEMA.names) | set(CROP_SCHEMA.names)


def table_from_rows(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Build a table with exactly ``schema``; missing keys become nulls."""
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


def margin(p_fake: float, threshold: float) -> float:
    """How far the score is from the threshold, scaled to [0, 1] on the verdict's side.

    A margin is not a probability: ``p_fake`` (calibrated on validation data) is the
    figure to read as "how likely fake"; the margin says how clear-cut the call was."""
    if p_fake >= threshold:
        return (p_fake - threshold) / max(1.0 - threshold, 1e-6)
    return (threshold - p_fake) / max(threshold, 1e-6)
