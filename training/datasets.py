"""Training inputs → one labelled table, and identity-safe train/validation splits.

Every input (a manifest, a folder tree, or a public dataset's own layout) becomes rows of
:data:`LABELLED_SCHEMA`: ``uri``, ``media_id``, ``label`` (1 = fake, 0 = real), ``group``
(the identity or source video), ``links`` (other groups the item ties together, e.g. the
two FF++ identities of a swap), ``sequence`` (images that are frames of one video),
``source``, ``method`` and ``media_type``.

Recognised layouts (:func:`detect_layout`), local or on ``s3://``:

* ``manifest``: CSV/TSV/JSONL/Parquet with ``uri`` and ``label`` (fake/real/1/0); optional
  ``group`` (or ``identity``), ``source``, ``sequence``, ``media_id``. Relative uris are
  resolved against the manifest's folder. Rows with another label are skipped and counted.
* ``shared``: a ``MANIFEST.tsv`` with ``relative_path``/``label``/``source_repo`` columns
  (the project's shared training set): FF++ ids are read from the file names.
* ``ffpp``: FaceForensics++ (``original_sequences/...`` real, ``manipulated_sequences/
  <method>/...`` fake); a fake ``A_B`` links identities A and B.
* ``celebdf``: Celeb-DF (``Celeb-real``, ``Celeb-synthesis``, ``YouTube-real``); a
  synthesis ``idA_idB_NNNN`` links identities A and B.
* ``dfdc``: DFDC folders with ``metadata.json``; a fake is grouped with its ``original``.
* ``folders``: a tree with ``real/`` and ``fake/`` sub-folders; one group per file.

Splits never cut a group: items are joined into connected components over ``group`` and
``links`` (so reals A, B and the swap A_B share a split, across images and videos), and
whole components go to train or validation, stratified by source and label.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from deepaudit.infra.mediatypes import media_type_by_name
from deepaudit.infra.storage import StorageConfig, filesystem_for, is_s3
from deepaudit.pipeline.manifest import ManifestError, parse_label, read_manifest

log = logging.getLogger(__name__)

LABELLED_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("media_id", pa.string()),
    ("label", pa.int8()),  # 1 = fake, 0 = real
    ("group", pa.string()),  # identity or source video; never split apart
    ("links", pa.list_(pa.string())),  # other groups this item ties to (same split)
    ("sequence", pa.string()),  # images that are frames of one video (null: standalone)
    ("source", pa.string()),  # dataset or sub-source, for stratification and reports
    ("method", pa.string()),  # manipulation method, when known
    ("media_type", pa.string()),  # image | video
    # The kind of manipulation a source stands for (its reals carry it too); the unit of
    # leave-one-family-out. Null when the input does not say: the source stands for it.
    ("family", pa.string()),
])

GROUP_COLUMNS = ("group", "identity", "identity_id", "group_id")


class DatasetError(ValueError):
    """The training inputs cannot be used; the message says what to fix."""


@dataclass
class LabelledSet:
    """The labelled table plus what was skipped on the way (never dropped silently)."""

    table: pa.Table
    layouts: dict[str, str] = field(default_factory=dict)  # input -> detected layout
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    def counts(self) -> dict:
        """Items per source and label: ``{source: {"real": n, "fake": n}}``."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: {"real": 0, "fake": 0})
        for src, lab in zip(self.table["source"].to_pylist(), self.table["label"].to_pylist()):
            out[src]["fake" if lab else "real"] += 1
        return dict(sorted(out.items()))


def _row(uri: str, label: int, group: str, *, links: Iterable[str] = (),
         sequence: str | None = None, source: str, method: str | None = None,
         media_id: str | None = None, media_type: str | None = None,
         family: str | None = None) -> dict:
    return {
        "uri": uri, "media_id": media_id or uri, "label": label, "group": group,
        "links": sorted(set(links) - {group}), "sequence": sequence, "source": source,
        "method": method, "media_type": media_type or media_type_by_name(uri) or "video",
        "family": family or None,
    }


# --------------------------------------------------------------------------- listing


