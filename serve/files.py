"""The files ``deepaudit serve`` reads after its snapshot: an item's list columns from its
run's verdict file (only while that file is as it was at start), its evidence (only under
``OUT/evidence/`` of its run) and its source media (a local path, or a bucket the output
names). No route takes a path: every file here is found through a verdict row."""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import pyarrow.compute as pc

from deepaudit.infra.storage import StorageConfig, filesystem_for, is_s3, join
from deepaudit.serve.common import Gone, Unavailable, storage_errors

log = logging.getLogger(__name__)

LIST_COLUMNS = ("face_boxes", "frame_indices", "frame_p_fake", "frame_weights",
                "dropped_frames")
# An output folder deleted (FileNotFound), or replaced by a file (NotADirectory).
MISSING = (FileNotFoundError, NotADirectoryError)


@dataclass
class RunInfo:
    run_id: str
    run_dir: str  # OUT/runs/<run_id>, local path or s3:// URI
    root: str  # OUT
    summary: dict = field(default_factory=dict)


def gone_message(run_id: str) -> str:
    return (f"run {run_id!r} was removed or rewritten after this server started: restart "
            "deepaudit serve to see the runs as they are now")


def stamp(info: dict) -> tuple:
    """What tells a rewritten file from the one read at start: size and modification time
    (local; plus the inode), or size, ETag and LastModified (S3)."""
    return (info.get("size"), info.get("mtime"), info.get("ino"), info.get("ETag"),
            str(info.get("LastModified") or ""))


@dataclass
class Source:
    """One verdict file as it was when the snapshot was taken."""

    run_id: str
    uri: str
    fs: Any
    path: str
    stamp: tuple
    groups: list[tuple[int, int | None, int | None]]  # (row group, min, max manifest_row)

    def check(self) -> None:
        """:class:`Gone` when the file is gone or changed since the start (the output
        deleted, or replaced by a file, included); :class:`Unavailable` when it cannot be
        looked at now."""
        try:
            if stamp(self.fs.info(self.path)) != self.stamp:
                raise Gone(gone_message(self.run_id))
        except MISSING:
            raise Gone(gone_message(self.run_id)) from None
        except storage_errors() as exc:
            raise self._unavailable(exc) from None

    def read_row(self, run_id: str, row: int) -> dict | None:
        """The list columns of the verdict row (run_id, row) in this file, None when it is
        not here; :class:`Gone` when the file is gone or changed, :class:`Unavailable`
        when it cannot be read now."""
        groups = [g for g, lo, hi in self.groups
                  if lo is None or hi is None or lo <= row <= hi]
        if not groups:
            return None
        self.check()
        try:
            import pyarrow.parquet as pq

            # A plain, synchronous read of the file opened now (never the start's dataset).
            with self.fs.open(self.path, "rb") as f:
                pf = pq.ParquetFile(f)
                names = set(pf.schema_arrow.names)
                cols = [c for c in LIST_COLUMNS if c in names]
                for g in groups:
                    t = pf.read_row_group(g, columns=["run_id", "manifest_row", *cols],
                                          use_threads=False)
                    hit = pc.and_(pc.equal(t["manifest_row"], row),
                                  pc.equal(t["run_id"], run_id))
                    found = t.filter(pc.fill_null(hit, False))
                    if found.num_rows:
                        return {c: found[c][0].as_py() for c in cols}
        except MISSING:
            raise Gone(gone_message(self.run_id)) from None
        except storage_errors() as exc:
            raise self._unavailable(exc) from None
        return None

    def _unavailable(self, exc: BaseException) -> Unavailable:
        log.warning("serve: reading %s failed: %s", self.uri, exc)
        return Unavailable(f"run {self.run_id!r}'s verdict file cannot be read now "
                           f"({type(exc).__name__}): check the storage and its credentials")


