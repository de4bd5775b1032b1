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
import threading
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


# The environment an S3 client reads its endpoint, credentials and region from: a change
# to any of them gets a new client.
_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
            "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_SHARED_CREDENTIALS_FILE",
            "AWS_CONFIG_FILE")
_S3_CLIENTS: dict[tuple, fsspec.AbstractFileSystem] = {}
_S3_CLIENTS_MAX = 8
_S3_LOCK = threading.Lock()


def s3_filesystem(config: StorageConfig) -> fsspec.AbstractFileSystem:
    """An s3fs filesystem with retries and timeouts configured, one per process for each
    config and AWS environment: building a client costs about 0.2 CPU-s (botocore loads
    its service model), which a decode actor paid on every item before."""
    key = (config, os.getpid(), tuple(os.environ.get(name) for name in _AWS_ENV))
    with _S3_LOCK:
        fs = _S3_CLIENTS.get(key)
        if fs is None:
            if len(_S3_CLIENTS) >= _S3_CLIENTS_MAX:
                _S3_CLIENTS.pop(next(iter(_S3_CLIENTS)))
            fs = _S3_CLIENTS[key] = _new_s3_filesystem(config)
        return fs


def _new_s3_filesystem(config: StorageConfig) -> fsspec.AbstractFileSystem:
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
            # Not "adaptive": its client-side rate limit lives as long as the kept client,
            # and a few 503 SlowDown answers slowed a whole process 3x (docs/performance.md).
            "retries": {"max_attempts": config.max_attempts, "mode": "standard"},
        },
        # Listings can change between runs of a scheduled audit: never serve stale ones.
        use_listings_cache=False,
        # fsspec's own instance cache ignores the environment; ours above keys on it.
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


class StorageError(ValueError):
    """An s3:// location cannot be reached or read: no credentials, credentials refused, a
    missing bucket or an unreachable endpoint. One line that says what to fix."""


def _bucket(uri: str) -> str:
    return uri.split("://", 1)[-1].split("/", 1)[0]


def storage_problem(exc: BaseException, uri: str, what: str, storage: StorageConfig,
                    verb: str = "read") -> StorageError | None:
    """The one-line :class:`StorageError` for an S3 failure that the user must fix
    (credentials, bucket, endpoint), or None when ``exc`` is something else."""
    name = type(exc).__name__
    text = redact(str(exc)).strip().splitlines()[0][:200] if str(exc).strip() else name
    endpoint = storage.resolved_endpoint() or "AWS's default endpoint"
    if name in ("NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError"):
        return StorageError(
            f"{what} {uri} cannot be {verb}: no S3 credentials were found; set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    if isinstance(exc, PermissionError) or (name == "ClientError" and "AccessDenied" in text):
        return StorageError(
            f"{what} {uri} cannot be {verb} (access denied: {text}); check that the "
            "credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE) are right and may "
            f"{'read' if verb == 'read' else 'write'} it")
    if isinstance(exc, FileNotFoundError) and "bucket" in text.lower():
        return StorageError(f"{what} {uri}: the bucket {_bucket(uri)!r} does not exist at "
                            f"{endpoint}; check the bucket name and --s3-endpoint")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                "ProxyConnectionError", "ClientConnectorError", "ServerDisconnectedError",
                "ConnectionRefusedError", "InvalidEndpointError") or isinstance(
                    exc, (ConnectionError, TimeoutError)):
        return StorageError(f"{what} {uri} cannot be {verb}: the S3 endpoint {endpoint} "
                            f"cannot be reached ({name}); check --s3-endpoint or "
                            "AWS_ENDPOINT_URL and the network")
    return None


def check_readable(uri: str, storage: StorageConfig | None = None, what: str = "input",
                   is_file: bool = False) -> None:
    """Fail fast, before any work, when an ``s3://`` input cannot be read because of the
    credentials, the bucket or the endpoint (:class:`StorageError`): one HEAD request, of
    the object (``is_file``) or of its bucket. A missing key under a bucket that exists
    passes: the caller reports it in its own words. Local paths pass."""
    if not is_s3(uri):
        return
    storage = storage or StorageConfig()
    fs, path = filesystem_for(uri, storage)
    try:
        if is_file:
            fs.info(path)
        else:
            fs.call_s3("head_bucket", Bucket=_bucket(uri))
    except Exception as exc:  # noqa: BLE001 - botocore, aiohttp and OS errors alike
        if isinstance(exc, FileNotFoundError) and not is_file:
            exc = FileNotFoundError("the bucket does not exist")
        problem = storage_problem(exc, uri, what, storage)
        if problem is not None:
            raise problem from None
        if not isinstance(exc, FileNotFoundError):
            raise StorageError(f"{what} {uri} cannot be read ({type(exc).__name__}: "
                               f"{redact(str(exc)).strip()[:200]})") from None


class OutputError(ValueError):
    """An output location cannot be written; the message says what is wrong and what to do."""



def open_readable(uri: str, storage: StorageConfig, what: str,
                  error: type[Exception] = StorageError):
    """``(filesystem, path)`` of ``uri`` once :func:`check_readable` passed; its failure is
    raised as ``error`` (a command's own usage error)."""
    try:
        check_readable(uri, storage, what=what)  # credentials, bucket, endpoint
    except StorageError as exc:
        raise error(str(exc)) from None
    return filesystem_for(uri, storage)

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
        problem = storage_problem(exc, uri, what, storage, verb="written")
        if problem is not None and not isinstance(exc, (FileNotFoundError, PermissionError)):
            raise OutputError(str(problem)) from None  # no credentials, no endpoint
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