class _Tree:
    """A local folder or s3:// prefix, listed once; paths are relative to the root."""

    def __init__(self, root: str, storage: StorageConfig) -> None:
        self.root = root.rstrip("/")
        self.fs, self.base = filesystem_for(self.root, storage)
        self.base = self.base.rstrip("/")
        self._files: list[str] | None = None

    def uri(self, rel: str) -> str:
        return f"{self.root}/{rel}" if is_s3(self.root) else f"{self.base}/{rel}"

    def isdir(self, rel: str = "") -> bool:
        return self.fs.isdir(f"{self.base}/{rel}".rstrip("/"))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(f"{self.base}/{rel}")

    def read_text(self, rel: str) -> str:
        with self.fs.open(f"{self.base}/{rel}", "rb") as f:
            return f.read().decode("utf-8")

    def children(self) -> list[str]:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.base, detail=False))

    def files(self) -> list[str]:
        """Every file under the root, relative, sorted."""
        if self._files is None:
            found = self.fs.find(self.base)
            prefix = self.base + "/"
            self._files = sorted(p[len(prefix):] for p in found if p.startswith(prefix))
        return self._files

    def media(self, under: str = "") -> list[str]:
        under = under.strip("/")
        return [p for p in self.files()
                if (not under or p.startswith(under + "/")) and media_type_by_name(p)]


# --------------------------------------------------------------------------- layouts


