"""Property tests (hypothesis) of the manifest reader and the audit's pre-flight (issue 16,
"Fuzzing and hostile input").

Random column sets and types, unicode and control characters, NULs, 10 kB strings, empty
and repeated ids, and CSV quoting edge cases, written by the test as CSV, TSV, JSONL and
Parquet. Every case either reads with rows out == rows in (one row per manifest row, in
order, with the uris and media ids a model of the documented rules predicts) or raises
ManifestError with a one-line printable message: never another exception type. The
audit's pre-flight (``read_input``, what ``deepaudit audit`` runs before any work) does
the same, and a manifest it rejects makes ``deepaudit audit`` exit 2 with one error line.
No audit runs here: accepted manifests are only checked, never audited.

Bounded by example counts and a deadline: the file takes about 10 s on 2 busy cores. The
example database is off (no replay files); ``--hypothesis-show-statistics`` shows how
often each format was read or rejected, and whether that was predicted.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from typer.testing import CliRunner

from deepaudit.infra.listing import ListingConfig
from deepaudit.infra.storage import StorageConfig
from deepaudit.jobs.cli import app
from deepaudit.pipeline.manifest import ManifestError, read_input, read_manifest
from deepaudit.pipeline.schema import RESERVED_COLUMNS

runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"})

FUZZ = settings(max_examples=60, deadline=2000, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Cells pyarrow's CSV reader reads as null in the text columns (uri, media_id, label).
CSV_NULLS = frozenset(pacsv.ConvertOptions().null_values)
SPECIAL = ["", " ", ",", ";", '"', '""', '"a"b', "'", "\t", "\n", "\r", "\r\n", "a\nb",
           "\x00", "a\x00b", "\x1b[31m", "\\", "\\N", "NA", "null", "NaN", "#N/A", "=1+1",
           "é", "😀", "\u2028", "\ufeff", "\u200b", "s3://bucket/k.mp4", "/archive/a b/c,d.mp4",
           " lead", "trail ", "007", "1e3", "true", "[x]", ":smile:"]
# Collisions on purpose: empty and repeated ids.
ID_POOL = ["", "dup", "/a/x.mp4", "NA"]
EXTRA_NAMES = ["media_id", "media_id", "label", "relative_path", "status", "p_fake",
               "manifest_row", "manifest_status", "camera", "", "uri ", "URI"]

_chars = st.characters(blacklist_categories=("Cs",))  # lone surrogates are not UTF-8
short_text = st.text(_chars, max_size=12)
long_text = st.builds(lambda s, n: (s * n)[:n], st.text(_chars, min_size=1, max_size=4),
                      st.integers(10_000, 10_240))  # 10 kB (and more, in UTF-8)
TEXT = st.one_of(st.sampled_from(SPECIAL), short_text, short_text, long_text)
ID_TEXT = st.one_of(TEXT, st.sampled_from(ID_POOL))

KINDS = {
    "csv": ["text"],
    "tsv": ["text"],
    "jsonl": ["text"] * 4 + ["int", "float", "bool", "null", "list", "struct"],
    "parquet": ["text"] * 4 + ["int", "float", "bool", "null", "list", "struct", "binary",
                               "timestamp"],
}
VALUES = {
    "int": st.integers(-(2**53), 2**53),
    "float": st.floats(allow_nan=False, allow_infinity=False),
    "bool": st.booleans(),
    "null": st.none(),
    "list": st.lists(st.integers(-1000, 1000), max_size=3),
    "struct": st.fixed_dictionaries({"k": st.integers(-5, 5)}),
    "binary": st.binary(max_size=8),
    "timestamp": st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1)),
}
ARROW = {"text": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(),
         "null": pa.null(), "list": pa.list_(pa.int64()),
         "struct": pa.struct([("k", pa.int64())]), "binary": pa.binary(),
         "timestamp": pa.timestamp("us")}
SUFFIX = {"csv": [".csv", ".CSV"], "tsv": [".tsv"], "jsonl": [".jsonl", ".ndjson"],
          "parquet": [".parquet", ".pq"]}


@dataclass
class Manifest:
    fmt: str
    names: list[str]  # as written (repeats allowed)
    kinds: list[str]
    rows: list[list]  # one list of values per row, None = missing
    suffix: str
    quote_all: bool = False
    newline: str = "\n"
    bom: bool = False
    omit_nulls: bool = False  # JSONL: a None value leaves its key out
    ascii_json: bool = True


IDS = ("uri", "media_id", "relative_path")


def _one_in(k: int):
    """True one time in k (sampled_from, not integers: hypothesis favours 0 there)."""
    return st.sampled_from([False] * (k - 1) + [True])


def _value(kind: str, name: str):
    base = (ID_TEXT if name in IDS else TEXT) if kind == "text" else VALUES[kind]
    # About one value in eight is missing.
    return st.tuples(_one_in(8), base).map(lambda t: None if t[0] else t[1])


@st.composite
def manifests(draw, fmts=("csv", "tsv", "jsonl", "parquet")):
    """Mostly manifests a reader should accept, with the ways to break one mixed in: no
    uri column (1 in 8), a repeated column name (1 in 8), colliding, empty or missing ids
    (1 in 4), no rows (1 in 10), and column types that cannot be text."""
    fmt = draw(st.sampled_from(fmts))
    names = draw(st.lists(st.one_of(st.sampled_from(EXTRA_NAMES), short_text), max_size=4,
                          unique=True))
    if not draw(_one_in(8)) and "uri" not in names:
        names.insert(draw(st.integers(0, len(names))), "uri")
    if not names:
        names = [draw(st.sampled_from(EXTRA_NAMES))]
    if draw(_one_in(8)):
        names.append(draw(st.sampled_from(names)))
    kinds = [draw(st.sampled_from(["text"] * 20 + KINDS[fmt])) if name in IDS
             else draw(st.sampled_from(KINDS[fmt])) for name in names]
    n = 0 if draw(_one_in(10)) else draw(st.integers(1, 6))
    collide = draw(_one_in(4))
    columns = []
    for name, kind in zip(names, kinds):
        if name in IDS and kind == "text" and not collide:
            columns.append(draw(st.lists(TEXT, min_size=n, max_size=n, unique=True)))
        else:
            columns.append([draw(_value(kind, name)) for _ in range(n)])
    rows = [list(r) for r in zip(*columns)]
    return Manifest(
        fmt, names, kinds, rows, draw(st.sampled_from(SUFFIX[fmt])),
        quote_all=draw(st.booleans()),
        newline=draw(st.sampled_from(["\n", "\r\n"])), bom=draw(st.booleans()),
        omit_nulls=draw(st.booleans()), ascii_json=draw(st.booleans()))


def _csv_line(fields: list[str], delimiter: str, quote_all: bool, newline: str) -> str:
    """One CSV/TSV record, quoted by RFC 4180's rules: a field with the delimiter, a quote,
    a CR or an LF is quoted (Python's csv module leaves a bare CR unquoted when the line
    ends in LF, which every reader takes for a line break), quotes are doubled, and a
    record that is one empty field is written as "" so it is not a blank line."""
    def quote(f: str) -> str:
        needs = quote_all or any(c in f for c in (delimiter, '"', "\r", "\n")) \
            or (f == "" and len(fields) == 1)
        return '"' + f.replace('"', '""') + '"' if needs else f
    return delimiter.join(quote(f) for f in fields) + newline


def _write(m: Manifest, folder: Path) -> tuple[Path, list[str]]:
    """Write the manifest; returns its path and the column names a reader sees."""
    path = folder / f"manifest{m.suffix}"
    names = list(m.names)
    if m.fmt in ("csv", "tsv"):
        delimiter = "," if m.fmt == "csv" else "\t"
        text = "".join(_csv_line(fields, delimiter, m.quote_all, m.newline) for fields in
                       [m.names] + [["" if v is None else v for v in row] for row in m.rows])
        if text.startswith("\ufeff") and not m.bom:
            names[0] = names[0][1:]  # the reader takes a leading BOM for a byte-order mark
        path.write_text(("\ufeff" if m.bom else "") + text, encoding="utf-8", newline="")
    elif m.fmt == "jsonl":
        lines, seen = [], []
        for row in m.rows:  # written by hand, so a repeated name is a repeated key
            pairs = [(k, v) for k, v in zip(m.names, row) if not (v is None and m.omit_nulls)]
            seen += [k for k, _ in pairs if k not in seen]
            lines.append("{" + ", ".join(f"{json.dumps(k, ensure_ascii=m.ascii_json)}: "
                                         f"{json.dumps(v, ensure_ascii=m.ascii_json)}"
                                         for k, v in pairs) + "}")
        names = seen
        path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    else:
        cols = [pa.array([row[i] for row in m.rows], ARROW[k]) for i, k in enumerate(m.kinds)]
        pq.write_table(pa.Table.from_arrays(cols, names=m.names), path)
    return path, names


def _renamed(name: str) -> str:
    return f"manifest_{name}" if name in RESERVED_COLUMNS and name not in ("uri", "media_id") \
        else name


def _text_of(m: Manifest, kind: str, v):
    """What the reader makes of one value of a text column: a string, None for missing,
    or ... when this model does not predict it (floats, bools, timestamps)."""
    if v is None or kind == "null":
        return None
    if kind == "text":
        return None if m.fmt in ("csv", "tsv") and v in CSV_NULLS else v
    if kind == "int":
        return str(v)
    if kind == "binary":
        return v.decode("utf-8")  # UnicodeDecodeError: the reader must reject it
    return ...


OK, REJECT, EITHER = "ok", "reject", "either"


def _expect(m: Manifest, names: list[str]):
    """(verdict, uris, media_ids) predicted from the documented rules; uris/ids are None
    when not predicted."""
    if not m.rows:
        return REJECT, None, None  # empty file, or no rows
    if m.fmt == "jsonl" and len(set(m.names)) < len(m.names):
        # Every row writes the repeated key twice (a JSON parse error), unless rows leave
        # out their missing values: then some may write it once, which is not predicted.
        return (EITHER if m.omit_nulls else REJECT), None, None
    renamed = [_renamed(n) for n in names]
    if len(set(renamed)) < len(renamed):
        return REJECT, None, None  # repeated names, or a rename onto an existing name
    written = m.names if m.fmt == "jsonl" else names  # JSONL: names are unique here
    kind = dict(zip(written, m.kinds))
    col = {n: [row[i] for row in m.rows] for i, n in enumerate(written)}
    for c in ("uri", "media_id", "label", "relative_path"):
        nested = c in names and kind[c] in ("list", "struct")
        if m.fmt == "jsonl" and nested:  # a JSON column of nulls only is not nested
            nested = any(v is not None for v in col[c])
        if nested and (c != "relative_path" or "uri" not in names):
            return REJECT, None, None
    if "uri" not in names:
        return (EITHER if "relative_path" in names else REJECT), None, None
    try:
        uris = [_text_of(m, kind["uri"], v) for v in col["uri"]]
        mids = [_text_of(m, kind["media_id"], v) for v in col["media_id"]] \
            if "media_id" in names else [None] * len(m.rows)
        for v in col["label"] if "label" in names else []:
            _text_of(m, kind["label"], v)
    except UnicodeDecodeError:
        return REJECT, None, None
    if ... in uris or ... in mids:
        return EITHER, None, None  # castable, but values (and so repeats) not modelled
    uris = ["" if u is None else u for u in uris]
    ids = [u if i in (None, "") else i for u, i in zip(uris, mids)]
    if len(set(ids)) < len(ids):
        return REJECT, None, None
    return OK, uris, ids


def _one_line(message: str) -> None:
    assert message and message.isprintable(), repr(message)


def _check_reader(m: Manifest, folder: Path) -> None:
    path, names = _write(m, folder)
    verdict, uris, ids = _expect(m, names)
    try:
        out = read_manifest(str(path), RESERVED_COLUMNS)
    except ManifestError as exc:
        event(f"{m.fmt}: predicted {verdict}, rejected")  # --hypothesis-show-statistics
        _one_line(str(exc))
        if "cannot parse" in str(exc):  # the test writes well-formed files
            assert m.fmt == "jsonl" and len(set(m.names)) < len(m.names), str(exc)
        assert verdict != OK, f"a valid manifest was rejected: {exc}"
        return
    event(f"{m.fmt}: predicted {verdict}, read")
    assert verdict != REJECT, f"accepted a manifest that should be rejected: {m}"
    n = len(m.rows)
    assert out.num_rows == n
    assert out["manifest_row"].to_pylist() == list(range(n))
    assert out.schema.field("uri").type == pa.string()
    assert out.schema.field("media_id").type == pa.string()
    got_ids = out["media_id"].to_pylist()
    assert None not in got_ids and None not in out["uri"].to_pylist()
    assert len(set(got_ids)) == n
    if uris is not None:
        assert out["uri"].to_pylist() == uris
        assert got_ids == ids
    if "uri" in names:  # every manifest column is carried, renamed where it clashes
        expected = [_renamed(x) for x in names] + \
            ([] if "media_id" in names else ["media_id"]) + ["manifest_row"]
        assert sorted(out.column_names) == sorted(expected)


@FUZZ
@given(m=manifests())
def test_reader_rows_out_equal_rows_in_or_a_clear_error(tmp_path_factory, m):
    _check_reader(m, tmp_path_factory.mktemp("m"))


@FUZZ
@given(m=manifests(fmts=("csv", "tsv")))
def test_reader_on_csv_and_tsv(tmp_path_factory, m):
    # CSV and TSV get their own budget: quoting, BOMs, CR/LF, NULs and null-like cells.
    _check_reader(m, tmp_path_factory.mktemp("m"))


# Raw CSV text that no CSV writer would produce: unbalanced and doubled quotes, bare CRs,
# ragged rows. Rows in are not defined for such text, so the property is the shape.
CSV_TOKENS = st.sampled_from([",", '"', '""', "\n", "\r", "\r\n", "\t", "\x00", "a", "b",
                              "é", " ", "\\", "uri", "media_id", "NA"])


@FUZZ
@given(body=st.lists(CSV_TOKENS, max_size=40).map("".join),
       header=st.sampled_from(["uri\n", "uri,media_id\n", '"uri","x"\n', "uri\tlabel\n", ""]),
       suffix=st.sampled_from([".csv", ".tsv"]))
def test_reader_on_raw_csv_text(tmp_path_factory, body, header, suffix):
    path = tmp_path_factory.mktemp("raw") / f"m{suffix}"
    path.write_text(header + body, encoding="utf-8", newline="")
    try:
        out = read_manifest(str(path), RESERVED_COLUMNS)
    except ManifestError as exc:
        event("raw: rejected")
        _one_line(str(exc))
        return
    event("raw: read")
    n = out.num_rows
    assert n > 0 and out["manifest_row"].to_pylist() == list(range(n))
    ids = out["media_id"].to_pylist()
    assert None not in ids and len(set(ids)) == n


@settings(FUZZ, max_examples=30)
@given(m=manifests())
def test_audit_preflight_accepts_or_stops_with_one_line(tmp_path_factory, m):
    """What ``deepaudit audit`` reads before any work: accepted manifests have rows out ==
    rows in (their uris point nowhere, and nothing is audited here); rejected ones stop
    the command with exit 2 and one error line."""
    folder = tmp_path_factory.mktemp("pre")
    path, _ = _write(m, folder)
    try:
        table = read_input(str(path), StorageConfig(), ListingConfig())
    except ManifestError as exc:
        event("rejected: deepaudit audit run")
        _one_line(str(exc))
        result = runner.invoke(app, ["audit", str(path), "-o", str(folder / "out"),
                                     "--no-progress"])
        assert result.exit_code == 2, result.output
        lines = result.output.rstrip("\n").split("\n")
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert not (folder / "out").exists()  # stopped before any work
        return
    event("accepted: not audited")
    assert table.num_rows == len(m.rows)
    assert table["manifest_row"].to_pylist() == list(range(len(m.rows)))
    assert len(set(table["media_id"].to_pylist())) == len(m.rows)


def test_quoted_newlines_in_a_csv_over_one_block(tmp_path):
    # Found while writing this suite (its cases are too small to cross a block): pyarrow
    # reads CSV in 1 MB blocks and, unless told values may hold newlines, splits a row at
    # a quoted newline on a block boundary ("Expected 2 columns, got 1").
    path = tmp_path / "m.csv"
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["uri", "note"])
    w.writerows([f"/a/{i}.mp4", "one\ntwo, three\n" + "x" * 500] for i in range(3000))
    path.write_text(buf.getvalue())
    assert path.stat().st_size > 1 << 20
    out = read_manifest(str(path), RESERVED_COLUMNS)
    assert out["uri"].to_pylist() == [f"/a/{i}.mp4" for i in range(3000)]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("m.csv", "uri,media_id\na,\nb,\n", None),  # blank ids default to the uri
    ("m.jsonl", '{"uri": "a", "media_id": null}\n{"uri": "b"}\n', None),
    ("m.csv", "uri,uri\na,b\n", "more than one column named 'uri'"),
    ("m.csv", "uri,status,manifest_status\na,1,2\n", "'manifest_status'"),
    ("m.jsonl", '{"uri": ["a"]}\n', "column 'uri' must hold text"),
    ("m.jsonl", '{"uri": "a", "media_id": {"k": 1}}\n', "column 'media_id' must hold text"),
    ("m.jsonl", '{"relative_path": [1]}\n', "column 'relative_path' must hold text"),
    ("m.csv", "u\x00ri\na\n", r"u\x00ri"),  # names are shown escaped, on one line
])
def test_cases_the_fuzzer_found(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    if message is None:
        out = read_manifest(str(path), RESERVED_COLUMNS)
        assert out["media_id"].to_pylist() == out["uri"].to_pylist() == ["a", "b"]
        return
    with pytest.raises(ManifestError) as err:
        read_manifest(str(path), RESERVED_COLUMNS)
    assert message in str(err.value)
    _one_line(str(err.value))


def test_parquet_with_repeated_column_names(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])],
                                        names=["uri", "uri"]), path)
    with pytest.raises(ManifestError, match="more than one column named 'uri'"):
        read_manifest(str(path), RESERVED_COLUMNS)
