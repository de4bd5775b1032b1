"""What ``deepaudit serve`` refuses, in one place (docs/serve.md: Security model).

* **Hosts.** Every request's ``Host`` must name this server: ``localhost``, ``127.0.0.1``,
  ``[::1]`` or the bound address, with the port it listens on, or a name given with
  ``--allowed-host`` (a proxy's). A DNS-rebinding page reaches the server under its own
  name, so it is refused before anything is read.
* **Posts** (a review, an upload) need an ``Origin`` naming one of those hosts (or, without
  an Origin, ``Sec-Fetch-Site: same-origin``) and a CSRF token this server issued
  (:class:`CsrfTokens`: signed with a secret made at start), in both the form and the
  cookie.
* **Token** (``--token``): checked on every request with :func:`hmac.compare_digest`;
  ``Authorization: Bearer``, a ``?token=`` link (which sets an HttpOnly cookie and
  redirects to a path on this server without it), or that cookie.
* **Sizes and times.** Request headers over 16 KB are a 431; the request size is capped
  before the body is read, and a body that comes too slowly is cut off (408); slow
  headers are :mod:`.server`'s.
* **Headers.** Every reply of the application, its own 400, 401, 303, 413 and 431
  included, carries the Content-Security-Policy, nosniff, frame-ancestors and no-store
  headers, in place of any the page set.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import threading
import time
from collections import defaultdict, deque
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse

TOKEN_COOKIE, CSRF_COOKIE = "deepaudit_token", "deepaudit_csrf"
MIN_TOKEN = 16
MAX_HEADER_BYTES = 16 * 1024  # the request line and headers
CSRF_MAX_AGE_S = 24 * 3600
CSP = ("default-src 'none'; img-src 'self' data:; style-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = ((b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"same-origin"),
                    (b"cache-control", b"no-store"))
OURS = {k for k, _ in SECURITY_HEADERS}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")
# (magic bytes at offset, offset, extension, kind); ISO BMFF (mp4/mov) has "ftyp" at 4.
SNIFF = [(b"\xff\xd8\xff", 0, ".jpg", "image"), (b"\x89PNG\r\n\x1a\n", 0, ".png", "image"),
         (b"BM", 0, ".bmp", "image"), (b"WEBP", 8, ".webp", "image"),
         (b"ftyp", 4, ".mp4", "video"), (b"\x1aE\xdf\xa3", 0, ".mkv", "video"),
         (b"AVI ", 8, ".avi", "video")]


def token_problem(token: str) -> str | None:
    """Why ``token`` cannot be this server's token, or None when it can."""
    if len(token) < MIN_TOKEN:
        return f"--token must be at least {MIN_TOKEN} characters"
    if not all("!" <= c <= "~" for c in token):
        return "--token must be visible ASCII characters only (no spaces or control characters)"
    return None


def sniff(head: bytes) -> tuple[str, str] | None:
    """(extension, kind) of an upload from its first bytes, or None when it is neither a
    supported image nor a supported video container."""
    for magic, at, ext, kind in SNIFF:
        if head[at:at + len(magic)] == magic:
            if ext in (".webp", ".avi") and head[:4] != b"RIFF":
                continue
            return ext, kind
    return None


def split_host(value: str) -> tuple[str, int | None] | None:
    """``(name, port)`` of a Host header value (``[::1]:8765``, ``localhost``), lower case,
    without a trailing dot; None when it is not a host."""
    value = value.strip().lower()
    if not value or any(c in value for c in "/\\@?# \t"):
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1:]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else None
    elif value.count(":") == 1:
        name, port_text = value.split(":")
    elif ":" in value:  # a bare IPv6 address is not a valid Host
        return None
    else:
        name, port_text = value, None
    name = name.rstrip(".")
    if not name:
        return None
    if port_text is None:
        return name, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    return name, int(port_text)


