"""Training inputs: layout detection, labels, groups, and identity-safe splits."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from deepaudit.training.datasets import (
    LABELLED_SCHEMA,
    DatasetError,
    SplitConfig,
    detect_layout,
    group_components,
    load_inputs,
    parse_label,
    split_table,
)


def _touch(root: Path, *rels: str) -> None:
    for rel in rels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


@pytest.fixture
def ffpp(tmp_path) -> Path:
    root = tmp_path / "FaceForensics++"
    _touch(root,
           "original_sequences/youtube/c23/videos/000.mp4",
           "original_sequences/youtube/c23/videos/003.mp4",
           "original_sequences/youtube/c23/videos/010.mp4",
           "original_sequences/youtube/c23/videos/020.mp4",
           "manipulated_sequences/Deepfakes/c23/videos/000_003.mp4",
           "manipulated_sequences/FaceSwap/c23/videos/003_000.mp4",
           "manipulated_sequences/Face2Face/c23/videos/010_020.mp4",
           "manipulated_sequences/Face2Face/c23/images/020_010/0001.png",
           "manipulated_sequences/Face2Face/c23/images/020_010/0002.png",
           "original_sequences/actors/c23/videos/01__walking.mp4",
           "manipulated_sequences/DeepFakeDetection/c23/videos/01_02__walking__ABCD.mp4",
           "original_sequences/youtube/c23/videos/readme.txt")
    return root


def test_labels_parse_words_and_numbers():
    values = ("FAKE", "real", "1", "0", " Fake ", 1, 0)
    assert [parse_label(v) for v in values] == [1, 0, 1, 0, 1, 1, 0]
    assert parse_label("unknown") is None and parse_label(None) is None and parse_label("") is None


def test_ffpp_layout_groups_swaps_with_their_identities(ffpp):
    assert detect_layout(str(ffpp)) == "ffpp"
    s = load_inputs([str(ffpp)])
    t = s.table
    assert t.schema == LABELLED_SCHEMA and t.num_rows == 11  # readme.txt is not media
    rows = {r["uri"].split("c23/")[-1]: r for r in t.to_pylist()}
    swap = rows["videos/000_003.mp4"]
    assert swap["label"] == 1 and swap["group"] == "ffpp:000" and swap["links"] == ["ffpp:003"]
    assert swap["method"] == "Deepfakes" and swap["media_type"] == "video"
    assert rows["videos/003.mp4"]["label"] == 0 and rows["videos/003.mp4"]["method"] is None
    frame = rows["images/020_010/0001.png"]
    assert frame["media_type"] == "image" and frame["sequence"].endswith("images/020_010")
    assert rows["videos/01_02__walking__ABCD.mp4"]["group"] == "ffpp-actor:01"
    comps, ignored = group_components(t)
    by_uri = dict(zip(t["uri"].to_pylist(), comps))
    same = [u for u in by_uri if u.endswith(("/000.mp4", "/003.mp4", "000_003.mp4", "003_000.mp4"))]
    assert len({by_uri[u] for u in same}) == 1 and not ignored
    assert by_uri[next(u for u in by_uri if u.endswith("/010.mp4"))] != by_uri[same[0]]


def test_celebdf_links_identities_and_falls_back_when_they_chain(tmp_path):
    root = tmp_path / "Celeb-DF-v2"
    ids = range(6)
    _touch(root, *[f"Celeb-real/id{i}_0000.mp4" for i in ids],
           *[f"Celeb-synthesis/id{i}_id{(i + 1) % 6}_0000.mp4" for i in ids],
           "YouTube-real/00000.mp4", "YouTube-real/00001.mp4")
    assert detect_layout(str(root)) == "celebdf"
    t = load_inputs([str(root)]).table
    assert Counter(t["label"].to_pylist()) == {0: 8, 1: 6}
    # The swaps chain all six identities into one component: links are dropped, and each
    # identity's real and fake videos stay together.
    comps, ignored = group_components(t)
    assert ignored
    assert comps == t["group"].to_pylist()
    assert "celebdf:id0" in comps and comps.count("celebdf:id0") == 2


def test_dfdc_groups_fakes_with_their_original(tmp_path):
    root = tmp_path / "dfdc"
    part = root / "dfdc_train_part_0"
    _touch(part, "aaa.mp4", "bbb.mp4", "ccc.mp4", "ddd.mp4")
    (part / "metadata.json").write_text(json.dumps({
        "aaa.mp4": {"label": "REAL", "split": "train"},
        "bbb.mp4": {"label": "FAKE", "split": "train", "original": "aaa.mp4"},
        "ccc.mp4": {"label": "FAKE", "split": "train", "original": "aaa.mp4"},
        "ddd.mp4": {"label": "REAL", "split": "train"},
        "gone.mp4": {"label": "FAKE", "original": "ddd.mp4"},
    }))
    assert detect_layout(str(root)) == "dfdc"
    s = load_inputs([str(root)])
    groups = dict(zip([u.rsplit("/", 1)[-1] for u in s.table["uri"].to_pylist()],
                      s.table["group"].to_pylist()))
    assert groups == {"aaa.mp4": "dfdc:aaa", "bbb.mp4": "dfdc:aaa", "ccc.mp4": "dfdc:aaa",
                      "ddd.mp4": "dfdc:ddd"}
    assert sum(s.skipped.values()) == 1  # listed but missing: counted, not silently lost


def test_folder_tree_and_manifest(tmp_path):
    tree = tmp_path / "mine"
    _touch(tree, "real/a.jpg", "real/sub/b.png", "fake/c.mp4", "other/d.jpg", "real/notes.txt")
    assert detect_layout(str(tree)) == "folders"
    s = load_inputs([str(tree)])
    assert sorted(zip(s.table["media_type"].to_pylist(), s.table["label"].to_pylist())) == [
        ("image", 0), ("image", 0), ("video", 1)]
    assert sum(s.skipped.values()) == 1  # other/d.jpg
    m = tmp_path / "train.csv"
    m.write_text("uri,label,identity,source\nmine/real/a.jpg,real,p1,x\n"
                 "mine/fake/c.mp4,FAKE,p1,x\n/abs/e.jpg,1,,y\n/abs/f.jpg,unknown,p2,y\n")
    assert detect_layout(str(m)) == "manifest"
    s = load_inputs([str(m)])
    rows = s.table.to_pylist()
    assert [r["label"] for r in rows] == [0, 1, 1]
    assert rows[0]["uri"] == str(tmp_path / "mine/real/a.jpg")  # relative to the manifest
    assert rows[0]["group"] == rows[1]["group"] == "group:p1"
    assert rows[2]["group"] == "file:/abs/e.jpg" and rows[2]["source"] == "y"
    assert s.skipped == {f"{m}: label 'unknown'": 1}


def test_exclude_drops_a_source_or_one_label_of_it_and_counts_them(tmp_path):
    m = tmp_path / "train.csv"
    m.write_text("uri,label,source\n/a.jpg,real,ffpp\n/b.jpg,fake,ffpp\n/c.png,fake,gan\n"
                 "/d.jpg,real,web\n/e.jpg,fake,web\n")
    s = load_inputs([str(m)], exclude=["gan", "web:fake"])
    assert sorted(s.table["uri"].to_pylist()) == ["/a.jpg", "/b.jpg", "/d.jpg"]
    assert s.skipped == {"excluded: gan": 1, "excluded: web:fake": 1}
    with pytest.raises(DatasetError, match="--exclude stylegan3 matches nothing"):
        load_inputs([str(m)], exclude=["stylegan3"])
    with pytest.raises(DatasetError, match="matches nothing"):
        load_inputs([str(m)], exclude=["web:bogus"])


def test_exclude_from_training_keeps_validation_whole():
    from deepaudit.training.datasets import drop_from_training

    t = pa.table({"source": ["a", "a", "a", "b"], "label": [0, 1, 1, 1],
                  "split": ["train", "train", "val", "train"]})
    kept, counts = drop_from_training(t, ["a:fake", "b"])
    assert kept.to_pylist() == [{"source": "a", "label": 0, "split": "train"},
                                {"source": "a", "label": 1, "split": "val"}]
    assert counts == {"a:fake": 1, "b": 1}
    assert drop_from_training(t, []) == (t, {})
    with pytest.raises(DatasetError, match="--exclude-from-training c matches nothing"):
        drop_from_training(t, ["c"])


def test_unknown_layout_and_missing_label_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="real/ and fake/"):
        detect_layout(str(tmp_path / "empty"))
    m = tmp_path / "m.csv"
    m.write_text("uri\n/a.jpg\n")
    with pytest.raises(DatasetError, match="label"):
        load_inputs([str(m)])


def _table(n_per_source: int = 30) -> pa.Table:
    rows = []
    for src in ("a", "b", "c"):
        for i in range(n_per_source):
            g = f"{src}:{i // 3}"  # three items per group
            rows.append({"uri": f"/{src}/{i}.jpg", "media_id": f"{src}{i}", "label": i % 2,
                         "group": g, "links": [], "sequence": None, "source": src,
                         "method": None, "media_type": "image"})
    rows.append({"uri": "/x.jpg", "media_id": "x", "label": 1, "group": "a:0",
                 "links": ["b:0", "c:0"], "sequence": None, "source": "a", "method": None,
                 "media_type": "image"})
    return pa.Table.from_pylist(rows, schema=LABELLED_SCHEMA)


def _never_cut(table: pa.Table) -> None:
    seen: dict[str, str] = {}
    for g, s in zip(table["group"].to_pylist(), table["split"].to_pylist()):
        assert seen.setdefault(g, s) == s, f"group {g} is in both splits"


def test_holdout_split_keeps_groups_whole_and_covers_each_source():
    t, rec = split_table(_table(), SplitConfig(val_fraction=0.25, seed=3))
    _never_cut(t)
    comps = dict(zip(t["group"].to_pylist(), t["component"].to_pylist()))
    assert comps["a:0"] == comps["b:0"] == comps["c:0"]  # linked through item x
    val = Counter(s for s, sp in zip(t["source"].to_pylist(), t["split"].to_pylist())
                  if sp == "val")
    assert set(val) == {"a", "b", "c"} and all(5 <= n <= 12 for n in val.values())
    assert rec["groups"]["a:3"] == t["split"].to_pylist()[t["group"].to_pylist().index("a:3")]
    assert rec["method"] == "holdout" and rec["n_groups"] == 30
    again, _ = split_table(_table(), SplitConfig(val_fraction=0.25, seed=3))
    assert again["split"].to_pylist() == t["split"].to_pylist()  # deterministic
    other, _ = split_table(_table(), SplitConfig(val_fraction=0.25, seed=4))
    assert other["split"].to_pylist() != t["split"].to_pylist()


def test_kfold_puts_every_item_in_exactly_one_validation_fold():
    counts = Counter()
    for fold in range(4):
        t, rec = split_table(_table(), SplitConfig(folds=4, fold=fold))
        _never_cut(t)
        for mid, s in zip(t["media_id"].to_pylist(), t["split"].to_pylist()):
            counts[mid] += s == "val"
        assert rec["method"] == "k-fold" and rec["fold"] == fold
    assert set(counts.values()) == {1} and len(counts) == 91


def test_split_config_is_validated():
    for bad in (dict(val_fraction=0.0), dict(val_fraction=1.0), dict(folds=1),
                dict(folds=3, fold=3)):
        with pytest.raises(ValueError):
            SplitConfig(**bad)


@pytest.mark.shared_data
def test_shared_training_set_split_by_ffpp_identity(shared_data):
    root = shared_data / "train"
    if not (root / "MANIFEST.tsv").is_file():
        pytest.skip("no shared training set")
    assert detect_layout(str(root)) == "shared"
    s = load_inputs([str(root)])
    import csv

    with (root / "MANIFEST.tsv").open() as f:
        labelled = [r for r in csv.DictReader(f, delimiter="\t") if r["label"] in ("real", "fake")]
    assert s.table.num_rows == len(labelled) > 0 and not s.skipped  # one row per labelled file
    assert s.counts()["stylegan3"] == {"real": 0, "fake": 100}
    # Each repository is a named source; DFDC clips are grouped by DFDC video id.
    assert {"utkface", "celebahq", "celeba", "dfdc", "sd_gan", "stylegan2ada"} <= set(s.counts())
    dfdc = [r for r in s.table.to_pylist() if r["source"] == "dfdc"]
    assert all(r["group"].startswith("dfdc:") for r in dfdc)
    t, rec = split_table(s.table, SplitConfig())
    _never_cut(t)
    rows = t.to_pylist()
    # FF++ ids never straddle the split, across crops and videos (real 033 and 097, and
    # the swaps 033_097 / 097_033 share one component).
    id_split: dict[str, set] = {}
    for r in rows:
        if r["source"] == "ffpp":
            for g in [r["group"], *r["links"]]:
                id_split.setdefault(g, set()).add(r["split"])
    assert all(len(v) == 1 for v in id_split.values())
    comp = {r["media_id"]: r["component"] for r in rows}
    assert comp["videos/real/ffpp_c23_original__033__mosahil.mp4"] == \
        comp["videos/real/ffpp_c23_original__097__mosahil.mp4"] == \
        comp["videos/fake/ffpp_c23_FaceSwap__033_097__mosahil.mp4"]
    crops = [r for r in rows if "ffpp_crop__036_035__" in r["media_id"]]
    assert len(crops) == 8 and len({r["sequence"] for r in crops}) == 1
    assert {"ffpp", "ciplab", "stylegan3", "ismaolen"} <= {s for s in rec["counts"]["val"]}


def test_sources_too_small_to_split_are_split_with_their_family():
    """Ten one-repository sources of one family (each repository one group): split by
    source, none could reach validation; stratified by family, some do."""
    rows = [{"uri": f"/{r}/{i}.jpg", "media_id": f"{r}{i}", "label": i % 2,
             "group": f"repo:{r}", "links": [], "sequence": None, "source": f"repo{r}",
             "method": None, "media_type": "image", "family": "face-swap"}
            for r in range(10) for i in range(6)]
    t, _ = split_table(pa.Table.from_pylist(rows, schema=LABELLED_SCHEMA),
                       SplitConfig(val_fraction=0.2, seed=0))
    _never_cut(t)
    val = {s for s, sp in zip(t["source"].to_pylist(), t["split"].to_pylist()) if sp == "val"}
    assert 1 <= len(val) <= 4