def verdict_sources(con, target: str, storage: StorageConfig) -> dict[str, list[Source]]:
    """Every run's verdict files, with their stamps and manifest_row ranges per row group
    (from the Parquet footers): under OUT/runs/<run_id>/, or those the ledger names."""
    import pyarrow.parquet as pq

    ledger = con.execute("SELECT DISTINCT run_id, verdict_file FROM ledger "
                         "WHERE verdict_file IS NOT NULL").fetchall()
    if ledger:
        files = sorted(ledger, key=lambda r: (str(r[0]), r[1]))
    else:
        fs, path = filesystem_for(target, storage)
        files = []
        for f in sorted(fs.glob(f"{path}/runs/*/verdicts-*.parquet")):
            uri = f"s3://{f}" if is_s3(target) else f
            files.append((f.rstrip("/").rsplit("/", 2)[-2], uri))
    found: dict[str, list[Source]] = {}
    filesystems: dict[bool, Any] = {}  # one S3 filesystem (a client each) for all the files
    for run_id, uri in files:
        fs, path = filesystem_for(uri, storage)
        fs = filesystems.setdefault(is_s3(uri), fs)
        try:
            st = stamp(fs.info(path))
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
        except storage_errors() as exc:  # the snapshot will say what is wrong
            log.warning("serve: cannot read %s: %s", uri, exc)
            continue
        names = [meta.schema.column(i).name for i in range(meta.num_columns)]
        j = names.index("manifest_row") if "manifest_row" in names else None
        groups = []
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(j).statistics if j is not None else None
            ok = stats is not None and stats.has_min_max
            groups.append((g, stats.min if ok else None, stats.max if ok else None))
        found.setdefault(run_id, []).append(Source(run_id, uri, fs, path, st, groups))
    return found


class MediaFiles:
    """An item's evidence and source media, found through its verdict row only."""

    def __init__(self, runs: dict[str, RunInfo], buckets: set[str],
                 storage: StorageConfig) -> None:
        self.runs, self.buckets, self.storage = runs, buckets, storage

    def media_source(self, uri: str | None) -> tuple[Any, str] | None:
        """``(fs, path)`` to draw an item's source media from, or None: a local path, or
        an ``s3://`` key in a bucket this output names (its own, its verdict files', its
        runs' manifests'): a row cannot send the server to any bucket it likes."""
        if not uri or not isinstance(uri, str) or "\x00" in uri:
            return None
        if is_s3(uri) and bucket(uri) not in self.buckets:
            return None
        try:
            return filesystem_for(uri, self.storage)
        except storage_errors():
            return None

    def media_reachable(self, uri: str | None) -> bool:
        found = self.media_source(uri)
        if found is None:
            return False
        fs, path = found
        try:
            return bool(fs.isfile(path))
        except storage_errors() as exc:  # no credentials, an unreachable endpoint
            log.info("serve: media %s not reachable: %s", uri, exc)
            return False

    def evidence(self, item: dict, suffix: str) -> tuple[Any, str] | None:
        """``(fs, path)`` of the item's evidence strip (``.png``) or its JSON, only when
        it lies under ``OUT/evidence/`` of the item's own run; else None."""
        from deepaudit.pipeline.evidence import evidence_dirname, safe_filename

        info = self.runs.get(item.get("run_id"))
        if info is None:
            return None
        root = join(info.root, "evidence")
        candidates = []
        if item.get("evidence"):
            candidates.append(item["evidence"])
        candidates.append(join(root, evidence_dirname(item["media_id"]),
                               safe_filename(item["run_id"]) + ".png"))
        for cand in candidates:
            if not isinstance(cand, str) or not cand.endswith(".png"):
                continue
            cand = cand[: -len(".png")] + suffix
            resolved = under(cand, root, self.storage)
            if resolved is None:
                continue
            fs, path = resolved
            try:
                if fs.isfile(path):
                    return fs, path
            except storage_errors():
                continue
        return None


def under(uri: str, root: str, storage: StorageConfig) -> tuple[Any, str] | None:
    """``(fs, path)`` of ``uri`` when it resolves inside ``root`` (same scheme, no ``..``,
    symlinks followed for local paths); None otherwise."""
    if is_s3(uri) != is_s3(root) or "\x00" in uri:
        return None
    if is_s3(uri):
        key, base = uri.split("://", 1)[1], root.split("://", 1)[1].rstrip("/")
        if ".." in key.split("/") or posixpath.normpath(key) != key:
            return None
        if not key.startswith(base + "/"):
            return None
        fs, _ = filesystem_for(root, storage)
        return fs, key
    fs, path = filesystem_for(uri, storage)
    _, base = filesystem_for(root, storage)
    real, real_base = os.path.realpath(path), os.path.realpath(base)
    if os.path.commonpath([real, real_base]) != real_base or real == real_base:
        return None
    return fs, real


def bucket(uri: str) -> str:
    return uri.split("://", 1)[1].split("/", 1)[0]
