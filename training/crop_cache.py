"""Face crops for training, extracted once by the audit's own CPU stage and cached.

The labelled items run through :class:`~deepaudit.pipeline.stages.DecodeCropStage` on
Ray Data actors, exactly as the audit's first stage does, so a model trains on the crops
the audit will show it. The result is a Parquet dataset under
``ROOT/<settings key>/``:

* ``part-*.crops.parquet``: one row per crop (``item_key``, ``media_id``, ``uri``,
  ``label``, ``group``, ``source``, ``media_type``, ``frame_index``, ``crop_size``,
  ``crop``: raw uint8 ``[S, S, 3]`` bytes);
* ``part-*.items.parquet``: one row per item, with its ``status`` and ``error``
  (no_face and errors are recorded here, never dropped silently). It is written after
  its crops part, so a part without it (a crash) is ignored.

The settings key hashes everything that changes a crop (frames per video, crop size and
margin, frame size, detector settings). Within it, each item is keyed by a hash of its
uri and a cheap fingerprint (size and mtime locally, size and ETag on S3), so a rerun
decodes only new or changed media, and labels or splits can change without a decode.
Transient failures (timeouts, fetch errors) are not cached and are retried next time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deepaudit.infra.storage import StorageConfig, filesystem_for, is_s3, join
from deepaudit.models.face_detector import FaceDetectorConfig
from deepaudit.pipeline.media import DecodeConfig
from deepaudit.pipeline.schema import STATUS_ERROR, STATUS_OK

log = logging.getLogger(__name__)

# 2: crops from the decode that never keeps a corrupt frame (docs/decode.md); caches built
# before it may hold frames a seek decoded wrongly, so they are not reused.
CACHE_FORMAT = "deepaudit-crop-cache/2"
TRANSIENT_CODES = ("timeout", "fetch_failed", "internal", "access_denied", "lost")

CROP_ROW_SCHEMA = pa.schema([
    ("item_key", pa.string()),
    ("media_id", pa.string()),
    ("uri", pa.string()),
    ("label", pa.int8()),
    ("group", pa.string()),
    ("source", pa.string()),
    ("media_type", pa.string()),
    ("frame_index", pa.int32()),
    ("crop_size", pa.int32()),
    ("crop", pa.binary()),
])
ITEM_SCHEMA = pa.schema([
    ("item_key", pa.string()),
    ("uri", pa.string()),
    ("media_id", pa.string()),
    ("quick_fingerprint", pa.string()),
    ("fingerprint", pa.string()),
    ("media_type", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("n_frames_sampled", pa.int32()),
    ("n_crops", pa.int32()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("crops_file", pa.string()),
])


def default_cache_root() -> str:
    """``$DEEPAUDIT_CACHE/crops`` or ``~/.cache/deepaudit/crops``."""
    base = os.environ.get("DEEPAUDIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "deepaudit")
    return os.path.join(base, "crops")


@dataclass(frozen=True)
class CropCacheConfig:
    """Where the cache lives and every setting that changes a crop."""

    root: str = field(default_factory=default_cache_root)
    frames: int = 32  # frames decoded per video
    size: int = 224  # crop side = the model's input size
    margin: float = 1.3
    max_side: int = 1920
    detector: FaceDetectorConfig = field(default_factory=FaceDetectorConfig)
    decode_actors: int | None = None  # default: one per CPU of the cluster
    s3_endpoint: str | None = None

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if self.size < 16:
            raise ValueError(f"crop size must be >= 16, got {self.size}")

    def settings(self) -> dict:
        """The settings that change a crop: they make the cache key."""
        det = asdict(self.detector)
        det.pop("threads", None)
        if det.get("kind") == "retinaface":  # the default: keys from before the choice hold
            det.pop("kind")
        return {"format": CACHE_FORMAT, "frames": self.frames, "size": self.size,
                "margin": self.margin, "max_side": self.max_side, "detector": det}

    def key(self) -> str:
        blob = json.dumps(self.settings(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def directory(self) -> str:
        return join(self.root, self.key())

    def storage(self) -> StorageConfig:
        return StorageConfig(endpoint_url=self.s3_endpoint)


@dataclass
class CropSet:
    """The cached crops of a labelled table: where they are and each item's outcome."""

    directory: str
    key: str
    items: pa.Table  # the labelled table + item_key, status, error, n_crops, crops_file
    decoded_now: int  # items decoded by this call (the rest came from the cache)
    retried: int  # transient failures that were not cached

    def status_counts(self) -> dict[str, int]:
        return dict(Counter(self.items["status"].to_pylist()))

    def error_codes(self) -> dict[str, int]:
        codes = Counter()
        for s, e in zip(self.items["status"].to_pylist(), self.items["error"].to_pylist()):
            if s != STATUS_OK and e:
                codes[e.split(":", 1)[0]] += 1
        return dict(codes.most_common())

    def unusable(self) -> list[dict]:
        """Items without crops, with their status and error."""
        t = self.items.filter(pc.not_equal(self.items["status"], STATUS_OK))
        return t.select(["media_id", "uri", "label", "status", "error"]).to_pylist()


