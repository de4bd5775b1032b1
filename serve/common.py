"""What the modules of ``deepaudit serve`` share: the errors a request can end with (each
one HTTP status), what reading storage may raise, and a small bounded cache."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pyarrow as pa


class BadRequest(ValueError):
    """A bad parameter: the server answers 400 with this message."""


class NotFound(LookupError):
    """No such run or item: the server answers 404 with this message."""


class Gone(LookupError):
    """The item's run (or the whole output) was removed or rewritten after the server
    started: 410."""


class Unavailable(OSError):
    """A file the page needs cannot be read now (storage, credentials): 503."""


def storage_errors() -> tuple[type[BaseException], ...]:
    """What reading a file may raise: OS and Arrow errors, and botocore's own (missing
    credentials, an unreachable endpoint) for s3://."""
    errors: tuple = (OSError, ValueError, pa.ArrowException)
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        errors += (BotoCoreError, ClientError)
    except ImportError:
        pass
    return errors


class LRU:
    """A small thread-safe least-recently-used cache of at most ``size`` entries and, with
    ``max_bytes``, at most that many bytes (``sizeof`` of each value); a value bigger than
    the whole budget is not kept."""

    def __init__(self, size: int = 256, max_bytes: int | None = None,
                 sizeof: Callable[[Any], int] = len) -> None:
        self.size, self.max_bytes, self.sizeof = size, max_bytes, sizeof
        self.data: OrderedDict = OrderedDict()
        self.sizes: dict = {}
        self.nbytes = 0
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.data)

    def peek(self, key, default=None):
        """The value kept for ``key`` (now the most recently used), or ``default``."""
        with self.lock:
            if key not in self.data:
                return default
            self.data.move_to_end(key)
            return self.data[key]

    def get(self, key, make):
        with self.lock:
            if key in self.data:
                self.data.move_to_end(key)
                return self.data[key]
        value = make()
        self.put(key, value)
        return value

    def put(self, key, value) -> None:
        n = self.sizeof(value) if self.max_bytes is not None else 0
        with self.lock:
            self.nbytes -= self.sizes.pop(key, 0)
            self.data.pop(key, None)
            self.data[key] = value
            self.sizes[key] = n
            self.nbytes += n
            while self.data and (len(self.data) > self.size or
                                 (self.max_bytes is not None and self.nbytes > self.max_bytes)):
                old, _ = self.data.popitem(last=False)
                self.nbytes -= self.sizes.pop(old)

    def clear(self) -> None:
        with self.lock:
            self.data.clear()
            self.sizes.clear()
            self.nbytes = 0
