"""SIGINT/SIGTERM during an audit: the first signal stops the run after the finished
rows are published, the second exits at once (docs/robustness.md)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading


class AuditInterrupted(BaseException):
    """SIGINT or SIGTERM stopped the audit; what was finished is on disk.

    A BaseException, like KeyboardInterrupt: no ``except Exception`` on the way (Ray's
    included) may swallow it. ``summary`` is the run's summary (state ``interrupted``)."""

    def __init__(self, signum: int, summary: dict | None = None) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum, self.summary = signum, summary

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM


class SignalGuard:
    """SIGINT/SIGTERM handlers for the run: the first raises :class:`AuditInterrupted`
    (deferred while the writer is in the middle of a batch), the second exits at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._depth = 0
        self._raised = False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            prev = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, prev)

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # a second signal: no flush, leave now
            os._exit(128 + signum)
        self.signum = signum
        if self._depth == 0:
            self._raise()

    def _raise(self) -> None:
        if self.signum is not None and not self._raised:
            self._raised = True
            raise AuditInterrupted(self.signum)

    @contextlib.contextmanager
    def deferred(self):
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0:
            self._raise()
