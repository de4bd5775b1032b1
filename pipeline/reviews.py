"""Reviews: a person's judgement of an audited item, kept next to the output.

Layout (OUT is an audit output folder or a ledger, local or ``s3://``)::

    OUT/_reviews/review-<UTC time>-<random>.parquet    one part per review (or batch)

A review is an append-only row (:data:`REVIEW_SCHEMA`): nothing is ever rewritten or
deleted, and no verdict file is touched. The latest review of a media id (by
``reviewed_at``, then by part name) is the one that counts; the others are its history.
Local parts are written under a temporary name and renamed; an S3 object exists only
once its upload completes, so a reader never sees half a part.

This module knows nothing of the web server: ``deepaudit serve`` writes reviews,
``deepaudit query`` and ``deepaudit report`` read them, and training can too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deepaudit.infra.storage import (
    OutputError,
    StorageConfig,
    check_writable,
    filesystem_for,
    is_s3,
    join,
)
from deepaudit.pipeline.ledger import latest_rows

log = logging.getLogger(__name__)

FOLDER = "_reviews"
REVIEWS = ("fake", "real", "unsure")
MAX_NOTE = 2000
MAX_REVIEWER = 100
REVIEW_SCHEMA = pa.schema([
    ("media_id", pa.string()),
    ("uri", pa.string()),
    ("fingerprint", pa.string()),  # the reviewed verdict row's (size, mtime/etag, sha256)
    ("model", pa.string()),  # the model whose verdict was reviewed
    ("run_id", pa.string()),
    ("review", pa.string()),  # fake / real / unsure
    ("note", pa.string()),
    ("reviewer", pa.string()),
    ("reviewed_at", pa.timestamp("us", tz="UTC")),
])
# What a review says about a verdict: see review_state().
STATES = ("unreviewed", "reviewed", "confirmed", "overturned", "unsure")


class ReviewError(ValueError):
    """A review that cannot be taken: the message says why."""


# Unicode categories review text (a note, a reviewer name) may not hold: controls,
# formatting characters (the bidi overrides and isolates U+202A-U+202E and U+2066-U+2069,
# zero-width spaces, BOMs), line and paragraph separators, surrogates and private use. They
# hide or reorder text on a page ("txt.exe" shown for "exe.txt"). Tab and new line are text;
# the zero-width (non-)joiners U+200C/U+200D are needed by Persian, Indic scripts and emoji.
REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co"})
ALLOWED = frozenset({"\n", "\t", "\u200c", "\u200d"})


def text_problem(text: str | None, what: str = "note", limit: int = MAX_NOTE) -> str | None:
    """Why ``text`` cannot be kept as review text (too long, or characters of
    :data:`REFUSED_CATEGORIES`), or None. The one rule for every writer:
    :func:`review_row` (what ``deepaudit serve`` builds its rows with) and
    :meth:`ReviewStore.append` (rows built by hand) raise :class:`ReviewError` with it."""
    if text is None:
        return None
    if len(text) > limit:
        return f"the {what} is longer than {limit} characters"
    bad = sorted({c for c in text.replace("\r\n", "\n") if c not in ALLOWED
                  and unicodedata.category(c) in REFUSED_CATEGORIES})
    if not bad:
        return None
    shown = ", ".join(f"U+{ord(c):04X}" for c in bad[:5])
    return (f"the {what} contains control characters ({shown}): they can hide or reorder "
            "text; remove them")


def _clean(text: str | None, what: str, limit: int) -> str | None:
    if text is None:
        return None
    text = text.replace("\r\n", "\n").strip()
    problem = text_problem(text, what, limit)
    if problem:
        raise ReviewError(problem)
    return text or None


def check_row(row: dict) -> None:
    """Raise :class:`ReviewError` unless ``row`` is one :func:`review_row` could have made:
    a media id, a review of :data:`REVIEWS`, a note and a reviewer name :func:`text_problem`
    accepts."""
    if row.get("review") not in REVIEWS:
        raise ReviewError(f"a review is one of {', '.join(REVIEWS)}, got {row.get('review')!r}")
    if not row.get("media_id"):
        raise ReviewError("the reviewed item has no media id")
    for key, what, limit in (("note", "note", MAX_NOTE),
                             ("reviewer", "reviewer name", MAX_REVIEWER)):
        value = row.get(key)
        if value is not None and not isinstance(value, str):
            raise ReviewError(f"the {what} must be text, got {type(value).__name__}")
        problem = text_problem(value, what, limit)
        if problem:
            raise ReviewError(problem)
    if not (row.get("reviewer") or "").strip() or "\n" in row["reviewer"]:
        raise ReviewError("the reviewer name must be one line of visible text")


def check_reviewer(name: str) -> str:
    """``name`` as a reviewer name, or :class:`ReviewError`."""
    cleaned = _clean(name, "reviewer name", MAX_REVIEWER)
    if not cleaned or "\n" in cleaned:
        raise ReviewError("the reviewer name must be one line of visible text")
    return cleaned


def review_row(item: dict, review: str, note: str | None, reviewer: str,
               now: datetime | None = None) -> dict:
    """The review row of a verdict row ``item`` (its media_id, uri, fingerprint, model
    and run_id), validated."""
    if review not in REVIEWS:
        raise ReviewError(f"a review is one of {', '.join(REVIEWS)}, got {review!r}")
    if not item.get("media_id"):
        raise ReviewError("the reviewed item has no media id")
    return {"media_id": item["media_id"], "uri": item.get("uri"),
            "fingerprint": item.get("fingerprint"), "model": item.get("model"),
            "run_id": item.get("run_id"), "review": review,
            "note": _clean(note, "note", MAX_NOTE), "reviewer": check_reviewer(reviewer),
            "reviewed_at": now or datetime.now(timezone.utc)}


def review_state(review: str | None, verdict: str | None) -> str:
    """What the latest ``review`` says of a ``verdict``: ``unreviewed``; ``confirmed``
    (they agree); ``overturned`` (fake against real, or real against fake); ``unsure``;
    or ``reviewed`` (a fake/real review of an item without a verdict)."""
    if review is None:
        return "unreviewed"
    if review == "unsure":
        return "unsure"
    if verdict not in ("fake", "real"):
        return "reviewed"
    return "confirmed" if review == verdict else "overturned"


def empty() -> pa.Table:
    return REVIEW_SCHEMA.empty_table()


def latest_reviews(reviews: pa.Table) -> pa.Table:
    """The latest review per media id (by ``reviewed_at``, then by the order the rows
    were read: part names sort by time), ordered by media id."""
    t = latest_rows(reviews, ("media_id",), "reviewed_at")
    return t.take(pc.sort_indices(t["media_id"]))


class ReviewStore:
    """The ``_reviews/`` folder of an output or a ledger ``target``."""

    def __init__(self, target: str, storage: StorageConfig | None = None) -> None:
        self.storage = storage or StorageConfig()
        self.uri = join(target, FOLDER)

    def problem(self) -> str | None:
        """Why reviews cannot be written here (a file in the way, no permission, a
        read-only filesystem, credentials that may not write), or None when they can.
        Writes and deletes one probe file (in the folder, or locally in its nearest
        existing parent); creates nothing."""
        try:
            check_writable(self.uri, self.storage, what="the review folder")
        except OutputError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - botocore and the like
            return f"the review folder {self.uri} cannot be written ({type(exc).__name__})"
        return None

    def append(self, rows: list[dict]) -> str:
        """Write ``rows`` as one new part; returns its URI. Raises OSError (and
        botocore's errors) when it cannot be written: FileNotFoundError when the target
        itself is gone (only the ``_reviews`` folder is ever made). A row that
        :func:`check_row` refuses is :class:`ReviewError`, and nothing is written."""
        for row in rows:
            check_row(row)
        table = pa.Table.from_pylist(rows, schema=REVIEW_SCHEMA)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"review-{stamp}-{secrets.token_hex(4)}.parquet"
        fs, folder = filesystem_for(self.uri, self.storage)
        if is_s3(self.uri):
            with fs.open(f"{folder}/{name}", "wb") as f:  # exists once the upload completes
                pq.write_table(table, f)
            return join(self.uri, name)
        # The folder, never its parents: an output deleted under a running server is not
        # made again (FileNotFoundError).
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder)
        tmp = os.path.join(folder, f".{name}.tmp")
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, os.path.join(folder, name))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return os.path.join(folder, name)

    def parts(self) -> list[str]:
        fs, folder = filesystem_for(self.uri, self.storage)
        try:
            if not fs.isdir(folder):
                return []
            return sorted(fs.glob(f"{folder}/review-*.parquet"))
        except FileNotFoundError:
            return []

    def read(self) -> pa.Table:
        """Every review, oldest part first (:data:`REVIEW_SCHEMA`). A part that cannot
        be read is left out with a warning; a folder that cannot be listed reads as no
        reviews, with a warning."""
        try:
            parts = self.parts()
        except Exception as exc:  # noqa: BLE001 - OS, Arrow and botocore errors alike
            log.warning("reviews: cannot list %s: %s", self.uri, exc)
            return empty()
        if not parts:
            return empty()
        fs, _ = filesystem_for(self.uri, self.storage)

        def read_one(path: str) -> pa.Table | None:
            try:
                with fs.open(path, "rb") as f:
                    t = pq.read_table(f)
                return t.select(REVIEW_SCHEMA.names).cast(REVIEW_SCHEMA)
            except Exception as exc:  # noqa: BLE001 - a broken part must not hide the rest
                log.warning("reviews: skipping %s: %s", path, exc)
                return None

        with ThreadPoolExecutor(max_workers=min(16, len(parts))) as pool:
            tables = [t for t in pool.map(read_one, parts) if t is not None]
        return pa.concat_tables(tables) if tables else empty()


def read_reviews(target: str, storage: StorageConfig | None = None) -> pa.Table:
    """Every review of ``target`` (an output folder or a ledger)."""
    return ReviewStore(target, storage).read()
