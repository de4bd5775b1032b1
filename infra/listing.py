"""Streaming listing of an archive: a local folder or an ``s3://`` prefix, page by page.

:func:`iter_listing` yields one pyarrow record batch per page of keys (S3's paginated
``ListObjectsV2``, 1,000 keys a page; a lazy ``os.scandir`` walk locally), so a prefix
with millions of keys is never held in memory at once. Each batch has
:data:`LISTING_SCHEMA`: ``uri``, ``size``, ``etag`` (S3) or null, ``mtime`` and
``media_type``. The size plus etag (S3) or size plus mtime (local) is the change key the
ledger compares between runs, so nothing is hashed or downloaded to decide what changed.

Keys are kept when they match an ``--include`` glob (all keys when there is none), match
no ``--exclude`` glob, and look like media: by extension, or, for keys with no
extension, by their first bytes (one small range read each, in parallel). Hidden files
and folders (a name starting with ``.``) are skipped: that is where editors and our own
writers keep half-written files.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache

import pyarrow as pa
import pyarrow.parquet as pq

from deepaudit.infra.mediatypes import MEDIA_TYPES, media_type_by_name
from deepaudit.infra.storage import StorageConfig, check_readable, filesystem_for, is_s3

LISTING_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("size", pa.int64()),
        ("etag", pa.string()),  # S3 only: changes whenever the object's bytes change
        ("mtime", pa.timestamp("us", tz="UTC")),
        ("media_type", pa.string()),  # "video" or "image", from the extension or magic bytes
    ]
)
SNIFF_BYTES = 512


@dataclass(frozen=True)
class ListingConfig:
    """What to keep from a listing."""

    include: tuple[str, ...] = ()  # globs on the key relative to the prefix; empty: all
    exclude: tuple[str, ...] = ()
    media_types: tuple[str, ...] = MEDIA_TYPES
    sniff: bool = True  # read the first bytes of keys that have no extension
    page_size: int = 1000  # keys per S3 request and per yielded batch
    sniff_workers: int = 16

    def __post_init__(self) -> None:
        unknown = set(self.media_types) - set(MEDIA_TYPES)
        if unknown or not self.media_types:
            raise ValueError(f"--media-type must be video or image, got "
                             f"{', '.join(sorted(unknown)) or 'none'}")
        if not 1 <= self.page_size <= 1000:
            raise ValueError(f"page_size must be in [1, 1000] (S3's limit), got {self.page_size}")
        if self.sniff_workers < 1:
            raise ValueError(f"sniff_workers must be >= 1, got {self.sniff_workers}")
        for pattern in self.include + self.exclude:
            if not pattern or pattern.startswith("/"):
                raise ValueError(f"glob {pattern!r} must be non-empty and relative to the prefix")


@dataclass
class ListingStats:
    """Counts of one listing, filled in while it streams."""

    listed: int = 0  # objects seen under the prefix (hidden ones excluded)
    kept: int = 0
    excluded: int = 0  # dropped by --include/--exclude
    not_media: int = 0  # no media extension and no media magic bytes
    sniffed: int = 0  # extensionless keys whose first bytes were read
    by_type: dict[str, int] = field(default_factory=dict)


@lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """A compiled regex for a path glob: ``*`` and ``?`` stay inside one path segment,
    ``**`` crosses segments and ``**/`` also matches no folder at all; ``[...]`` classes
    work as in fnmatch."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append(f"[{body.replace(chr(92), chr(92) * 2)}]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


def glob_match(pattern: str, relative_key: str) -> bool:
    """Does ``pattern`` match the key? A pattern without ``/`` also matches the base name
    alone, as in .gitignore (``*.mp4`` matches ``a/b/c.mp4``)."""
    if glob_regex(pattern).match(relative_key):
        return True
    return "/" not in pattern and bool(glob_regex(pattern).match(relative_key.rsplit("/", 1)[-1]))


def has_extension(key: str) -> bool:
    name = key.rsplit("/", 1)[-1]
    return "." in name.lstrip(".")