def detect_layout(path: str, storage: StorageConfig | None = None) -> str:
    """Which layout ``path`` holds: manifest, shared, ffpp, celebdf, dfdc or folders."""
    storage = storage or StorageConfig()
    lower = path.lower().rstrip("/")
    if lower.endswith((".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".parquet", ".pq")):
        if lower.endswith("metadata.json"):
            return "dfdc"
        return "shared" if _is_shared_manifest(path, storage) else "manifest"
    tree = _Tree(path, storage)
    if not tree.isdir():
        raise DatasetError(f"training input {path} is neither a manifest file nor a folder")
    names = {c.lower(): c for c in tree.children()}
    if "manifest.tsv" in names and _is_shared_manifest(tree.uri(names["manifest.tsv"]), storage):
        return "shared"
    if "original_sequences" in names or "manipulated_sequences" in names:
        return "ffpp"
    if {"celeb-real", "celeb-synthesis", "youtube-real"} & set(names):
        return "celebdf"
    if "metadata.json" in names or any(p.endswith("/metadata.json") for p in tree.files()):
        return "dfdc"
    if "real" in names or "fake" in names:
        return "folders"
    raise DatasetError(
        f"cannot tell the layout of {path}: expected a manifest (csv/tsv/jsonl/parquet with "
        "uri,label), a folder with real/ and fake/, FaceForensics++ (original_sequences/, "
        "manipulated_sequences/), Celeb-DF (Celeb-real/, Celeb-synthesis/, YouTube-real/) "
        "or DFDC (metadata.json)"
    )


def _is_shared_manifest(path: str, storage: StorageConfig) -> bool:
    if not path.lower().endswith(".tsv"):
        return False
    fs, p = filesystem_for(path, storage)
    if not fs.exists(p):
        return False
    with fs.open(p, "rb") as f:
        header = f.readline().decode("utf-8", "replace").strip().split("\t")
    return {"relative_path", "label", "source_repo"} <= set(header)


_SHARED_SOURCES = {
    "mosahil147/deepfake-datasets": "ffpp",
    "easontan03/fake-face-detection": "ciplab",
    "sklinderton/vit-real-vs-fake-faces": "stylegan3",
    "ismaolen/fake-face-detection": "ismaolen",
    "mattans/ageprogression": "utkface",
    "clovaai/stargan-v2": "celebahq",
    "andrew-valentin/humanfaceimagegenerator": "celeba",
    "jphdotam/dfdc": "dfdc",
    "lucacorvitto/realfaces_w_stablediffusion": "sd_gan",
    "zhuoxuanzhangharry/agegan-faceevolution": "stylegan2ada",
}


def from_shared(path: str, storage: StorageConfig) -> tuple[list[dict], Counter]:
    """The shared training set's MANIFEST.tsv (or its folder)."""
    import csv
    import io

    if not path.lower().endswith(".tsv"):
        path = path.rstrip("/") + "/MANIFEST.tsv"
    fs, p = filesystem_for(path, storage)
    root = path.rsplit("/", 1)[0] if is_s3(path) else p.rsplit("/", 1)[0]  # absolute
    with fs.open(p, "rb") as f:
        reader = csv.DictReader(io.StringIO(f.read().decode("utf-8")), delimiter="\t")
        records = list(reader)
    rows, skipped = [], Counter()
    for rec in records:
        label = parse_label(rec.get("label"))
        rel = rec["relative_path"]
        if label is None:
            skipped[f"label {rec.get('label')!r}"] += 1
            continue
        repo = (rec.get("source_repo") or "").strip()
        family = (rec.get("family") or "").strip()
        source = _SHARED_SOURCES.get(repo.lower(), repo.split("/")[-1] or "unknown")
        uri = f"{root}/{rel}"
        stem = rel.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        media_type = rec.get("kind") if rec.get("kind") in ("image", "video") else None
        group, links, sequence, method = f"file:{rel}", [], None, None
        if repo.lower() not in _SHARED_SOURCES:
            # The later sources show one identity as real and as a swap target, and their
            # fakes are panels of the same figures: one repository is one group.
            group = f"repo:{repo.lower()}"
        if source == "ffpp":
            ids = _ffpp_ids_in(stem)
            if ids:
                group, links = f"ffpp:{ids[0]}", [f"ffpp:{i}" for i in ids[1:]]
            if "__frame_" in stem:  # 8 crops per FF++ sequence: frames of one video
                sequence = f"ffpp-seq:{stem.split('__frame_')[0]}:{label}"
            m = re.match(r"ffpp_c\d+_([A-Za-z0-9]+)__", stem)
            method = m.group(1) if m and m.group(1) != "original" else None
        elif source == "dfdc":  # dfdc_facecrop__<video id>_<track>_<n>__...: one group a video
            m = re.match(r"dfdc_facecrop__([a-z]+)_", stem)
            group = f"dfdc:{m.group(1)}" if m else group
        elif source == "utkface":  # crops of one photo share its timestamp
            group = f"utkface:{stem.rsplit('_', 1)[-1]}"
        rows.append(_row(uri, label, group, links=links, sequence=sequence, source=source,
                         method=method, media_id=rel, media_type=media_type,
                         family=family))
    return rows, skipped


def _ffpp_ids_in(stem: str) -> list[str]:
    for part in stem.split("__"):
        m = re.fullmatch(r"(\d{3})(?:_(\d{3}))?", part)
        if m:
            return [i for i in m.groups() if i]
    return []


def from_ffpp(root: str, storage: StorageConfig) -> tuple[list[dict], Counter]:
    """FaceForensics++: ``original_sequences/<youtube|actors>/<c0|c23|c40>/videos/033.mp4``
    and ``manipulated_sequences/<Method>/<c..>/videos/033_097.mp4``; extracted frames in
    per-video folders (``.../images/033_097/0001.png``) are a sequence of that video."""
    tree = _Tree(root, storage)
    rows, skipped = [], Counter()
    for rel in tree.media():
        parts = rel.split("/")
        top = parts[0].lower()
        if top not in ("original_sequences", "manipulated_sequences"):
            skipped["outside original_/manipulated_sequences"] += 1
            continue
        label = 1 if top == "manipulated_sequences" else 0
        method = parts[1] if label and len(parts) > 1 else None
        actors = "actors" in parts or method == "DeepFakeDetection"
        ids, seq_dir = _ffpp_path_ids(parts[:-1], parts[-1], actors)
        if not ids:
            skipped["no FF++ id in the path"] += 1
            continue
        ns = "ffpp-actor" if actors else "ffpp"
        sequence = f"ffpp-seq:{'/'.join(parts[:-1])}" if seq_dir else None
        rows.append(_row(tree.uri(rel), label, f"{ns}:{ids[0]}",
                         links=[f"{ns}:{i}" for i in ids[1:]], sequence=sequence,
                         source="ffpp", method=method))
    return rows, skipped


def _ffpp_path_ids(dirs: list[str], name: str, actors: bool) -> tuple[list[str], bool]:
    """FF++ ids from a file name, else from its folder (extracted frames)."""
    stem = name.rsplit(".", 1)[0]
    pattern = r"(\d{2})(?:_(\d{2}))?__.*" if actors else r"(\d{3})(?:_(\d{3}))?"
    m = re.fullmatch(pattern, stem)
    if m:
        return [i for i in m.groups() if i], False
    if dirs:
        m = re.fullmatch(pattern, dirs[-1])
        if m:
            return [i for i in m.groups() if i], True
    return [], False


def from_celebdf(root: str, storage: StorageConfig) -> tuple[list[dict], Counter]:
    """Celeb-DF (v1/v2): ``Celeb-real/id0_0000.mp4``, ``Celeb-synthesis/id0_id16_0000.mp4``
    (target id0's video with id16's face), ``YouTube-real/00000.mp4``."""
    tree = _Tree(root, storage)
    rows, skipped = [], Counter()
    for rel in tree.media():
        folder, stem = rel.split("/", 1)[0].lower(), rel.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        if folder == "celeb-real" and (m := re.fullmatch(r"(id\d+)_\d+", stem)):
            rows.append(_row(tree.uri(rel), 0, f"celebdf:{m.group(1)}", source="celebdf"))
        elif folder == "celeb-synthesis" and (m := re.fullmatch(r"(id\d+)_(id\d+)_\d+", stem)):
            rows.append(_row(tree.uri(rel), 1, f"celebdf:{m.group(1)}",
                             links=[f"celebdf:{m.group(2)}"], source="celebdf",
                             method="celebdf-synthesis"))
        elif folder == "youtube-real":
            rows.append(_row(tree.uri(rel), 0, f"celebdf-youtube:{stem}", source="celebdf"))
        else:
            skipped["unrecognised Celeb-DF path"] += 1
    return rows, skipped


def from_dfdc(root: str, storage: StorageConfig) -> tuple[list[dict], Counter]:
    """DFDC: every ``metadata.json`` under ``root`` (``{"x.mp4": {"label": "FAKE",
    "original": "y.mp4"}}``); a fake is grouped with its original video."""
    if root.lower().endswith("metadata.json"):
        root, metas = root.rsplit("/", 1)[0], ["metadata.json"]
    else:
        metas = None
    tree = _Tree(root, storage)
    if metas is None:
        metas = [p for p in tree.files() if p.rsplit("/", 1)[-1] == "metadata.json"]
    rows, skipped = [], Counter()
    for meta in metas:
        folder = meta.rsplit("/", 1)[0] if "/" in meta else ""
        data = json.loads(tree.read_text(meta))
        for name, info in sorted(data.items()):
            label = parse_label(info.get("label"))
            if label is None:
                skipped[f"label {info.get('label')!r}"] += 1
                continue
            rel = f"{folder}/{name}" if folder else name
            if not tree.exists(rel):
                skipped["listed in metadata.json but missing"] += 1
                continue
            original = info.get("original") if label else None
            group = f"dfdc:{(original or name).rsplit('.', 1)[0]}"
            rows.append(_row(tree.uri(rel), label, group, source="dfdc",
                             method="dfdc" if label else None))
    return rows, skipped


def from_folders(root: str, storage: StorageConfig) -> tuple[list[dict], Counter]:
    """``root/real/**`` and ``root/fake/**`` (any depth); one group per file."""
    tree = _Tree(root, storage)
    rows, skipped = [], Counter()
    name = root.rstrip("/").rsplit("/", 1)[-1] or "folders"
    for rel in tree.media():
        top = rel.split("/", 1)[0].lower()
        if top not in ("real", "fake"):
            skipped["outside real/ and fake/"] += 1
            continue
        rows.append(_row(tree.uri(rel), int(top == "fake"), f"file:{tree.uri(rel)}",
                         source=name))
    return rows, skipped


def from_manifest(path: str, storage: StorageConfig) -> tuple[list[dict], Counter]:
    """A labelled manifest: ``uri``, ``label``; optional ``group``/``identity``, ``source``,
    ``sequence``, ``media_id``, ``method``, ``family``."""
    table = read_manifest(path, reserved=set(), storage=storage)
    cols = set(table.column_names)
    if "label" not in cols:
        raise DatasetError(f"training manifest {path} has no 'label' column (fake/real or 1/0)")
    group_col = next((c for c in GROUP_COLUMNS if c in cols), None)
    base = path.rsplit("/", 1)[0] if "/" in path else "."
    name = path.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    rows, skipped = [], Counter()
    for rec in table.to_pylist():
        label = parse_label(rec.get("label"))
        if label is None:
            skipped[f"label {rec.get('label')!r}"] += 1
            continue
        uri = rec["uri"]
        if uri and not is_s3(uri) and not uri.startswith("/") and not uri.startswith("file://"):
            uri = f"{filesystem_for(base, storage)[1]}/{uri}"
        group = rec.get(group_col) if group_col else None
        group = f"group:{group}" if group not in (None, "") else f"file:{uri}"
        seq = rec.get("sequence")
        rows.append(_row(uri, label, group, sequence=f"seq:{seq}" if seq else None,
                         source=str(rec.get("source") or name), method=rec.get("method"),
                         media_id=rec.get("media_id") or uri,
                         family=str(rec.get("family") or "").strip()))
    return rows, skipped


_READERS = {"manifest": from_manifest, "shared": from_shared, "ffpp": from_ffpp,
            "celebdf": from_celebdf, "dfdc": from_dfdc, "folders": from_folders}


def excluded(row: dict, rules: Sequence[str]) -> bool:
    """Whether ``row`` matches one of ``rules``: ``SOURCE`` (every item of that source) or
    ``SOURCE:LABEL`` (its fakes or its reals only), e.g. ``stylegan3``, ``ismaolen:fake``."""
    label = "fake" if row["label"] == 1 else "real"
    return row["source"] in rules or f"{row['source']}:{label}" in rules


def check_rules(option: str, rules: Sequence[str], sources: set[str]) -> None:
    """Refuse rules of :func:`excluded` that name no source or a label other than
    fake/real: a typo would otherwise train on what the user meant to leave out."""
    unknown = sorted(e for e in rules if e.split(":", 1)[0] not in sources
                     or (":" in e and e.split(":", 1)[1] not in ("fake", "real")))
    if unknown:
        raise DatasetError(f"{option} {', '.join(unknown)} matches nothing: use SOURCE or "
                           f"SOURCE:fake|real; the sources are {', '.join(sorted(sources))}")


def drop_from_training(table: pa.Table, rules: Sequence[str]) -> tuple[pa.Table, dict]:
    """Remove the training-split rows that match ``rules`` (:func:`excluded`); validation
    keeps them. With every fake left out and ``--sbi``, training sees self-blended fakes
    alone, the SBI paper's protocol. Returns the table and the rows dropped per rule."""
    if not rules:
        return table, {}
    check_rules("--exclude-from-training", rules, set(table["source"].to_pylist()))
    rows = table.select(["source", "label", "split"]).to_pylist()
    drop = [r["split"] == "train" and excluded(r, rules) for r in rows]
    counts = {rule: sum(r["split"] == "train" and excluded(r, [rule]) for r in rows)
              for rule in rules}
    keep = pa.array([not d for d in drop])
    return table.filter(keep), counts


def load_inputs(inputs: Sequence[str], storage: StorageConfig | None = None,
                limit: int | None = None, exclude: Sequence[str] = ()) -> LabelledSet:
    """Read every input into one labelled table. ``exclude``: rules of :func:`excluded`;
    the items they drop are counted in ``skipped``. ``limit`` keeps a deterministic,
    label-balanced subset (for smoke runs)."""
    storage = storage or StorageConfig()
    if not inputs:
        raise DatasetError("give at least one training input (manifest or dataset folder)")
    rows, skipped, layouts = [], Counter(), {}
    for path in inputs:
        layout = detect_layout(path, storage)
        try:
            got, skip = _READERS[layout](path, storage)
        except ManifestError as exc:
            raise DatasetError(str(exc)) from None
        layouts[path] = layout
        rows.extend(got)
        skipped.update({f"{path}: {k}": v for k, v in skip.items()})
        log.info("%s: %s layout, %d labelled items", path, layout, len(got))
    if exclude:
        check_rules("--exclude", exclude, {r["source"] for r in rows})
        kept = [r for r in rows if not excluded(r, exclude)]
        for rule in exclude:
            skipped[f"excluded: {rule}"] = sum(excluded(r, [rule]) for r in rows)
        rows = kept
    if not rows:
        raise DatasetError(f"no labelled media found in {', '.join(inputs)}")
    dupes = [k for k, n in Counter(r["media_id"] for r in rows).items() if n > 1]
    if dupes:
        raise DatasetError(f"{len(dupes)} media ids appear twice across the inputs, e.g. "
                           f"{dupes[0]!r}: list each item once")
    if limit is not None and limit < len(rows):
        rows = _balanced_subset(rows, limit)
    table = pa.Table.from_pylist(rows, schema=LABELLED_SCHEMA)
    return LabelledSet(table=table, layouts=layouts, skipped=skipped)


def _balanced_subset(rows: list[dict], limit: int) -> list[dict]:
    """Whole groups in a stable hashed order, alternating fake and real, up to ``limit``."""
    by_label: dict[int, list[dict]] = {0: [], 1: []}
    for r in sorted(rows, key=lambda r: (_hash(r["group"]), r["media_id"])):
        by_label[r["label"]].append(r)
    out = []
    for a, b in zip(by_label[1], by_label[0]):
        out += [a, b]
    out += by_label[1][len(by_label[0]):] + by_label[0][len(by_label[1]):]
    return out[:limit]


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- splits


def group_components(table: pa.Table, max_fraction: float = 0.5) -> tuple[list[str], bool]:
    """Connected components over ``group`` and ``links``: a component id per row.

    When linking would merge more than ``max_fraction`` of the items into one component
    (e.g. Celeb-DF, where swaps chain most identities together), the links are ignored
    and every ``group`` stands alone; the second value says so.
    """
    groups = table["group"].to_pylist()
    links = table["links"].to_pylist()
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for g, ls in zip(groups, links):
        find(g)
        for other in ls or ():
            a, b = find(g), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)  # the smallest name roots the component
    comps = [find(g) for g in groups]
    sizes = Counter(comps)
    if len(set(groups)) > 1 and sizes.most_common(1)[0][1] > max_fraction * len(groups) \
            and len(sizes) < len(set(groups)):
        log.warning("linking groups merges %d of %d items into one component; splitting by "
                    "group alone", sizes.most_common(1)[0][1], len(groups))
        return list(groups), True
    return comps, False


@dataclass(frozen=True)
class SplitConfig:
    """``val_fraction`` of each (source, label) stratum goes to validation, by whole
    components; or, with ``folds``, components are dealt into K balanced folds and fold
    ``fold`` is the validation set."""

    val_fraction: float = 0.2
    folds: int | None = None
    fold: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.folds is None:
            if not 0.0 < self.val_fraction < 1.0:
                raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        else:
            if self.folds < 2:
                raise ValueError(f"folds must be >= 2, got {self.folds}")
            if not 0 <= self.fold < self.folds:
                raise ValueError(f"fold must be in [0, {self.folds}), got {self.fold}")


def split_table(table: pa.Table, config: SplitConfig) -> tuple[pa.Table, dict]:
    """Add ``component`` and ``split`` (train/val) columns; return the table and the
    split record (settings, group → split, counts) that goes into the model card.
    Components are stratified by source, label make-up and whether they hold a video; a
    source with too few components to send any to validation (one repository of the later
    sources, say) is stratified with the rest of its family instead."""
    comps, links_ignored = group_components(table)
    labels = table["label"].to_pylist()
    sources = table["source"].to_pylist()
    families = (table["family"].to_pylist() if "family" in table.column_names
                else [None] * table.num_rows)
    members: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(comps):
        members[c].append(i)
    media = table["media_type"].to_pylist()
    main = {c: Counter(sources[i] for i in idx).most_common(1)[0][0] for c, idx in members.items()}
    n_comps = Counter(main.values())
    few = config.folds or 1.0 / config.val_fraction  # components a stratum needs
    strata: dict[tuple[str, str, bool], list[str]] = defaultdict(list)
    for c, idx in members.items():
        src = main[c]
        fam = Counter(families[i] for i in idx).most_common(1)[0][0]
        if n_comps[src] < few and fam:
            src = f"family:{fam}"
        labs = {labels[i] for i in idx}
        kind = "mixed" if len(labs) > 1 else ("fake" if 1 in labs else "real")
        # Components with a video form their own strata, so validation gets videos too.
        strata[(src, kind, any(media[i] == "video" for i in idx))].append(c)
    rng = np.random.default_rng(config.seed)
    val: set[str] = set()
    # Family strata last: the sources' strata draw exactly as before they existed, so a
    # split of the older sources (and a CNN branch trained on it) is unchanged.
    for key in sorted(strata, key=lambda k: (k[0].startswith("family:"), k)):
        comps_here = sorted(strata[key])
        order = [comps_here[i] for i in rng.permutation(len(comps_here))]
        if config.folds is None:
            val |= _holdout(order, members, config.val_fraction)
        else:
            val |= _fold(order, members, config.folds, config.fold)
    split = ["val" if c in val else "train" for c in comps]
    out = table.append_column("component", pa.array(comps, pa.string()))
    out = out.append_column("split", pa.array(split, pa.string()))
    return out, split_record(out, config, links_ignored)


def _holdout(order: list[str], members: dict[str, list[int]], fraction: float) -> set[str]:
    """Components (in the shuffled ``order``) whose items come closest to ``fraction`` of
    the stratum: each is taken if that brings the count nearer the target."""
    total = sum(len(members[c]) for c in order)
    target, taken, chosen = fraction * total, 0, set()
    if len(order) < 2:
        return chosen  # a lone component stays in train
    for c in order:
        size = len(members[c])
        if abs(taken + size - target) < abs(taken - target):
            chosen.add(c)
            taken += size
    return chosen


def _fold(order: list[str], members: dict[str, list[int]], folds: int, fold: int) -> set[str]:
    load = [0] * folds
    chosen = set()
    # Biggest first keeps the folds even; the sort is stable, so the shuffle breaks ties.
    for c in sorted(order, key=lambda c: -len(members[c])):
        k = int(np.argmin(load))
        load[k] += len(members[c])
        if k == fold:
            chosen.add(c)
    return chosen


def split_record(table: pa.Table, config: SplitConfig, links_ignored: bool) -> dict:
    """What the card and ``split.json`` record about a split."""
    comp_split = dict(zip(table["component"].to_pylist(), table["split"].to_pylist()))
    group_split = {g: comp_split[c] for g, c in
                   zip(table["group"].to_pylist(), table["component"].to_pylist())}
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for s, src, lab in zip(table["split"].to_pylist(), table["source"].to_pylist(),
                           table["label"].to_pylist()):
        counts.setdefault(s, {}).setdefault(src, {"real": 0, "fake": 0})
        counts[s][src]["fake" if lab else "real"] += 1
    return {
        "method": "k-fold" if config.folds else "holdout",
        "unit": "connected components of identity/source-video groups (never frames)",
        "links_ignored": links_ignored,
        "val_fraction": None if config.folds else config.val_fraction,
        "folds": config.folds,
        "fold": config.fold if config.folds else None,
        "seed": config.seed,
        "n_groups": len(group_split),
        "n_components": len(comp_split),
        "counts": counts,
        "groups": dict(sorted(group_split.items())),
    }
