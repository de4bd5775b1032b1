"""Command-line options several commands share, declared once."""

from __future__ import annotations

from enum import Enum
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


class FaceDetectorKind(str, Enum):
    """``--face-detector``: models/face_detector.py's FACE_DETECTORS."""

    retinaface = "retinaface"
    mtcnn = "mtcnn"


def face_detector_option(panel: str | None = None):
    """``--face-detector``, for ``Annotated[FaceDetectorKind, face_detector_option()]``."""
    return typer.Option("--face-detector", case_sensitive=False, rich_help_panel=panel,
                        help="Face detector: retinaface or mtcnn (3x slower; docs/design.md).")