def quick_fingerprints(uris: list[str], storage: StorageConfig) -> list[str]:
    """Cheap per-item fingerprints (no content hashing): size+mtime or size+ETag."""

    def one(uri: str) -> str:
        try:
            fs, path = filesystem_for(uri, storage)
            if is_s3(uri):
                info = fs.info(path)
                etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
                return f"size={int(info.get('size') or 0)};etag={etag}"
            st = os.stat(path)
            return f"size={st.st_size};mtime_ns={st.st_mtime_ns}"
        except (FileNotFoundError, NotADirectoryError):
            return "missing"
        except Exception as exc:  # network: do not cache whatever the stage makes of it
            return f"unreachable:{type(exc).__name__}"

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(one, uris))


def item_key(uri: str, fingerprint: str) -> str:
    return hashlib.sha256(f"{uri}\n{fingerprint}".encode()).hexdigest()[:32]


def _list_parts(fs, directory: str, suffix: str) -> list[str]:
    if not fs.exists(directory):
        return []
    return sorted(p for p in fs.ls(directory, detail=False) if p.endswith(suffix))


def read_index(cfg: CropCacheConfig) -> pa.Table:
    """Every committed item row of the cache (later parts win for a repeated key)."""
    fs, directory = filesystem_for(cfg.directory(), cfg.storage())
    tables = []
    for path in _list_parts(fs, directory, ".items.parquet"):
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f).cast(ITEM_SCHEMA))
    if not tables:
        return ITEM_SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    keys = table["item_key"].to_pylist()
    last = {k: i for i, k in enumerate(keys)}
    return table.take(pa.array(sorted(last.values()), pa.int64()))


