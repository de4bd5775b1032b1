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

    def __post_init__(self) -> None:
        # The one place storage options are checked (every command builds one StorageConfig).
        if self.endpoint_url is not None and not re.match(r"https?://[^/\s]+", self.endpoint_url):
            raise ValueError(f"--s3-endpoint must be an http:// or https:// URL, got "
                             f"{self.endpoint_url!r}")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0 or self.max_attempts < 1:
            raise ValueError("storage timeouts must be > 0 and max_attempts >= 1")

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


class OutputError(ValueError):
    """An output location cannot be written; the message says what is wrong and what to do."""


def check_writable(uri: str, storage: StorageConfig | None = None, what: str = "output",
                   is_file: bool = False, create: bool = False) -> None:
    """Fail fast, before any work, when ``uri`` (a folder, or with ``is_file`` a file to
    create) cannot be written: a file sits where a folder must be, no permission, a
    read-only filesystem, a bucket that does not exist or credentials that may not write.
    Creates the folder (as the command would; ``create=False``: probes its nearest
    existing parent instead) and writes and deletes one probe file there."""
    import secrets

    probe_name = f".deepaudit-write-probe-{secrets.token_hex(4)}"
    if is_s3(uri):
        _check_s3(uri, storage or StorageConfig(), what, probe_name, is_file)
        return
    path = Path(filesystem_for(uri)[1])
    folder = path.parent if is_file else path
    if is_file and path.is_dir():
        raise OutputError(f"{what} {uri} is a folder: give the path of a file to write")
    existing = folder
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(
                    f"{what} {uri}: {parent} is a file, not a folder; choose a path whose "
                    "parents are all folders")
            existing = parent
            break
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        probe = (folder if create else existing) / probe_name
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(f"{what} {uri} cannot be written ({reason}: {exc.filename or folder}); "
                          "choose a folder you can write to, or fix its permissions") from None


def _check_s3(uri: str, storage: StorageConfig, what: str, probe_name: str,
              is_file: bool) -> None:
    fs, path = filesystem_for(uri, storage)
    folder = path.rstrip("/").rsplit("/", 1)[0] if is_file else path.rstrip("/")
    probe = f"{folder}/{probe_name}"
    try:
        fs.pipe_file(probe, b"")
    except Exception as exc:  # noqa: BLE001 - botocore, s3fs and OS errors alike
        reason = redact(str(exc)).strip().splitlines()[0][:200] if str(exc) else ""
        kind = type(exc).__name__
        hint = ("check the bucket name" if isinstance(exc, FileNotFoundError) else
                "check that the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE) may write there")
        raise OutputError(f"{what} {uri} cannot be written ({kind}: {reason}); {hint}, "
                          "or choose another prefix") from None
    try:
        fs.rm_file(probe)
    except Exception:  # noqa: BLE001 - write without delete permission is still writable
        pass