class HostCheck:
    """Which ``Host`` (and ``Origin``) names this server: loopback names and the bound
    address on the port it listens on, plus ``--allowed-host`` entries (``NAME`` for any
    port, or ``NAME:PORT``). Bound to every interface (0.0.0.0, which needs a token) and
    given no ``--allowed-host``, any name is accepted: the token is then the guard."""

    def __init__(self, bound: str | None = "127.0.0.1", allowed: list[str] | None = None):
        self.any_name = bound in WILDCARDS and not allowed
        self.names = set(LOOPBACK_NAMES)
        if bound and bound not in WILDCARDS:
            self.names.add(bound.strip("[]").lower())
        self.extra = []
        for entry in allowed or []:
            parsed = split_host(entry)
            if parsed is None:
                raise ValueError(f"--allowed-host {entry!r} is not a host name (NAME or "
                                 "NAME:PORT)")
            self.extra.append(parsed)

    def allows(self, host: str | None, port: int | None) -> bool:
        """Whether ``host`` (a Host header, or an Origin's host[:port]) names this server,
        which listens on ``port``."""
        parsed = split_host(host or "")
        if parsed is None:
            return False
        name, given = parsed
        if any(name == n and (p is None or p == given) for n, p in self.extra):
            return True
        if self.any_name:
            return True
        return name in self.names and (given == port or (given is None and port == 80))

    def allows_origin(self, origin: str, port: int | None, host: str | None = None) -> bool:
        """Whether ``origin`` names this server; where any name is accepted (0.0.0.0, no
        --allowed-host), it must name the request's own ``host``."""
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or parts.path or not self.allows(parts.netloc,
                                                                                 port):
            return False
        if self.any_name:
            return split_host(parts.netloc) == split_host(host or "")
        return True

    def describe(self, port: int | None) -> str:
        names = sorted(f"[{n}]" if ":" in n else n for n in self.names)
        return f"{', '.join(names)} on port {port}"


class RateLimiter:
    """At most ``n`` events per ``window_s`` per client."""

    def __init__(self, n: int, window_s: float = 60.0) -> None:
        self.n, self.window = n, window_s
        self.events: dict[str, deque] = defaultdict(deque)
        self.lock = threading.Lock()

    def allow(self, client: str) -> float:
        """0 when allowed (and counted), else seconds until the next one is."""
        now = time.monotonic()
        with self.lock:
            q = self.events[client]
            while q and now - q[0] > self.window:
                q.popleft()
            if len(q) >= self.n:
                return self.window - (now - q[0])
            q.append(now)
            return 0.0


class Guard:
    """Pure ASGI middleware: security headers on every reply, Host check, token check,
    request size cap and body deadline."""

    def __init__(self, app, token: str | None, max_upload: int, hosts: HostCheck,
                 body_idle_s: float = 15.0, body_total_s: float = 120.0) -> None:
        self.app, self.token, self.max_upload, self.hosts = app, token, max_upload, hosts
        self.body_idle_s, self.body_total_s = body_idle_s, body_total_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":  # ours replace the page's own
                headers = [h for h in message.get("headers", []) if h[0].lower() not in OURS]
                message = {**message, "headers": headers + list(SECURITY_HEADERS)}
            await send(message)

        async def reply(resp):
            return await resp(scope, receive, send_with_headers)

        if header_bytes(scope) > MAX_HEADER_BYTES:  # uvicorn took them: they came at once
            return await reply(PlainTextResponse(
                f"431: request headers are limited to {MAX_HEADER_BYTES // 1024} KB",
                status_code=431))
        request = Request(scope)
        port = (scope.get("server") or (None, None))[1]
        if not self.hosts.allows(request.headers.get("host"), port):
            return await reply(PlainTextResponse(
                f"400: this server answers only to {self.hosts.describe(port)}, not to the "
                "Host this request named; behind a proxy, start it with --allowed-host NAME",
                status_code=400))
        if self.token is not None:
            given = _given_token(request)
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                return await reply(PlainTextResponse(
                    "401: this server needs its token: open the link it printed (?token=...) "
                    "or send 'Authorization: Bearer TOKEN'", status_code=401,
                    headers={"WWW-Authenticate": "Bearer"}))
            if "token" in request.query_params and request.method == "GET":
                resp = RedirectResponse(_same_page_without_token(scope, request),
                                        status_code=303)
                resp.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
                return await reply(resp)
        limit = self.max_upload + 64 * 1024  # the multipart envelope around the file
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await reply(PlainTextResponse(
                f"413: uploads are limited to {self.max_upload // 2**20} MB", status_code=413))
        seen, done = 0, False
        deadline = time.monotonic() + self.body_total_s

        async def capped_receive():
            # Only the request body is timed: later reads wait for a disconnect while a
            # long response (an export) streams, and must not time out.
            nonlocal seen, done
            if done:
                return await receive()
            left = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(self.body_idle_s,
                                                                         left)))
            except asyncio.TimeoutError:
                raise HTTPException(408, "the request body came too slowly") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if seen > limit:
                    raise HTTPException(413, f"uploads are limited to "
                                             f"{self.max_upload // 2**20} MB")
            else:
                done = True
            return message

        await self.app(scope, capped_receive, send_with_headers)