class _PartWriter:
    """Writes crop rows to one part file, then its item rows (the commit). A part is
    committed every ``max_crops`` crops or ``max_seconds``, so an interrupted extraction
    keeps most of its work."""

    def __init__(self, fs, directory: str, token: str, max_crops: int = 4000,
                 max_seconds: float = 120.0) -> None:
        self.fs, self.directory, self.token, self.max_crops = fs, directory, token, max_crops
        self.max_seconds, self.opened = max_seconds, 0.0
        self.index, self.items, self.n_crops = 0, [], 0
        self.writer = self.sink = None
        self.name = ""

    def _open(self) -> None:
        self.name = f"part-{self.token}-{self.index:05d}"
        self.sink = self.fs.open(f"{self.directory}/{self.name}.crops.parquet", "wb")
        self.writer = pq.ParquetWriter(self.sink, CROP_ROW_SCHEMA, compression="zstd")
        self.opened = time.monotonic()

    def add(self, item: dict, crops: pa.Table | None) -> None:
        if self.writer is None:
            self._open()
        if crops is not None and crops.num_rows:
            self.writer.write_table(crops)
            self.n_crops += crops.num_rows
        item["crops_file"] = f"{self.name}.crops.parquet" if item["n_crops"] else None
        self.items.append(item)
        if self.n_crops >= self.max_crops or time.monotonic() - self.opened > self.max_seconds:
            self.commit()

    def commit(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.sink.close()
        path = f"{self.directory}/{self.name}.items.parquet"
        with self.fs.open(path, "wb") as f:
            pq.write_table(pa.Table.from_pylist(self.items, ITEM_SCHEMA), f)
        self.index += 1
        self.items, self.n_crops, self.writer, self.sink = [], 0, None, None


def _decode_dataset(keys: pa.Table, cfg: CropCacheConfig, actors: int, cpus_each: float):
    """The audit's first stage (DecodeCropStage on an actor pool) over ``keys``."""
    from deepaudit.pipeline.dataset import decode_crop_dataset
    from deepaudit.pipeline.stages import CropConfig

    return decode_crop_dataset(
        keys, DecodeConfig(frames=cfg.frames, max_side=cfg.max_side), cfg.detector,
        CropConfig(size=cfg.size, margin=cfg.margin), cfg.storage(), actors, cpus_each)


def build_crop_cache(
    labelled: pa.Table,
    cfg: CropCacheConfig,
    address: str = "local",
    num_cpus: int | None = None,
    on_items: Callable[[int, int], None] | None = None,
) -> CropSet:
    """Make sure every labelled item is in the cache (decoding only what is missing) and
    return the items with their outcome. Needs the labelled table's ``uri``,
    ``media_id``, ``label``, ``group``, ``source`` and ``media_type`` columns."""
    storage = cfg.storage()
    fs, directory = filesystem_for(cfg.directory(), storage)
    fs.makedirs(directory, exist_ok=True)
    settings_path = f"{directory}/settings.json"
    if not fs.exists(settings_path):
        with fs.open(settings_path, "w") as f:
            json.dump(cfg.settings(), f, indent=2)

    uris = labelled["uri"].to_pylist()
    quick = quick_fingerprints(uris, storage)
    keys = [item_key(u, q) for u, q in zip(uris, quick)]
    index = read_index(cfg)
    cached = set(index["item_key"].to_pylist())
    rows = labelled.to_pylist()
    todo, seen = [], set()
    for i, k in enumerate(keys):
        if k not in cached and k not in seen:
            todo.append(i)
            seen.add(k)
    retried = 0
    if todo:
        retried = _decode_missing(rows, keys, quick, todo, cfg, fs, directory, address,
                                  num_cpus, on_items)
        index = read_index(cfg)
    by_key = {r["item_key"]: r for r in index.to_pylist()}
    status, error, n_crops, files = [], [], [], []
    for k in keys:
        r = by_key.get(k)
        if r is None:  # transient failure: not cached, reported as an error this time
            r = {"status": STATUS_ERROR, "error": "lost: transient failure, retried next run",
                 "n_crops": 0, "crops_file": None}
        status.append(r["status"])
        error.append(r["error"])
        n_crops.append(r["n_crops"])
        files.append(r["crops_file"])
    items = labelled.append_column("item_key", pa.array(keys, pa.string()))
    for name, values, typ in (("status", status, pa.string()), ("error", error, pa.string()),
                              ("n_crops", n_crops, pa.int32()),
                              ("crops_file", files, pa.string())):
        items = items.append_column(name, pa.array(values, typ))
    return CropSet(directory=cfg.directory(), key=cfg.key(), items=items,
                   decoded_now=len(todo), retried=retried)


def _decode_missing(rows, keys, quick, todo, cfg, fs, directory, address, num_cpus,
                    on_items) -> int:
    from deepaudit.infra.ray_runtime import cluster_resources, configure_ray_data, connect

    connect(address, num_cpus=num_cpus)
    cpus, _ = cluster_resources()
    actors = min(cfg.decode_actors or max(1, int(cpus)), len(todo))
    cpus_each = max(0.1, min(1.0, 0.9 * cpus / actors))
    table = pa.table({
        "manifest_row": pa.array(todo, pa.int64()),
        "media_id": pa.array([rows[i]["media_id"] for i in todo], pa.string()),
        "uri": pa.array([rows[i]["uri"] for i in todo], pa.string()),
    })
    configure_ray_data()
    writer = _PartWriter(fs, directory, secrets.token_hex(4))
    done = retried = 0
    log.info("decoding %d items with %d actors (%.2f CPU each)", len(todo), actors, cpus_each)
    for batch in _decode_dataset(table, cfg, actors, cpus_each).iter_batches(
            batch_format="pyarrow", batch_size=None):
        for out in batch.to_pylist():
            i = out["manifest_row"]
            retried += _store(rows[i], keys[i], quick[i], out, cfg, writer)
            done += 1
            if on_items:
                on_items(done, len(todo))
    writer.commit()
    if done < len(todo):  # their tasks failed for good (see configure_ray_data)
        log.warning("%d of %d items came back from no decode task (their worker died on "
                    "every attempt, or the stage raised; see the log); not cached, "
                    "retried next run", len(todo) - done, len(todo))
    return retried + len(todo) - done


def _store(row: dict, key: str, quick: str, out: dict, cfg: CropCacheConfig,
           writer: _PartWriter) -> int:
    code = (out.get("error") or "").split(":", 1)[0]
    if out["status"] == STATUS_ERROR and (code in TRANSIENT_CODES or
                                          quick.startswith("unreachable:")):
        log.warning("%s: %s (not cached; retried next run)", row["uri"], out["error"])
        return 1
    n = int(out["n_frames_with_face"] or 0) if out["status"] == STATUS_OK else 0
    crops = None
    if n:
        size = int(out["crop_size"])
        flat = np.frombuffer(out["crops"], np.uint8).reshape(n, size * size * 3)
        crops = pa.table({
            "item_key": [key] * n, "media_id": [row["media_id"]] * n, "uri": [row["uri"]] * n,
            "label": [row["label"]] * n, "group": [row["group"]] * n,
            "source": [row["source"]] * n, "media_type": [out["media_type"]] * n,
            "frame_index": out["frame_indices"], "crop_size": [size] * n,
            "crop": [c.tobytes() for c in flat],
        }, schema=CROP_ROW_SCHEMA)
    writer.add({
        "item_key": key, "uri": row["uri"], "media_id": row["media_id"],
        "quick_fingerprint": quick, "fingerprint": out.get("fingerprint"),
        "media_type": out.get("media_type"), "status": out["status"], "error": out.get("error"),
        "n_frames_sampled": out.get("n_frames_sampled") or 0, "n_crops": n,
        "width": out.get("width"), "height": out.get("height"),
    }, crops)
    return 0


def load_crops(directory: str, keys: list[str], storage: StorageConfig | None = None,
               ) -> dict[str, tuple[np.ndarray, list[int]]]:
    """The crops of the given item keys: ``{item_key: (uint8 [n, S, S, 3], frame
    indices)}``, frames in decode order. Reads only the parts that hold them."""
    fs, path = filesystem_for(directory, storage)
    wanted = pa.array(sorted(set(keys)), pa.string())
    index_parts = _list_parts(fs, path, ".items.parquet")
    files = set()
    for p in index_parts:
        with fs.open(p, "rb") as f:
            t = pq.read_table(f, columns=["item_key", "crops_file"])
        t = t.filter(pc.is_in(t["item_key"], value_set=wanted))
        files.update(x for x in t["crops_file"].to_pylist() if x)
    out: dict[str, tuple[list, list]] = {}
    for name in sorted(files):
        with fs.open(f"{path}/{name}", "rb") as f:
            pf = pq.ParquetFile(f)
            for g in range(pf.num_row_groups):
                t = pf.read_row_group(g, columns=["item_key", "frame_index", "crop_size", "crop"])
                t = t.filter(pc.is_in(t["item_key"], value_set=wanted))
                for k, fi, s, c in zip(t["item_key"].to_pylist(), t["frame_index"].to_pylist(),
                                       t["crop_size"].to_pylist(), t["crop"].to_pylist()):
                    crops, idx = out.setdefault(k, ([], []))
                    crops.append(np.frombuffer(c, np.uint8).reshape(s, s, 3))
                    idx.append(fi)
    result = {}
    for k, (crops, idx) in out.items():
        order = np.argsort(idx, kind="stable")
        result[k] = (np.stack([crops[i] for i in order]), [idx[i] for i in order])
    return result
