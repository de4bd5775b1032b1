"""Command-line options several commands share, declared once."""

from __future__ import annotations

from typing import Annotated, Optional

import typer


def check_endpoint(value: str | None) -> str | None:
    """``--s3-endpoint``: checked by StorageConfig (the one rule), reported as a usage error."""
    if value is not None:
        from deepaudit.infra.storage import StorageConfig

        try:
            StorageConfig(endpoint_url=value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


S3Endpoint = Annotated[Optional[str], typer.Option(
    "--s3-endpoint", metavar="URL", callback=check_endpoint,
    help="S3 endpoint URL (else AWS_ENDPOINT_URL).")]
