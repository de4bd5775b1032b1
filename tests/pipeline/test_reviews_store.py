"""pipeline/reviews.py: review parts written and read back (local and S3), the latest
review per media id, what a review says of a verdict, and bad input refused."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from deepaudit.infra.storage import StorageConfig
from deepaudit.pipeline.reviews import (
    ReviewError,
    ReviewStore,
    latest_reviews,
    review_row,
    review_state,
    text_problem,
)

T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)
ITEM = {"media_id": "a.mp4", "uri": "/x/a.mp4", "fingerprint": "size=1", "model": "m@1",
        "run_id": "r1"}


def test_parts_round_trip_and_latest_wins(tmp_path):
    store = ReviewStore(str(tmp_path))
    assert store.read().num_rows == 0 and store.problem() is None
    assert not (tmp_path / "_reviews").exists()  # the check creates nothing
    store.append([review_row(ITEM, "fake", "  looks <b>odd</b> ", "ann", T0)])
    store.append([review_row(ITEM, "real", None, "bob", T0 + timedelta(seconds=1)),
                  review_row({**ITEM, "media_id": "b.mp4"}, "unsure", "", "ann", T0)])
    t = store.read()
    assert t.num_rows == 3 and t["note"].to_pylist()[0] == "looks <b>odd</b>"
    latest = {r["media_id"]: r for r in latest_reviews(t).to_pylist()}
    assert latest["a.mp4"]["review"] == "real" and latest["a.mp4"]["reviewer"] == "bob"
    assert latest["b.mp4"]["note"] is None
    # Same time: the later part wins.
    store.append([review_row(ITEM, "unsure", None, "cy", T0 + timedelta(seconds=1))])
    assert {r["media_id"]: r["review"] for r in latest_reviews(store.read()).to_pylist()} \
        == {"a.mp4": "unsure", "b.mp4": "unsure"}
    assert len(list((tmp_path / "_reviews").iterdir())) == 3  # no temporary files left


def test_states_and_bad_input(tmp_path):
    assert review_state(None, "fake") == "unreviewed"
    assert review_state("fake", "fake") == "confirmed"
    assert review_state("real", "fake") == "overturned"
    assert review_state("unsure", "fake") == "unsure"
    assert review_state("fake", None) == "reviewed"
    for bad in (dict(review="maybe"), dict(note="x" * 3000), dict(note="a\x00b"),
                dict(reviewer=""), dict(reviewer="a\nb")):
        args = {"review": "fake", "note": None, "reviewer": "ann", **bad}
        with pytest.raises(ReviewError):
            review_row(ITEM, **args)
    (tmp_path / "_reviews").write_text("a file where the folder must be")
    store = ReviewStore(str(tmp_path))
    assert "_reviews" in store.problem()
    assert store.read().num_rows == 0
    with pytest.raises(OSError):
        store.append([review_row(ITEM, "fake", None, "ann")])


def test_a_broken_part_is_skipped(tmp_path):
    store = ReviewStore(str(tmp_path))
    store.append([review_row(ITEM, "fake", None, "ann", T0)])
    (tmp_path / "_reviews" / "review-0-broken.parquet").write_bytes(b"not parquet")
    assert store.read().num_rows == 1


@pytest.mark.s3
def test_reviews_on_s3(s3_server, s3fs_client):
    store = ReviewStore("s3://audit/rev-out", StorageConfig(endpoint_url=s3_server))
    assert store.problem() is None
    store.append([review_row(ITEM, "fake", "n", "ann", T0)])
    store.append([review_row(ITEM, "real", None, "ann", T0 + timedelta(seconds=5))])
    t = store.read()
    assert t.num_rows == 2
    assert latest_reviews(t)["review"].to_pylist() == ["real"]
    assert not [k for k in s3fs_client.ls("audit/rev-out/_reviews") if "probe" in k]


# Bidi overrides and isolates, a zero-width space, a line separator, NEL, a BOM.
HIDING = ["\u202a", "\u202e", "\u2066", "\u2069", "\u200b", "\u2028", "\x85", "\ufeff"]


@pytest.mark.parametrize("char", HIDING)
def test_one_rule_refuses_hiding_characters_for_every_writer(tmp_path, char):
    """The rule serve applies holds for review_row, and for rows built by hand and given
    to ReviewStore.append (before, only ASCII controls were refused there)."""
    note = f"ok {char}txt.exe"
    assert "control characters" in text_problem(note)
    with pytest.raises(ReviewError, match=f"U\\+{ord(char):04X}"):
        review_row(ITEM, "fake", note, "ann")
    with pytest.raises(ReviewError, match="reviewer name"):
        review_row(ITEM, "fake", None, f"ann{char}x")
    good = review_row(ITEM, "fake", "fine", "ann", T0)
    store = ReviewStore(str(tmp_path))
    for bad in ({**good, "note": note}, {**good, "reviewer": f"ann{char}x"},
                {**good, "review": "maybe"}, {**good, "media_id": None}):
        with pytest.raises(ReviewError):
            store.append([good, bad])
    assert not (tmp_path / "_reviews").exists()  # nothing written, not even the folder


def test_text_in_any_script_is_kept(tmp_path):
    note = "checked\tthe source\nمی\u200cخواهم 👩\u200d👩\u200d👧 <b>x</b>"
    assert text_problem(note) is None
    store = ReviewStore(str(tmp_path))
    store.append([review_row(ITEM, "unsure", note, "Zoë", T0)])
    assert store.read()["note"].to_pylist() == [note]
