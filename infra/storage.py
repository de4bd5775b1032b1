"""Object-store helpers: one place that turns a URI into a filesystem.

Local paths and ``s3://`` URIs are supported. S3 goes through s3fs; the endpoint,
credentials and region come from the usual AWS environment variables and profiles
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_DEFAULT_REGION`` ...),
and :class:`StorageConfig.endpoint_url` (``--s3-endpoint``) overrides the endpoint.

Credentials are never stored on the config object, so a config can be printed,
pickled to Ray actors or written to a run summary safely.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import fsspec

S3_SCHEMES = ("s3://", "s3a://")


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEMES)


@dataclass(frozen=True)
class StorageConfig:
    """How to reach object storage. Holds no secrets."""

    endpoint_url: str | None = None
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    max_attempts: int = 5

    def resolved_endpoint(self) -> str | None:
        return (
            self.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )


def s3_filesystem(config: StorageConfig) -> fsspec.AbstractFileSystem:
    """An s3fs filesystem with retries and timeouts configured."""
    import s3fs  # imported lazily: local-only runs never pay for aiobotocore

    client_kwargs = {}
    endpoint = config.resolved_endpoint()
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    return s3fs.S3FileSystem(
        client_kwargs=client_kwargs,
        config_kwargs={
            "connect_timeout": config.connect_timeout_s,
            "read_timeout": config.read_timeout_s,
            "retries": {"max_attempts": config.max_attempts, "mode": "adaptive"},
        },
        # Listings can change between runs of a scheduled audit: never serve stale ones.
        use_listings_cache=False,
        skip_instance_cache=True,
    )


def filesystem_for(
    uri: str, config: StorageConfig | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for a local path or an ``s3://`` URI."""
    config = config or StorageConfig()
    if is_s3(uri):
        return s3_filesystem(config), uri.split("://", 1)[1]
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return fsspec.filesystem("file"), str(Path(uri).expanduser().absolute())


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', for local paths and s3:// prefixes alike."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


_SECRET_QUERY = re.compile(
    r"((?:X-Amz-(?:Credential|Signature|Security-Token)|AWSAccessKeyId|Signature)=)[^&\s'\"]+",
    re.I)
_URL_QUERY = re.compile(r"(https?://[^\s?'\"]+)\?[^\s'\"]*")


def redact(text: str) -> str:
    """Strip presigned-URL query strings and credential fields from a message."""
    text = _SECRET_QUERY.sub(r"\1<redacted>", text)
    return _URL_QUERY.sub(r"\1?<redacted>", text)
