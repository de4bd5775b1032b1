"""How ``deepaudit serve`` runs its app on uvicorn, and its private upload folder.

uvicorn times out idle keep-alive connections, but not a client that sends its request
headers slowly (a slow-loris), and it accepts any number of connections. The protocol
here adds both: a connection must finish each request's headers within
``header_timeout_s`` of connecting (or of its previous response), and connections beyond
``max_connections`` get a 503 and are closed. The same deadline ends a connection that
keeps sending the body of a request already answered (a 404 or a 413 before the body came
in): uvicorn reads and drops such a body, for as long as it comes. Forwarded headers
(``X-Forwarded-For``) are trusted only from the proxies named with
``--forwarded-allow-ips``, never by default. Headers that outgrow 16 KB before they end
get a 431 here (h11 refuses them; uvicorn would say 400); headers over 16 KB that came in
whole are :class:`~.security.Guard`'s 431. With ``-v``, uvicorn's access log has each
request's path and query: :class:`RedactSecrets` takes ``token=`` values out of it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from http import HTTPStatus

from deepaudit.serve.security import MAX_HEADER_BYTES, SECURITY_HEADERS

log = logging.getLogger(__name__)

HEADER_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5
MAX_CONNECTIONS = 100
LINGER_S = 2.0  # how long a refused client may go on sending before the socket closes
UPLOAD_PREFIX = "deepaudit-serve-"
PID_FILE = "serve.pid"
_BUSY_TEXT = b"503: too many connections; try again later\n"
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        b"Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
        b"Content-Length: %d\r\n\r\n" % len(_BUSY_TEXT)) + _BUSY_TEXT
# Query parameters whose values never reach a log: the server's token, and the like.
SECRET_PARAM = re.compile(r"(?i)(\b[\w-]*(?:token|password|passwd|secret|signature)=)[^&\s\"']*")


def redact(text: str) -> str:
    """``text`` with the values of ``token=`` (and password, secret, signature) taken out."""
    return SECRET_PARAM.sub(r"\1[redacted]", text)


class RedactSecrets(logging.Filter):
    """Redacts secrets from a log record's message and arguments (uvicorn's access log:
    ``'%s - "%s %s HTTP/%s" %d'`` with the path and query as one argument)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


def redact_logs(names=("uvicorn.access", "uvicorn.error")) -> None:
    """Put :class:`RedactSecrets` on these loggers (once) and on their handlers (records of
    child loggers reach those without passing the parent's filters)."""
    for name in names:
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if not any(isinstance(f, RedactSecrets) for f in target.filters):
                target.addFilter(RedactSecrets())


def guarded_protocol(header_timeout_s: float, max_connections: int):
    """uvicorn's h11 protocol with a request-header deadline and a connection limit."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._cycle_no = 0
            if len(self.connections) > max_connections:
                log.warning("serve: over %d connections: refusing one", max_connections)
                transport.write(BUSY)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self.loop.call_later(header_timeout_s, self._stalled, self._cycle_no)

        def _stalled(self, cycle_no: int) -> None:
            # No reply since the timer was armed, and no request being answered: the client
            # has not finished its headers (or still trickles a body nobody reads).
            if cycle_no == self._cycle_no and (self.cycle is None or self.cycle.response_complete) \
                    and not self.transport.is_closing():
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            # h11 refuses a request whose headers outgrow its buffer before they end: that
            # is a 431 (Request Header Fields Too Large), not a 400. Either way the reply
            # carries the security headers, as the application's own.
            buffered = self.conn.trailing_data[0]
            if len(buffered) > MAX_HEADER_BYTES and \
                    b"\r\n\r\n" not in buffered[:MAX_HEADER_BYTES + 4]:
                status, text = 431, (f"431: request headers are limited to "
                                     f"{MAX_HEADER_BYTES // 1024} KB")
            else:
                status, text = 400, f"400: {msg}"
            self._reply(status, text)

        def _reply(self, status: int, text: str) -> None:
            import h11

            headers = [(b"content-type", b"text/plain; charset=utf-8"),
                       (b"connection", b"close"), *SECURITY_HEADERS]
            for event in (h11.Response(status_code=status, headers=headers,
                                       reason=HTTPStatus(status).phrase.encode()),
                          h11.Data(data=text.encode()), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            # Half-close, and drain what the client is still sending for a moment: closing
            # with unread bytes makes the kernel send a reset, which can destroy the reply.
            self._lingering = True
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)

        def data_received(self, data: bytes) -> None:
            if not getattr(self, "_lingering", False):
                super().data_received(data)

        def on_response_complete(self) -> None:
            self._cycle_no += 1
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

    return GuardedH11


def server_config(app, host: str = "127.0.0.1", port: int = 8765,
                  forwarded_allow_ips: str | None = None, verbose: bool = False,
                  header_timeout_s: float = HEADER_TIMEOUT_S,
                  max_connections: int = MAX_CONNECTIONS, keep_alive_s: int = KEEP_ALIVE_S):
    """The uvicorn configuration ``deepaudit serve`` runs ``app`` with (the tests' too)."""
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, log_level="info" if verbose else "warning",
        access_log=verbose, server_header=False,
        http=guarded_protocol(header_timeout_s, max_connections),
        # X-Forwarded-For/-Proto only from the named proxies; uvicorn's default trusts
        # 127.0.0.1, where every local client (and a rebinding page) comes from.
        proxy_headers=forwarded_allow_ips is not None,
        forwarded_allow_ips=forwarded_allow_ips or "",
        timeout_keep_alive=keep_alive_s, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        timeout_graceful_shutdown=5)
    redact_logs()  # after uvicorn's Config has set up its loggers
    return config


# ---------------------------------------------------------------------- upload folder

def make_upload_root() -> str:
    """A private (0700) temp folder for uploads, marked with this process's id; folders
    that servers no longer running left behind are removed first."""
    sweep_upload_roots()
    root = tempfile.mkdtemp(prefix=UPLOAD_PREFIX)
    with open(os.path.join(root, PID_FILE), "w") as f:
        f.write(str(os.getpid()))
    return root


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_upload_roots(tmp: str | None = None, legacy_age_s: float = 86400.0) -> list[str]:
    """Remove this user's ``deepaudit-serve-*`` temp folders whose server is gone: its
    pid file names no live process, or (no pid file: older versions, a killed media
    draw) it was last changed a day ago or more. Returns what was removed."""
    tmp = tmp or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(tmp)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(UPLOAD_PREFIX):
            continue
        path = os.path.join(tmp, name)
        try:
            st = os.lstat(path)
            if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.getuid():
                continue
            try:
                with open(os.path.join(path, PID_FILE)) as f:
                    pid = int(f.read().strip() or "0")
                stale = pid <= 0 or not _alive(pid)
            except FileNotFoundError:
                stale = time.time() - st.st_mtime >= legacy_age_s
            except ValueError:
                stale = True
        except OSError:
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