def header_bytes(scope) -> int:
    """The size of a request's line and headers as they came (``GET /p?q HTTP/1.1``, each
    ``name: value``, the line ends)."""
    target = len(scope.get("raw_path") or scope["path"].encode()) + \
        (1 + len(scope["query_string"]) if scope.get("query_string") else 0)
    line = len(scope["method"]) + 1 + target + len(" HTTP/1.1\r\n")
    return line + sum(len(k) + len(v) + 4 for k, v in scope["headers"]) + 2


class CsrfTokens:
    """CSRF tokens issued by this server: a random nonce and the time it was issued, signed
    with HMAC-SHA256 under a secret made when the app is made (never stored or sent), so
    a client cannot choose one and a token of another server (or an earlier run) is not
    valid. A token is good for :data:`CSRF_MAX_AGE_S`."""

    def __init__(self, max_age_s: float = CSRF_MAX_AGE_S) -> None:
        self.secret, self.max_age_s = secrets.token_bytes(32), max_age_s

    def _sign(self, nonce: str, issued: str) -> str:
        return hmac.new(self.secret, f"csrf:{nonce}:{issued}".encode(),
                        hashlib.sha256).hexdigest()

    def issue(self) -> str:
        nonce, issued = secrets.token_urlsafe(18), str(int(time.time()))
        return f"{nonce}.{issued}.{self._sign(nonce, issued)}"

    def valid(self, token: str | None) -> bool:
        if not isinstance(token, str) or len(token) > 200 or token.count(".") != 2:
            return False
        nonce, issued, sig = token.split(".")
        if not issued.isdigit():
            return False
        return hmac.compare_digest(sig.encode(), self._sign(nonce, issued).encode()) and \
            0 <= time.time() - int(issued) <= self.max_age_s


def csrf_token(request: Request, tokens: CsrfTokens) -> str:
    """The CSRF token of this browser (its cookie, when this server issued it and it is
    still good), or a new one to set."""
    cookie = request.cookies.get(CSRF_COOKIE)
    return cookie if tokens.valid(cookie) else tokens.issue()


def origin_problem(request: Request, hosts: HostCheck) -> str | None:
    """Why a post (a review, an upload) must be refused (403) for where it came from, or
    None. Its ``Origin`` must name this server (not merely repeat the Host: a rebinding
    page sends its own name in both); ``null`` (a sandboxed frame, a ``data:`` page) or
    an empty one is refused. Without an Origin, the browser's ``Sec-Fetch-Site`` must say
    ``same-origin``, and when it is sent it must say so in any case."""
    origin = request.headers.get("origin")
    site = request.headers.get("sec-fetch-site")
    port = (request.scope.get("server") or (None, None))[1]
    if site is not None and site != "same-origin":
        return f"the form was posted from another site (Sec-Fetch-Site: {site[:20]})"
    if origin is None:
        if site == "same-origin":
            return None
        return ("the post has no Origin of this server (nor Sec-Fetch-Site: same-origin): "
                "send the form from this server's own page")
    if not hosts.allows_origin(origin, port, request.headers.get("host")):
        return "the form was posted from another site"
    return None


def csrf_problem(request: Request, form, tokens: CsrfTokens) -> str | None:
    """Why a post must be refused (403) for its CSRF field, or None: the field must be a
    token this server issued, and the same as this browser's cookie (HttpOnly,
    SameSite=Strict)."""
    cookie, field = request.cookies.get(CSRF_COOKIE), form.get("csrf")
    if not cookie or not isinstance(field, str) or not tokens.valid(field) or \
            not hmac.compare_digest(cookie.encode(), field.encode()):
        return "the form's security token is missing or stale: reload the page and try again"
    return None


def _same_page_without_token(scope, request: Request) -> str:
    """The requested path (as sent, still %-encoded) and query without ``token``, always a
    path on this server: ``//evil.example/x`` becomes ``/evil.example/x``."""
    from urllib.parse import urlencode

    raw = scope.get("raw_path") or scope["path"].encode()
    path = "/" + raw.decode("latin-1").lstrip("/\\")
    rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
    return path + ("?" + urlencode(rest) if rest else "")


def _given_token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE)
