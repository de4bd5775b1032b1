"""A fault-injecting, byte-counting HTTP proxy on 127.0.0.1 in front of the moto server.

Everything that talks S3 in a test (s3fs/botocore on the driver and in Ray actors, ffmpeg
reading presigned URLs) can be pointed at it. Every ``fail_every``-th request is answered
with a fault instead of being forwarded: ``503`` (S3's SlowDown, which clients retry) or
``drop`` (the connection is closed without an answer). It counts requests, faults,
ListObjectsV2 calls and the response body bytes it actually delivered per object key.
"""

from __future__ import annotations

import http.client
import itertools
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
              "trailer", "upgrade", "expect", "content-length"}
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class _Server(ThreadingHTTPServer):
    """Small send buffers: bytes count as served once they leave a 32 KiB buffer, not when
    they enter a multi-megabyte one, so the counts reflect what clients actually read."""

    def get_request(self):
        conn, addr = super().get_request()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        return conn, addr


class FaultProxy:
    def __init__(self, upstream: str, fail_every: int = 0, modes=("503", "drop")) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.fail_every, self.modes = fail_every, tuple(modes)
        self.lock = threading.Lock()
        self.counter = itertools.count(1)
        self.requests = 0
        self.faults: Counter[str] = Counter()
        self.listings = 0
        self.bytes_by_key: Counter[str] = Counter()
        self.user_agents: Counter[str] = Counter()
        self.faults_by_agent: Counter[str] = Counter()
        self.server = _Server(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset_counts(self) -> None:
        with self.lock:
            self.requests = self.listings = 0
            self.faults.clear()
            self.bytes_by_key.clear()
            self.user_agents.clear()
            self.faults_by_agent.clear()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self) -> None:
                body = self._body()
                n = next(proxy.counter)
                path = urlsplit(self.path).path
                agent = (self.headers.get("User-Agent") or "?").split("/")[0]
                with proxy.lock:
                    proxy.requests += 1
                    if "list-type=2" in self.path:
                        proxy.listings += 1
                    proxy.user_agents[agent] += 1
                if proxy.fail_every and n % proxy.fail_every == 0:
                    mode = proxy.modes[(n // proxy.fail_every) % len(proxy.modes)]
                    with proxy.lock:
                        proxy.faults[mode] += 1
                        proxy.faults_by_agent[agent] += 1
                    if mode == "drop":
                        self.close_connection = True
                        try:
                            self.connection.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                        return
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOW_DOWN)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    resp = upstream.getresponse()
                    length = resp.getheader("Content-Length")
                    data = None
                    if length is None and self.command != "HEAD":
                        data = resp.read()
                        length = str(len(data))
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in HOP_BY_HOP:
                            self.send_header(k, v)
                    if length is not None:
                        self.send_header("Content-Length", length)
                    self.end_headers()
                    if self.command == "HEAD":
                        return
                    if data is not None:
                        self.wfile.write(data)
                        self._count(path, len(data))
                        return
                    while chunk := resp.read(16 * 1024):
                        try:
                            self.wfile.write(chunk)
                        except (BrokenPipeError, ConnectionResetError):
                            self.close_connection = True
                            return
                        self._count(path, len(chunk))
                finally:
                    upstream.close()

            def _count(self, path: str, n: int) -> None:
                if self.command == "GET":
                    with proxy.lock:
                        proxy.bytes_by_key[path] += n

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler
