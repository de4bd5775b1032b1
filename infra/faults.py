"""Fault injection for the tests and the chaos bench: a fault-injecting, byte-counting HTTP
proxy in front of an S3-speaking server, and a killer of this process's Ray workers.

Test helpers live in the library (as detectron2's ``utils/testing.py``) so that the tests
and ``bench/chaos.py`` share one implementation; nothing in the audit imports this module.

:class:`FaultProxy` listens on 127.0.0.1. Everything that talks S3 (s3fs/botocore in the
driver and in Ray actors, ffmpeg reading presigned URLs) can be pointed at it. A request
gets a fault instead of (or before) being forwarded, either deterministically (every
``fail_every``-th request, ``modes`` in turn) or at random (``fault_rate`` of requests get
one of ``modes``, ``reset_rate`` of them a connection reset), from a seeded generator.
The modes:

* ``500``: InternalError; ``503``: S3's SlowDown (clients retry both);
* ``slow``: forwarded after ``slow_s`` seconds (a throttled store);
* ``drop``: the connection is closed without an answer (an orderly FIN);
* ``reset``: a TCP reset (RST): before the answer, or halfway through a GET's body.

It counts requests, faults by kind and by client, ListObjectsV2 calls and the response
body bytes it actually delivered per object key.

:class:`WorkerKiller` SIGKILLs a random Ray Data actor process (a decode or classifier
actor) every ``every_s`` seconds: only processes below this one in the process tree (a
local Ray's raylet is the driver's child, its workers the raylet's), so the driver, the
raylet, the GCS and any other session's Ray are never touched.
"""

from __future__ import annotations

import http.client
import itertools
import os
import random
import signal
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
              "trailer", "upgrade", "expect", "content-length"}
ERRORS = {
    "500": (500, "Internal Server Error", b"InternalError",
            b"We encountered an internal error. Please try again."),
    "503": (503, "Slow Down", b"SlowDown", b"Please reduce your request rate."),
}
MODES = ("500", "503", "slow", "drop", "reset")


def _error_body(code: bytes, message: bytes) -> bytes:
    return (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>' + code +
            b"</Code><Message>" + message + b"</Message></Error>")


class _Server(ThreadingHTTPServer):
    """Small send buffers: bytes count as served once they leave a 32 KiB buffer, not when
    they enter a multi-megabyte one, so the counts reflect what clients actually read."""

    daemon_threads = True

    def get_request(self):
        conn, addr = super().get_request()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        return conn, addr


