"""Leave one family out: folds come from the items' family column, never from code."""

from __future__ import annotations

import pytest

from deepaudit.training.families import (
    calibration_split,
    family_folds,
    family_of,
    parse_merge,
    summarise,
)


def _item(key, family, label, media="image", group=None, source="src"):
    return {"item_key": key, "family": family, "label": label, "media_type": media,
            "group": group or key, "source": source}


ITEMS = [
    _item("a1", "swap", 1), _item("a2", "swap", 0), _item("a3", "swap", 1, "video"),
    _item("b1", "gan", 1), _item("b2", "t2i", 1),
    _item("c1", "talk", 1, "video"), _item("c2", "talk", 0, "video"),
    _item("p1", "real-photo", 0), _item("p2", "real-photo", 0),
    _item("v1", "real-talking", 0, "video"), _item("v2", "real-talking", 0, "image"),
    _item("v3", "real-talking", 0, "video"),
]


def test_every_family_with_fakes_is_a_fold_and_pools_follow_the_media():
    folds = {f.name: f for f in family_folds(ITEMS)}
    assert sorted(folds) == ["gan", "swap", "t2i", "talk"]  # reals-only families: no fold
    assert folds["gan"].pools == ("real-photo",)
    assert folds["talk"].pools == ("real-talking",)  # mostly videos
    assert folds["swap"].pools == ("real-photo", "real-talking")  # images and a clip
    held = {i["item_key"] for i in ITEMS if folds["swap"].held_out(i)}
    assert held == {"a1", "a2", "a3", "p1", "p2", "v1", "v2", "v3"}
    # A family added to the data becomes a fold.
    more = family_folds(ITEMS + [_item("d1", "new-kind", 1)])
    assert "new-kind" in {f.name for f in more}


def test_merged_families_are_held_out_together():
    folds = {f.name: f for f in family_folds(ITEMS, parse_merge(["t2i=gan"]))}
    assert "t2i" not in folds and folds["gan"].families == ("gan", "t2i")
    with pytest.raises(ValueError, match="families with fakes"):
        family_folds(ITEMS, {"t2i": "real-photo"})
    with pytest.raises(ValueError, match="FAMILY=INTO"):
        parse_merge(["t2i"])


def test_family_falls_back_to_the_source():
    assert family_of({"family": None, "source": "ffpp"}) == "ffpp"


def test_the_calibration_split_keeps_groups_whole_and_is_stable():
    items = [_item(f"k{i}", "f", i % 2, group=f"g{i // 3}") for i in range(300)]
    fit, cal = calibration_split(items, 0.2, seed=0)
    assert fit | cal == {i["item_key"] for i in items} and not fit & cal
    assert 0.1 < len(cal) / len(items) < 0.3
    for g in {i["group"] for i in items}:
        keys = {i["item_key"] for i in items if i["group"] == g}
        assert keys <= fit or keys <= cal
    assert calibration_split(items, 0.2, seed=0) == (fit, cal)


def test_summary_names_the_worst_family():
    s = summarise({"a": 0.9, "b": 0.6, "c": None})
    assert s == {"mean_auc": 0.75, "min_auc": 0.6, "worst_family": "b"}
