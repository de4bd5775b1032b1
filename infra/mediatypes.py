"""The one table of media file extensions: the listing, the audit's decode and training's
folder readers all ask it whether a name is a video or an image.

Only containers the bundled FFmpeg (Debian's 5.1) demuxes and decodes are listed;
``tests/infra/test_mediatypes.py`` decodes one file of each. HEIC is left out: FFmpeg
reads HEIF image items only from 7.1 on, so a ``.heic`` fails to open here. AVIF stills
open (FFmpeg 5.1 reads AVIF items). A GIF is a video: it may be animated.
"""

from __future__ import annotations

VIDEO_EXTENSIONS = (
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
    ".flv", ".wmv", ".3gp", ".ogv", ".mxf", ".gif",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".avif")
MEDIA_TYPES = ("video", "image")


def media_type_by_name(key: str) -> str | None:
    """``video``/``image`` from the extension; ``None`` when the extension says nothing."""
    lower = key.lower().rsplit("/", 1)[-1]
    if lower.endswith(VIDEO_EXTENSIONS):
        return "video"
    if lower.endswith(IMAGE_EXTENSIONS):
        return "image"
    return None