class FaultProxy:
    """A fault-injecting proxy in front of ``upstream`` (see the module docstring)."""

    def __init__(self, upstream: str, fail_every: int = 0, modes=("503", "drop"),
                 fault_rate: float = 0.0, reset_rate: float = 0.0, slow_s: float = 1.0,
                 seed: int = 0) -> None:
        unknown = sorted(set(modes) - set(MODES))
        if unknown or not modes:
            raise ValueError(f"fault modes must be some of {MODES}, got {tuple(modes)}")
        if fail_every < 0 or slow_s < 0 or not (0 <= fault_rate and 0 <= reset_rate
                                                 and fault_rate + reset_rate <= 1):
            raise ValueError("fail_every and slow_s must be >= 0, and fault_rate and "
                             "reset_rate in [0, 1] with a sum of at most 1")
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.fail_every, self.modes = fail_every, tuple(modes)
        self.fault_rate, self.reset_rate, self.slow_s = fault_rate, reset_rate, slow_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counter = itertools.count(1)
        self.requests = 0
        self.faults: Counter[str] = Counter()
        self.listings = 0
        self.bytes_by_key: Counter[str] = Counter()
        self.user_agents: Counter[str] = Counter()
        self.faults_by_agent: Counter[str] = Counter()
        self.server = _Server(("127.0.0.1", 0), self._handler())
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

    def set_faults(self, fault_rate: float, reset_rate: float) -> None:
        """Change the random fault rates (0 and 0: forward everything)."""
        with self.lock:
            self.fault_rate, self.reset_rate = fault_rate, reset_rate

    def reset_counts(self) -> None:
        with self.lock:
            self.requests = self.listings = 0
            self.faults.clear()
            self.bytes_by_key.clear()
            self.user_agents.clear()
            self.faults_by_agent.clear()

    def counts(self) -> dict:
        """Requests, faults by kind and by client (ffmpeg is ``Lavf``), listings."""
        with self.lock:
            return {"requests": self.requests, "faults": dict(self.faults),
                    "faults_by_agent": dict(self.faults_by_agent),
                    "listings": self.listings}

    def _pick(self, n: int) -> str | None:
        """The fault for request number ``n``, or None to forward it."""
        if self.fail_every:
            return (self.modes[(n // self.fail_every) % len(self.modes)]
                    if n % self.fail_every == 0 else None)
        with self.lock:
            r = self.rng.random()
            if r < self.reset_rate:
                return "reset"
            if r < self.reset_rate + self.fault_rate:
                return self.rng.choice(self.modes)
        return None

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

            def _reset(self) -> None:
                """Close with a TCP reset: SO_LINGER 0, then close before any FIN."""
                self.close_connection = True
                try:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.connection.close()  # really closed (RST) once rfile lets go
                except OSError:
                    pass

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _error(self, mode: str) -> None:
                status, reason, code, message = ERRORS[mode]
                body = _error_body(code, message)
                self.send_response(status, reason)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

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
                mode = proxy._pick(n)
                cut_at = None  # a reset halfway through the body of a GET
                if mode is not None:
                    with proxy.lock:
                        proxy.faults[mode] += 1
                        proxy.faults_by_agent[agent] += 1
                        midway = mode == "reset" and self.command == "GET" and \
                            proxy.rng.random() < 0.5
                    if mode == "drop":
                        return self._drop()
                    if mode == "reset" and not midway:
                        return self._reset()
                    if mode in ERRORS:
                        return self._error(mode)
                    if mode == "slow":
                        time.sleep(proxy.slow_s)
                    cut_at = 0.5 if mode == "reset" else None
                self._forward(body, path, cut_at)

            def _forward(self, body: bytes, path: str, cut_at: float | None) -> None:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    resp = upstream.getresponse()
                    length = resp.getheader("Content-Length")
                    data = None
                    if self.command != "HEAD" and (length is None or cut_at is not None):
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
                        if cut_at is not None:
                            data = data[:int(len(data) * cut_at)]
                        self.wfile.write(data)
                        self._count(path, len(data))
                        if cut_at is not None:
                            self._reset()
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


# --------------------------------------------------------------------------- Ray workers

# Ray Data names an actor's process after its stage: ``ray::MapWorker(MapBatches(Stage))``,
# with ``.submit`` appended while it runs a task.
RAY_DATA_ACTOR = "ray::MapWorker("
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Kill:
    """One SIGKILL: when (seconds since the killer started), which process, which stage,
    and whether it was running a task."""

    at_s: float
    pid: int
    stage: str
    busy: bool


def descendants(root: int, cpu: dict[int, float] | None = None) -> dict[int, int]:
    """The pids below ``root`` in the process tree (from /proc), each with its parent.
    With ``cpu``, also fills it with the CPU-seconds of ``root`` and of each of them,
    their reaped children's included (utime, stime, cutime, cstime)."""
    children: dict[int, list[int]] = {}
    seconds: dict[int, float] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                text = f.read()
        except OSError:
            continue  # gone meanwhile
        fields = text[text.rindex(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(name))
        if cpu is not None:
            seconds[int(name)] = sum(int(x) for x in fields[11:15]) / CLOCK_TICKS
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        kids = children.get(pid, [])
        out.update((kid, pid) for kid in kids)
        todo.extend(kids)
    if cpu is not None:
        cpu.update((pid, seconds.get(pid, 0.0)) for pid in [root, *out])
    return out


def process_title(pid: int) -> str:
    """A process's title (Ray workers set theirs), or '' when it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


class WorkerKiller:
    """SIGKILLs one random Ray Data actor process of ``stages`` every ``every_s`` seconds,
    among the processes below ``root`` (default: this process).

    The first kill comes as soon as an actor is seen running a task (looked for every
    ``retry_s``), or at ``every_s`` whatever the actors do; each later one ``every_s``
    after the one before, and not before the stage of the last victim has as many actors
    up (past ``__init__``) as it had before the kill: on a starved machine a restart can
    take longer than ``every_s``, and killing each new actor as it comes up would stop the
    run, not test it. A kill that finds no target (Ray starting up, actors restarting or
    between passes) is a miss, and is tried again every ``retry_s`` until one is found:
    a short run is never spared by an unlucky tick. ``kills`` lists what it killed,
    ``misses`` when a due kill first found no target (once per due kill), ``waited_s``
    how long kills waited for a victim's stage to come back.

    The period runs on the wall clock, or with ``cpus`` on the pipeline's clock: the
    CPU-seconds of ``root`` and everything below it over ``cpus``, the time a pipeline
    that keeps ``cpus`` cores busy takes. On a machine shared with other work the wall
    clock kills as often per unit of work done as the share the pipeline gets is small;
    the pipeline's clock keeps the kills per unit of work of a machine to itself."""

    def __init__(self, every_s: float, stages=("DecodeCropStage", "ClassifyStage"),
                 seed: int = 0, root: int | None = None, retry_s: float = 1.0,
                 cpus: float | None = None) -> None:
        if every_s <= 0 or retry_s <= 0 or not stages or (cpus is not None and cpus <= 0):
            raise ValueError("every_s, retry_s and cpus must be > 0 and stages not empty")
        self.every_s, self.retry_s, self.stages = every_s, retry_s, tuple(stages)
        self.cpus = cpus
        self._cpu_base = self._cpu_last = 0.0
        self.root = os.getpid() if root is None else root
        self.rng = random.Random(seed)
        self.kills: list[Kill] = []
        self.misses: list[float] = []  # when a due kill first found no target
        self.waited_s = 0.0
        self._back: tuple[str, int] | None = None  # (stage, actors up) before the last kill
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="worker-killer", daemon=True)

    def _scan(self) -> list[tuple[int, str, str]]:
        """(pid, stage, title) of every actor process of ``stages`` below ``root``. A
        process whose parent has a Ray title is an actor's child caught between fork and
        exec (its ffmpeg, still wearing the actor's title): never a target."""
        found = []
        below = descendants(self.root)
        for pid, parent in below.items():
            title = process_title(pid)
            if not title.startswith(RAY_DATA_ACTOR) or (
                    parent in below and process_title(parent).startswith("ray::")):
                continue
            stage = next((s for s in self.stages if f"({s})" in title), None)
            if stage:
                found.append((pid, stage, title))
        return sorted(found)

    def targets(self) -> list[tuple[int, str, bool]]:
        """(pid, stage, busy) of every actor process of ``stages`` below ``root``."""
        return [(pid, stage, title.endswith(".submit")) for pid, stage, title in self._scan()]

    def up(self, stage: str) -> int:
        """How many actors of ``stage`` are up: past ``__init__`` (a restarted actor's
        new process builds its stage first)."""
        return sum(s == stage and not title.endswith(".__init__")
                   for _, s, title in self._scan())

    def kill_one(self, busy_only: bool = False, miss: bool = True) -> Kill | None:
        """Kill a random target (only one running a task with ``busy_only``); None, and
        a miss recorded when ``miss``, when there is none."""
        scanned = self._scan()
        found = [(pid, stage, title.endswith(".submit")) for pid, stage, title in scanned
                 if title.endswith(".submit") or not busy_only]
        at = round(time.monotonic() - self.t0, 1)
        for pid, stage, busy in self.rng.sample(found, len(found)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue  # gone meanwhile: another
            kill = Kill(at, pid, stage, busy)
            self.kills.append(kill)
            self._back = (stage, sum(s == stage and not t.endswith(".__init__")
                                     for _, s, t in scanned))
            return kill
        if miss:
            self.misses.append(at)
        return None

    def _tree_cpu_s(self) -> float:
        """CPU-seconds of root and the processes below it, never decreasing (a child's
        seconds move to its parent's cutime when it is reaped)."""
        cpu: dict[int, float] = {}
        descendants(self.root, cpu)
        self._cpu_last = max(self._cpu_last, sum(cpu.values()))
        return self._cpu_last

    def clock(self) -> float:
        """Seconds since start: wall, or the pipeline's with ``cpus``."""
        if self.cpus is None:
            return time.monotonic() - self.t0
        return (self._tree_cpu_s() - self._cpu_base) / self.cpus

    def _loop(self) -> None:
        due, missed = self.every_s, False
        while not self._stop.wait(self.retry_s):
            now = self.clock()
            early = not self.kills and now < due  # the first kill: a busy actor, if seen
            if now < due and not early:
                continue
            if self._back and self.up(self._back[0]) < self._back[1]:
                self.waited_s += self.retry_s  # the last victim is not back yet
                continue
            if self.kill_one(busy_only=early, miss=not early and not missed):
                due, missed = now + self.every_s, False
            elif not early:
                missed = True

    def start(self) -> WorkerKiller:
        self.t0 = time.monotonic()
        if self.cpus is not None:
            self._cpu_base = self._tree_cpu_s()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def by_stage(self) -> dict[str, int]:
        return dict(Counter(k.stage for k in self.kills))