def media_type_by_magic(head: bytes) -> str | None:
    """``video``/``image`` from a file's first bytes (container and image signatures)."""
    if len(head) >= 12 and head[4:8] == b"ftyp":  # ISO BMFF: mp4, mov, 3gp, heic, avif
        return "image" if head[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif") else "video"
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # Matroska / WebM
        return "video"
    if head.startswith(b"RIFF") and len(head) >= 12:
        return {b"AVI ": "video", b"WEBP": "image"}.get(head[8:12])
    if head.startswith((b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3", b"FLV\x01",
                        b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", b"GIF87a", b"GIF89a")):
        return "video"  # MPEG-PS/ES, FLV, ASF/WMV, (animated) GIF
    if len(head) > 188 and head[0] == 0x47 and head[188] == 0x47:  # MPEG-TS sync bytes
        return "video"
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*")):
        return "image"
    return None


def _s3_pages(fs, path: str, page_size: int) -> Iterator[list[tuple[str, str, int, str, int]]]:
    """Pages of (relative key, s3 uri, size, etag, mtime in µs) from ListObjectsV2."""
    bucket, _, key_prefix = path.partition("/")
    key_prefix = key_prefix.strip("/")
    key_prefix = f"{key_prefix}/" if key_prefix else ""
    token = None
    while True:
        kwargs = {"Bucket": bucket, "Prefix": key_prefix, "MaxKeys": page_size}
        if token:
            kwargs["ContinuationToken"] = token
        resp = fs.call_s3("list_objects_v2", **kwargs)
        page = []
        for obj in resp.get("Contents", []):
            key = obj["Key"]
            if key.endswith("/"):  # folder markers
                continue
            page.append((key[len(key_prefix):], f"s3://{bucket}/{key}", int(obj["Size"]),
                         str(obj.get("ETag", "")).strip('"'), _micros(obj["LastModified"])))
        yield page
        if not resp.get("IsTruncated"):
            return
        token = resp["NextContinuationToken"]


def _micros(when: datetime) -> int:
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return round(when.timestamp() * 1_000_000)


def _local_pages(root: str, page_size: int) -> Iterator[list[tuple[str, str, int, None, int]]]:
    """Pages of (relative key, path, size, None, mtime in µs) from a lazy scandir walk."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root} does not exist" if not os.path.exists(root) else
                                f"{root} is not a folder")
    stack, page = [root], []
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file():
                    st = entry.stat()
                    page.append((os.path.relpath(entry.path, root).replace(os.sep, "/"),
                                 entry.path, st.st_size, None, st.st_mtime_ns // 1000))
                    if len(page) >= page_size:
                        yield page
                        page = []
    if page:
        yield page


def iter_listing(
    prefix: str,
    storage: StorageConfig | None = None,
    config: ListingConfig | None = None,
    stats: ListingStats | None = None,
) -> Iterator[pa.RecordBatch]:
    """Yield :data:`LISTING_SCHEMA` batches of the media under ``prefix``, one per page."""
    config = config or ListingConfig()
    stats = stats if stats is not None else ListingStats()
    check_readable(prefix, storage, what="prefix")  # credentials, bucket, endpoint
    fs, path = filesystem_for(prefix, storage)
    pages = _s3_pages(fs, path, config.page_size) if is_s3(prefix) else _local_pages(
        path, config.page_size)
    with ThreadPoolExecutor(config.sniff_workers) as pool:
        for page in pages:
            page = [p for p in page if not any(part.startswith(".") for part in p[0].split("/"))]
            stats.listed += len(page)
            kept = []
            for item in page:
                rel = item[0]
                if (config.include and not any(glob_match(g, rel) for g in config.include)) or \
                        any(glob_match(g, rel) for g in config.exclude):
                    stats.excluded += 1
                else:
                    kept.append(item)
            types = [media_type_by_name(item[0]) for item in kept]
            todo = [i for i, t in enumerate(types)
                    if t is None and config.sniff and not has_extension(kept[i][0])
                    and kept[i][2] > 0]
            if todo:
                stats.sniffed += len(todo)
                heads = pool.map(lambda i: _head(fs, prefix, kept[i][1]), todo)
                for i, head in zip(todo, heads):
                    types[i] = media_type_by_magic(head)
            rows = [(item, t) for item, t in zip(kept, types) if t in config.media_types]
            stats.not_media += sum(t is None for t in types)
            stats.excluded += sum(t is not None and t not in config.media_types for t in types)
            if not rows:
                continue
            stats.kept += len(rows)
            for _, t in rows:
                stats.by_type[t] = stats.by_type.get(t, 0) + 1
            yield pa.RecordBatch.from_arrays(
                [
                    pa.array([r[0][1] for r in rows], pa.string()),
                    pa.array([r[0][2] for r in rows], pa.int64()),
                    pa.array([r[0][3] for r in rows], pa.string()),
                    pa.array([r[0][4] for r in rows], pa.timestamp("us", tz="UTC")),
                    pa.array([r[1] for r in rows], pa.string()),
                ],
                schema=LISTING_SCHEMA,
            )


def _head(fs, prefix: str, uri: str) -> bytes:
    """The first bytes of an object: a range read, never the whole object."""
    path = uri.split("://", 1)[1] if is_s3(prefix) else uri
    try:
        return fs.cat_file(path, start=0, end=SNIFF_BYTES)
    except (OSError, ValueError):
        return b""


def listing_table(prefix: str, storage: StorageConfig | None = None,
                  config: ListingConfig | None = None,
                  stats: ListingStats | None = None) -> pa.Table:
    """The whole listing as one Arrow table (columnar: about 100 bytes a key)."""
    batches = list(iter_listing(prefix, storage, config, stats))
    return pa.Table.from_batches(batches, schema=LISTING_SCHEMA)


def write_manifest(
    prefix: str,
    output: str,
    storage: StorageConfig | None = None,
    config: ListingConfig | None = None,
    row_group_rows: int = 65_536,
) -> ListingStats:
    """Stream the listing of ``prefix`` into a Parquet manifest at ``output``.

    Pages are buffered only up to one row group, so memory stays flat however many keys
    the prefix holds. The file appears only when complete (a temporary name and a rename
    locally; on S3 the upload completes on close).
    """
    if not output.lower().endswith((".parquet", ".pq")):
        raise ValueError(f"the manifest is written as Parquet: name it *.parquet, got {output!r}")
    stats = ListingStats()
    check_readable(prefix, storage, what="prefix")  # before the output is created
    fs, path = filesystem_for(output, storage)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = path if is_s3(output) else f"{parent}/.{path.rsplit('/', 1)[-1]}.inprogress"
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    try:
        with fs.open(tmp, "wb") as sink, pq.ParquetWriter(sink, LISTING_SCHEMA,
                                                          compression="zstd") as writer:
            for batch in iter_listing(prefix, storage, config, stats):
                pending.append(batch)
                pending_rows += batch.num_rows
                if pending_rows >= row_group_rows:
                    writer.write_table(pa.Table.from_batches(pending, schema=LISTING_SCHEMA))
                    pending, pending_rows = [], 0
            if pending or stats.kept == 0:
                writer.write_table(pa.Table.from_batches(pending, schema=LISTING_SCHEMA))
    except BaseException:
        if tmp != path:  # a failed listing leaves no half-written file behind
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    if tmp != path:
        os.replace(tmp, path)
    return stats
