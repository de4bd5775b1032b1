"""``deepaudit manifest PREFIX --output MANIFEST``: list an archive into a Parquet manifest."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

from deepaudit.jobs.options import S3Endpoint


def manifest_command(
    prefix: Annotated[
        str, typer.Argument(metavar="PREFIX",
                            help="A local folder or an s3://bucket/prefix to list.")
    ],
    output: Annotated[
        str, typer.Option("--output", "-o", help="The Parquet manifest to write (local or "
                          "s3://). Columns: uri, size, etag (S3), mtime, media_type.")
    ],
    include: Annotated[
        Optional[list[str]], typer.Option(help="Keep only keys matching this glob, relative to "
                                          "the prefix ('videos/**', '*.mp4'); repeatable.")
    ] = None,
    exclude: Annotated[
        Optional[list[str]], typer.Option(help="Drop keys matching this glob; repeatable.")
    ] = None,
    media_type: Annotated[
        Optional[list[str]], typer.Option(help="Keep only this media type: video or image; "
                                          "repeatable (default: both).")
    ] = None,
    sniff: Annotated[
        bool, typer.Option(help="Tell the media type of keys without an extension from their "
                           "first 512 bytes (one range read each).")
    ] = True,
    s3_endpoint: S3Endpoint = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the listing's counts as JSON on stdout.")
    ] = False,
) -> None:
    """List the media under a folder or s3:// prefix into a Parquet manifest.

    The listing streams page by page: a prefix with millions of keys is never held in
    memory at once."""
    from deepaudit.infra.listing import MEDIA_TYPES, ListingConfig, write_manifest
    from deepaudit.infra.storage import StorageConfig

    err = Console(stderr=True)
    try:
        config = ListingConfig(include=tuple(include or ()), exclude=tuple(exclude or ()),
                               media_types=tuple(media_type or MEDIA_TYPES), sniff=sniff)
        stats = write_manifest(prefix, output, StorageConfig(endpoint_url=s3_endpoint), config)
    except (ValueError, FileNotFoundError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    counts = {"output": output, "listed": stats.listed, "kept": stats.kept,
              "excluded": stats.excluded, "not_media": stats.not_media,
              "sniffed": stats.sniffed, "by_type": stats.by_type}
    if json_out:
        sys.stdout.write(json.dumps(counts) + "\n")
    else:
        types = ", ".join(f"{v} {k}" for k, v in sorted(stats.by_type.items())) or "none"
        err.print(f"{output}: {stats.kept} media items ({types}) of {stats.listed} objects; "
                  f"{stats.excluded} excluded by globs or type, {stats.not_media} not media")
    if stats.kept == 0:
        err.print("[yellow]warning:[/yellow] no media found; check the prefix and the globs")
        raise typer.Exit(1)
