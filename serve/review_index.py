"""The reviews a running ``deepaudit serve`` knows: read once at start (``deepaudit
query``'s ``reviews`` view), then kept up to date in memory as this server writes them.
The latest review per media id is what the pages show and filter on: in Python for the
item pages, as a DuckDB table ``_review_latest`` for the exports' SQL
(:data:`~.item_query.REVIEW_SQL`), and as one code per row for the pages' masks."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepaudit.pipeline import reviews as rv

# What a row's latest review says, as a code per row (row_kinds).
NONE, FAKE, REAL, UNSURE = 0, 1, 2, 3


class ReviewIndex:
    """Every review of the snapshot's media, and the latest per media id. ``media_ids``
    are the snapshot's rows' media ids in row-id order."""

    def __init__(self, con, media_ids: pa.ChunkedArray) -> None:
        self.con, self.media_ids = con, media_ids
        self.lock = threading.Lock()
        self.version = 0  # one more per add(): masks made from older reviews are stale
        self.table = rv.empty()
        self.latest: dict[str, dict] = {}
        self._media = None  # media_id dictionary codes, made on the first review filter
        con.execute("CREATE TABLE _review_latest (media_id VARCHAR, review VARCHAR)")

    def add(self, rows: pa.Table) -> None:
        """Take in review rows (read at start, or just written): the latest per media id
        is recomputed, and the filters and exports see it from now on."""
        with self.lock:
            rows = rows.select(rv.REVIEW_SCHEMA.names).cast(rv.REVIEW_SCHEMA)
            self.table = pa.concat_tables([self.table, rows])
            latest = rv.latest_reviews(self.table)
            self.latest = {r["media_id"]: r for r in latest.to_pylist()}
            cur = self.con.cursor()
            cur.register("_new_latest", latest.select(["media_id", "review"]))
            cur.execute("BEGIN")
            cur.execute("DELETE FROM _review_latest")
            cur.execute("INSERT INTO _review_latest SELECT * FROM _new_latest")
            cur.execute("COMMIT")
            cur.unregister("_new_latest")
            cur.close()
            self.version += 1

    def of(self, media_id: str | None) -> dict | None:
        """The latest review of ``media_id``, or None."""
        return self.latest.get(media_id)

    def history(self, media_id: str) -> list[dict]:
        """Every review of ``media_id``, newest first."""
        with self.lock:
            t = self.table
        found = t.filter(pc.equal(t["media_id"], media_id)).to_pylist()
        return sorted(found, key=lambda r: r["reviewed_at"], reverse=True)

    def row_kinds(self) -> np.ndarray:
        """Per row (in row-id order): what the latest review of its media id says,
        :data:`NONE`, :data:`FAKE`, :data:`REAL` or :data:`UNSURE`."""
        with self.lock:
            if self._media is None:  # media_id as dictionary codes, -1 for null
                arr = self.media_ids.combine_chunks().dictionary_encode()
                codes = pc.fill_null(arr.indices, -1).to_numpy(zero_copy_only=False)
                self._media = (codes.astype(np.int64), arr.dictionary)
            codes, dictionary = self._media
            latest = list(self.latest.values())
        # Per media code; the last slot is for null ids.
        kind = np.zeros(len(dictionary) + 1, np.int8)
        if latest:
            where = pc.index_in(pa.array([r["media_id"] for r in latest], pa.string()),
                                value_set=dictionary).to_numpy(zero_copy_only=False)
            said = np.array([("fake", "real", "unsure").index(r["review"]) + 1
                             if r["review"] in ("fake", "real", "unsure") else NONE
                             for r in latest], np.int8)
            found = ~np.isnan(where.astype(float))
            kind[where[found].astype(np.int64)] = said[found]
        return kind[codes]  # codes == -1 reads the last slot: NONE
