"""Read and validate a manifest before any work starts.

A manifest is CSV, TSV, JSONL or Parquet, local or on s3://, with at least a ``uri``
column, or instead a ``relative_path`` column (as in the shared set's ``MANIFEST.tsv``):
paths relative to the manifest's own folder, which become ``uri`` (and ``media_id``,
unless the manifest has one). ``media_id`` and ``label`` are optional; every other column
is carried through to the verdict table unchanged (a column whose name clashes with a
verdict column is renamed ``manifest_<name>``). Every command reads manifests here.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from deepaudit.infra.mediatypes import MEDIA_TYPES, media_type_by_name
from deepaudit.infra.storage import StorageConfig, check_readable, filesystem_for, is_s3

# Columns the pipeline adds itself; manifest columns with these names are renamed.
ROW_INDEX = "manifest_row"
FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


class ManifestError(ValueError):
    """The manifest cannot be audited; the message says what to fix.

    The message is one printable line: control characters that come from a manifest's
    column names or values (or a parser's multi-line message) are escaped (``\\n``,
    ``\\x00``), never printed raw."""

    def __init__(self, message: str) -> None:
        super().__init__("".join(c if c.isprintable() else c.encode("unicode_escape").decode()
                                 for c in str(message)))


def manifest_format(uri: str) -> str:
    lower = uri.lower()
    for suffix, fmt in FORMATS.items():
        if lower.endswith(suffix):
            return fmt
    raise ManifestError(
        f"cannot tell the manifest format of {uri!r}: name it *.csv, *.tsv, *.jsonl or *.parquet"
    )


def _read_raw(uri: str, storage: StorageConfig) -> pa.Table:
    fmt = manifest_format(uri)
    fs, path = filesystem_for(uri, storage)
    if not fs.exists(path):
        raise ManifestError(f"manifest not found: {uri}")
    with fs.open(path, "rb") as f:
        data = f.read()
    if not data.strip():
        raise ManifestError(f"manifest {uri} is empty: list at least one media uri")
    try:
        if fmt in ("csv", "tsv"):
            return pacsv.read_csv(
                io.BytesIO(data),
                # One thread: a command that fails on the manifest then exits with no Arrow
                # thread pool alive (a pool torn down under load at exit aborted with
                # "terminate called without an active exception"). Manifests parse fast.
                read_options=pacsv.ReadOptions(use_threads=False),
                # A quoted value may hold newlines; without newlines_in_values, a file over
                # one block (1 MB) splits rows at such a newline and fails to parse.
                parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",",
                                                 newlines_in_values=True),
                # Ids and labels like "007" or "1" must stay strings.
                convert_options=pacsv.ConvertOptions(
                    column_types={"uri": pa.string(), "media_id": pa.string(),
                                  "label": pa.string()},
                    strings_can_be_null=True,
                ),
            )
        if fmt == "jsonl":
            return pajson.read_json(io.BytesIO(data),
                                    read_options=pajson.ReadOptions(use_threads=False))
        # ParquetFile reads repeated column names (read_table does not), so they get the
        # clear error of validate_manifest.
        return pq.ParquetFile(io.BytesIO(data)).read(use_threads=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        raise ManifestError(f"cannot parse manifest {uri} as {fmt}: {exc}") from exc


def _check_column_names(table: pa.Table, source: str) -> None:
    repeated = sorted(n for n, k in Counter(table.column_names).items() if k > 1)
    if repeated:
        raise ManifestError(
            f"{source} has more than one column named {', '.join(map(repr, repeated))} "
            "(a column named like a verdict column is renamed manifest_<name>): give each "
            "column a distinct name."
        )


def _strings(table: pa.Table, name: str, source: str) -> pa.ChunkedArray:
    """A column as text; a column that cannot be text (lists, structs, bytes that are not
    UTF-8) is a ManifestError, not a pyarrow error."""
    try:
        return pc.cast(table[name], pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise ManifestError(
            f"{source}: column {name!r} must hold text, not {table.schema.field(name).type} "
            f"({exc})"
        ) from None


def validate_manifest(table: pa.Table, reserved: set[str], source: str = "manifest") -> pa.Table:
    """Check a raw manifest table and normalise it.

    Returns a table with string ``uri`` and ``media_id`` columns (``media_id`` defaults to
    the uri), a ``manifest_row`` index, and extra columns renamed where they clash.
    """
    if "uri" not in table.column_names:
        raise ManifestError(
            f"{source} has no 'uri' column (columns: {', '.join(table.column_names) or 'none'}). "
            "Add a column named 'uri' holding a local path or s3://bucket/key per row (or "
            "'relative_path', relative to the manifest's folder)."
        )
    if table.num_rows == 0:
        raise ManifestError(f"{source} has no rows: list at least one media uri")

    renames = {}
    for name in table.column_names:
        if name in reserved and name not in ("uri", "media_id"):
            renames[name] = f"manifest_{name}"
    if renames:
        table = table.rename_columns([renames.get(n, n) for n in table.column_names])
    _check_column_names(table, source)

    uri = _strings(table, "uri", source)
    uri = pc.if_else(pc.is_null(uri), "", uri)
    table = table.set_column(table.column_names.index("uri"), "uri", uri)
    if "media_id" in table.column_names:
        mid = _strings(table, "media_id", source)
        # Kleene or: a null id is "missing" (plain or_ would give null, and a null id).
        mid = pc.if_else(pc.or_kleene(pc.is_null(mid), pc.equal(mid, "")), uri, mid)
        table = table.set_column(table.column_names.index("media_id"), "media_id", mid)
    else:
        table = table.append_column("media_id", uri)
    if "label" in table.column_names:
        table = table.set_column(
            table.column_names.index("label"), "label", _strings(table, "label", source)
        )

    ids = table["media_id"].to_pylist()
    dupes = [(k, n) for k, n in Counter(ids).items() if n > 1]
    if dupes:
        shown = ", ".join(f"{k!r} x{n}" for k, n in dupes[:5])
        more = f" and {len(dupes) - 5} more" if len(dupes) > 5 else ""
        raise ManifestError(
            f"{source} has {len(dupes)} duplicate media ids: {shown}{more}. "
            "Each row needs a unique media_id (it defaults to the uri): remove the repeated "
            "rows or give them distinct media_id values."
        )
    if ROW_INDEX in table.column_names:
        table = table.drop_columns([ROW_INDEX])
    return table.append_column(ROW_INDEX, pa.array(range(table.num_rows), pa.int64()))


RELATIVE_PATH = "relative_path"


def resolve_relative_paths(table: pa.Table, manifest_uri: str) -> pa.Table:
    """A manifest without ``uri`` but with ``relative_path``: ``uri`` = the manifest's
    folder + the relative path (``media_id`` defaults to the relative path)."""
    names = table.column_names
    if "uri" in names or RELATIVE_PATH not in names:
        return table
    _check_column_names(table, manifest_uri)
    rel = _strings(table, RELATIVE_PATH, manifest_uri)
    if is_s3(manifest_uri):
        base = manifest_uri.rsplit("/", 1)[0]
    else:
        base = str(Path(filesystem_for(manifest_uri)[1]).parent)
    stripped = pc.utf8_ltrim(pc.fill_null(rel, ""), "/")
    uri = pc.if_else(pc.equal(stripped, ""), "", pc.binary_join_element_wise(base, stripped, "/"))
    table = table.append_column("uri", uri)
    if "media_id" not in names:
        table = table.append_column("media_id", rel)
    return table


def read_manifest(uri: str, reserved: set[str], storage: StorageConfig | None = None) -> pa.Table:
    """Read, validate and normalise a manifest; raises :class:`ManifestError`."""
    raw = resolve_relative_paths(_read_raw(uri, storage or StorageConfig()), uri)
    return validate_manifest(raw, reserved, source=uri)


def is_manifest_file(uri: str) -> bool:
    """A manifest is named *.csv, *.tsv, *.jsonl or *.parquet; anything else is a prefix."""
    return uri.lower().endswith(tuple(FORMATS))


def read_input(uri: str, storage: StorageConfig, listing=None, stats=None) -> pa.Table:
    """What the audit reads: a manifest file, or a folder or an s3:// prefix listed with
    ``listing`` (an :class:`~deepaudit.infra.listing.ListingConfig`; its columns ``size``,
    ``etag`` and ``mtime`` give the ledger's change keys). Validated like any manifest.
    ``stats`` (a :class:`~deepaudit.infra.listing.ListingStats`) gets what was skipped:
    non-media files of a folder, items of another ``--media-type`` or glob."""
    from deepaudit.pipeline.schema import RESERVED_COLUMNS

    manifest = is_manifest_file(uri)
    check_readable(uri, storage, what="manifest" if manifest else "prefix", is_file=manifest)
    from deepaudit.infra.listing import ListingConfig, ListingStats, listing_table

    stats = stats if stats is not None else ListingStats()  # what was skipped, and why
    if manifest:
        table = read_manifest(uri, RESERVED_COLUMNS, storage)
        kept = _keep_media_types(table, listing, uri)
        stats.listed, stats.kept = table.num_rows, kept.num_rows
        stats.excluded = table.num_rows - kept.num_rows
        return kept
    if not is_s3(uri) and not Path(filesystem_for(uri)[1]).exists():
        raise ManifestError(f"{uri} does not exist: give a manifest (*.csv, *.tsv, *.jsonl, "
                            "*.parquet) or a folder of media")
    try:
        table = listing_table(uri, storage, listing or ListingConfig(), stats)
    except FileNotFoundError:
        raise ManifestError(f"{uri} is neither a manifest (*.csv, *.tsv, *.jsonl, *.parquet) "
                            "nor a folder") from None
    if table.num_rows == 0:
        raise ManifestError(
            f"no media found under {uri}: {stats.listed} objects listed, {stats.excluded} "
            f"excluded by --include/--exclude, {stats.not_media} not media. Check the prefix "
            "and the globs.")
    return validate_manifest(table, RESERVED_COLUMNS, source=uri)


def _keep_media_types(table: pa.Table, listing, source: str) -> pa.Table:
    """A manifest's rows of ``listing.media_types`` (``audit --media-type``): the type is
    the manifest's own ``media_type`` column (``deepaudit manifest`` writes one), else the
    file extension. A row whose type neither tells is kept: it is audited, and its
    verdict row says what it is."""
    wanted = set(listing.media_types) if listing is not None else set(MEDIA_TYPES)
    if wanted >= set(MEDIA_TYPES):
        return table
    column = next((c for c in ("manifest_media_type", "media_type") if c in table.column_names),
                  None)
    declared = table[column].to_pylist() if column else [None] * table.num_rows
    keep = [(str(t).lower() if t else media_type_by_name(u)) in wanted | {None}
            for t, u in zip(declared, table["uri"].to_pylist())]
    kept = table.filter(pa.array(keep, pa.bool_()))
    if kept.num_rows == 0:
        raise ManifestError(f"{source} has no {' or '.join(sorted(wanted))} items "
                            f"(--media-type): {table.num_rows} rows, none of that type")
    return kept


# The ``label`` column's words (any case); anything else is unlabelled.
FAKE_WORDS = {"fake", "1", "true", "yes", "manipulated", "deepfake", "synthetic"}
REAL_WORDS = {"real", "0", "false", "no", "original", "pristine", "genuine"}


def parse_label(value: object) -> int | None:
    """1 for fake, 0 for real, None for anything else (unknown, empty)."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in FAKE_WORDS:
        return 1
    if text in REAL_WORDS:
        return 0
    return None
