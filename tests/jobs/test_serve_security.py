"""``deepaudit serve`` under attack (issue 27): each attack through a real server on
127.0.0.1, uvicorn configured as the command configures it (``server_config``), or the
command itself in a subprocess where the attack could wedge or kill the process: the
request, then the status expected."""

from __future__ import annotations

import base64
import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from typer.testing import CliRunner

from deepaudit.infra.storage import StorageConfig
from deepaudit.jobs.cli import app as cli
from deepaudit.pipeline.evidence import evidence_dirname, safe_filename
from deepaudit.serve.app import create_app
from deepaudit.serve.data import open_archive
from deepaudit.serve.server import PID_FILE, UPLOAD_PREFIX, sweep_upload_roots
from tests.jobs.serve_helpers import T0, running, verdict_rows, write_run

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
TOKEN = "test-token-0123456789"
FORMULAS = ["=cmd|' /C calc'!A0", "+SUM(1+1)", "@SUM(1)", "-2+3", "\tx", "\rx"]
SECURITY_HEADERS = ("content-security-policy", "x-content-type-options", "x-frame-options",
                    "cache-control")


def _get(url, **kw):
    return requests.get(url, timeout=30, **kw)


def _write_outputs(out: Path) -> None:
    r1 = verdict_rows("run-1", 40, seed=1)
    for i, text in enumerate(FORMULAS):  # file names and manifests reach the export
        r1[10 + i].update(media_id=f"{text}-{i}", uri=f"/archive/{text}.mp4", label=text)
    r1[7].update(status="error", verdict=None, p_fake=None, error="=HYPERLINK(\"x\"): bad")
    r1[8].update(uri="s3://someone-elses-bucket/clip.mp4")  # a bucket the output never names
    r1[9].update(media_type="image", uri="/archive/photos/a/very/long/folder/name/holding/"
                 "images/fake/generated_face_000123_variant.png")
    ev = out / "evidence" / evidence_dirname(r1[0]["media_id"]) / (safe_filename("run-1") + ".png")
    ev.parent.mkdir(parents=True, exist_ok=True)
    ev.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    r1[0]["evidence"] = str(ev)
    write_run(out, "run-1", r1)
    write_run(out, "run-2", verdict_rows("run-2", 20, seed=2, t0=T0.replace(day=2)),
              t0=T0.replace(day=2))
    write_run(out, "run-3", verdict_rows("run-3", 20, seed=3, t0=T0.replace(day=3)),
              t0=T0.replace(day=3))
    (out / "runs" / "run-3" / "_summary.json").unlink()  # interrupted: no summary


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve-attack") / "out"
    _write_outputs(out)
    return out


@pytest.fixture(scope="module")
def server(out):
    with running(create_app(open_archive(str(out)))) as url:
        yield url


def _stub_checker():
    """Enough of a Checker for the upload form; a non-media upload never reaches it."""
    handle = SimpleNamespace(model_id="stub@0", quality={"ood_auc": None, "caveat": None},
                             config=SimpleNamespace(threshold=0.5))
    return SimpleNamespace(handle=handle, check=None)


def _upload(url: str, session: requests.Session, headers: dict | None = None):
    """The upload form posted as a browser posts it (the page's Origin, unless given)."""
    form = session.get(f"{url}/check", timeout=30)
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)[1]
    return session.post(f"{url}/check", data={"csrf": csrf},
                        headers={"Origin": url, **(headers or {})},
                        files={"file": ("x.jpg", b"not an image at all" * 4)}, timeout=30)


# ---------------------------------------------------------------------- 1. the hang

def _cli_server(args: list[str], tmp: Path):
    """``deepaudit serve ARGS --port 0`` in a subprocess (TMPDIR=tmp): (process, url)."""
    exe = Path(sys.executable).parent / "deepaudit"
    env = {**os.environ, "TMPDIR": str(tmp), "NO_COLOR": "1", "COLUMNS": "300"}
    proc = subprocess.Popen([str(exe), "serve", *args, "--port", "0", "--no-check"],
                            stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    for line in proc.stderr:  # until the line with the link (or the end)
        seen.append(line)
        if found := re.search(r"serving on (http://\S+?:\d+)", line):
            break
    else:
        proc.wait(timeout=10)
        raise AssertionError("serve did not start: " + "".join(seen)[-2000:])
    # Keep reading its stderr, so that a full pipe never blocks the server.
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc, found[1].replace("localhost", "127.0.0.1")


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise AssertionError("serve did not stop on SIGTERM") from None


@pytest.mark.parametrize("change", ["delete the output", "rewrite a run"])
def test_a_run_removed_under_the_server_is_410_and_the_server_lives(tmp_path, change):
    """Issue 27 item 1: the output deleted (or a run rewritten) under a running server, then
    its item page: an answer within seconds (410, saying so), and /healthz still answers.
    In a subprocess: before the fix this wedged the whole process (/healthz timed out and
    SIGTERM did not stop it; _stop fails then)."""
    out = tmp_path / "out"
    _write_outputs(out)
    proc, url = _cli_server([str(out)], tmp_path)
    try:
        assert _get(f"{url}/runs/run-1/items/3").status_code == 200
        if change == "delete the output":
            shutil.rmtree(out)
        else:  # a nightly audit writes the run again
            write_run(out, "run-1", verdict_rows("run-1", 12, seed=9))
        # Three item pages at once, not opened before (their list columns are read from
        # the run's file): with the old code these wedged the process (3 of 3 tries).
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda row: requests.get(
                f"{url}/runs/run-1/items/{row}", timeout=10), (4, 5, 6)))
        for r in replies:
            assert r.status_code == 410, (r.status_code, r.text[:300])
            assert "removed or rewritten after this server started" in r.text
            assert "restart deepaudit serve" in r.text
        health = requests.get(f"{url}/healthz", timeout=5)
        assert health.status_code == 200 and health.json()["ok"]
        # The snapshot still answers: the lists, and the run's page.
        assert requests.get(f"{url}/items", timeout=10).status_code == 200
        assert requests.get(f"{url}/runs/run-2", timeout=10).status_code == 200
    finally:
        _stop(proc)


# ---------------------------------------------------------------------- 2. DNS rebinding

def test_dns_rebinding_hosts_and_origins_are_refused(out):
    app = create_app(open_archive(str(out)), checker=_stub_checker(), uploads_per_minute=50)
    with running(app) as url:
        port = url.rsplit(":", 1)[1]
        evil = {"Host": f"attacker.example:{port}"}
        for path in ("/items.csv", "/runs/run-1/items/0/evidence.png",
                     "/runs/run-1/items/0/faces.jpg", "/runs", "/healthz"):
            r = _get(f"{url}{path}", headers=evil)
            assert r.status_code == 400, (path, r.status_code)
            assert "answers only to" in r.text and "run-1" not in r.text
            assert r.headers["content-security-policy"].startswith("default-src 'none'")
        for host in (f"127.0.0.1:{int(port) + 1}", "127.0.0.1", f"localhost.evil:{port}",
                     f"127.0.0.1:{port}@evil", ""):
            assert _get(f"{url}/items.csv", headers={"Host": host}).status_code == 400, host
        for host in (f"localhost:{port}", f"LOCALHOST.:{port}", f"[::1]:{port}",
                     f"127.0.0.1:{port}"):
            assert _get(f"{url}/items.csv", headers={"Host": host}).status_code == 200, host
        with requests.Session() as s:
            # The attacker's page posts under its own name: Host and Origin agree, both evil.
            r = s.post(f"{url}/check", headers={**evil, "Origin": f"http://{evil['Host']}"},
                       files={"file": ("x.jpg", b"\xff\xd8\xff" + b"\0" * 64)}, timeout=30)
            assert r.status_code == 400
            # A right Host with a foreign Origin is a cross-site post: 403.
            r = _upload(url, s, headers={"Origin": f"http://attacker.example:{port}"})
            assert r.status_code == 403 and "another site" in r.text
            r = _upload(url, s, headers={"Origin": f"http://localhost:{port}"})
            assert r.status_code == 415  # past the checks: refused for its content only
    # Behind a proxy: --allowed-host names it.
    app = create_app(open_archive(str(out)), checker=_stub_checker(),
                     allowed_hosts=["audit.example.org"])
    with running(app) as url, requests.Session() as s:
        proxied = {"Host": "audit.example.org"}
        assert _get(f"{url}/items.csv", headers=proxied).status_code == 200
        assert _get(f"{url}/items.csv", headers={"Host": "other.example.org"}).status_code == 400
        r = _upload(url, s, headers={"Origin": "https://audit.example.org"})
        assert r.status_code == 415
    result = runner.invoke(cli, ["serve", str(out), "--allowed-host", "a/b"])
    assert result.exit_code == 2 and "not a host name" in result.output


# ---------------------------------------------------------------------- 3. CSV formulas

def test_csv_export_neutralises_formulas(server):
    r = _get(f"{server}/items.csv", params={"run": "run-1", "sort": "manifest_row",
                                            "order": "asc"})
    assert r.status_code == 200
    rows = list(csv.DictReader(io.StringIO(r.text, newline="")))
    by_row = {int(x["manifest_row"]): x for x in rows}
    for i, text in enumerate(FORMULAS):
        row = by_row[10 + i]
        assert row["media_id"] == f"'{text}-{i}", row["media_id"]
        assert row["label"] == f"'{text}"
    assert by_row[7]["error"].startswith("'=HYPERLINK")
    assert by_row[1]["media_id"] == "cam1/clip-00001.mp4"  # ordinary cells untouched
    assert by_row[1]["p_fake"] == "" or float(by_row[1]["p_fake"]) >= 0  # numbers stay numbers
    for row in rows:  # no cell a spreadsheet would run
        for v in row.values():
            assert not v or v[0] not in "=+@\t\r" and not (v[0] == "-" and not
                                                            re.fullmatch(r"-[\d.e-]+", v))
    # The Parquet export stays exact.
    exact = pq.read_table(pa.BufferReader(_get(f"{server}/items.parquet",
                                               params={"run": "run-1"}).content))
    assert set(FORMULAS) <= set(exact["label"].to_pylist())


# ---------------------------------------------------------------------- 4. X-Forwarded-For

@pytest.mark.parametrize("proxy", [None, "127.0.0.1"])
def test_forwarded_for_is_trusted_only_from_a_named_proxy(out, proxy):
    app = create_app(open_archive(str(out)), checker=_stub_checker(), uploads_per_minute=3)
    with running(app, forwarded_allow_ips=proxy) as url, requests.Session() as s:
        codes = [_upload(url, s, headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code
                 for i in range(5)]
    if proxy is None:  # the default: one client (127.0.0.1), 3 a minute
        assert codes == [415, 415, 415, 429, 429]
    else:  # --forwarded-allow-ips 127.0.0.1: the proxy's word is taken, 5 clients
        assert codes == [415] * 5


# ---------------------------------------------------------------------- 5. 500s

def test_crafted_requests_are_400_or_404_not_500(server, out):
    def cursor(raw: str) -> str:
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    for after in ("[" * 1400, '["p_fake","desc",false,' + "9" * 400 + ",1]",
                  '["p_fake","desc",false,1e999,1]', '["p_fake","desc",false,-' + "9" * 400 +
                  ",1]"):
        for path in ("/items", "/items.csv"):
            r = _get(f"{server}{path}", params={"after": cursor(after)})
            assert r.status_code == 400 and "cursor" in r.text, (after[:30], r.status_code)
    r = _get(f"{server}/items", params={"after": "W" * 1900})  # "[[[..." already encoded
    assert r.status_code == 400
    # A run folder without _summary.json.
    for path in ("/runs", "/runs/run-3", "/runs/run-3/histogram.png", "/runs/run-3/roc.png",
                 "/runs/run-3/items/2", "/items?run=run-3"):
        r = _get(f"{server}{path}")
        assert r.status_code == 200, (path, r.status_code, r.text[:300])
    assert 'id="no-summary"' in _get(f"{server}/runs/run-3").text


def test_media_in_a_bucket_the_output_does_not_name_is_never_fetched(out):
    """A row's s3:// URI in a bucket the output does not name: the server never connects
    to S3 for it (a listener stands in for the endpoint), and the page says 'not
    reachable' instead of a 500."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
    archive = open_archive(str(out), StorageConfig(endpoint_url=endpoint))
    try:
        with running(create_app(archive)) as url:
            page = _get(f"{url}/runs/run-1/items/8")
            assert page.status_code == 200 and "not reachable" in page.text
            assert _get(f"{url}/runs/run-1/items/8/faces.jpg").status_code == 404
        with pytest.raises(socket.timeout):
            listener.accept()  # nobody came
    finally:
        listener.close()


# ---------------------------------------------------------------------- 6. tokens

def test_token_rules_redirects_and_headers_on_the_servers_own_replies(out):
    for bad in (" " * 12, " " * 20, "short-token-123", "tab\tseparated-token-123",
                "ünïcödé-token-123456"):
        with pytest.raises(ValueError):
            create_app(open_archive(str(out)), token=bad)
        result = runner.invoke(cli, ["serve", str(out), "--token", bad])
        assert result.exit_code == 2 and "--token must" in result.output, bad
    app = create_app(open_archive(str(out)), token=TOKEN, max_upload_mb=1)
    with running(app) as url:
        for path in ("//evil.example/x", "/\\evil.example/x", "///evil.example/x"):
            r = _get(f"{url}{path}?token={TOKEN}&a=1", allow_redirects=False)
            assert r.status_code == 303, path
            where = r.headers["location"]
            assert where.startswith("/") and not where.startswith(("//", "/\\")), where
            assert "token" not in where and where.endswith("?a=1")
        replies = {
            401: _get(f"{url}/runs"),
            303: _get(f"{url}/runs?token={TOKEN}", allow_redirects=False),
            413: requests.post(f"{url}/check", data=b"x" * (2 * 2**20), timeout=30,
                               headers={"Authorization": f"Bearer {TOKEN}"}),
            400: _get(f"{url}/runs", headers={"Host": "evil.example"}),
        }
        for status, r in replies.items():
            assert r.status_code == status
            for h in SECURITY_HEADERS:
                assert h in r.headers, (status, h)
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
            assert r.headers["cache-control"] == "no-store"


# ---------------------------------------------------------------------- 7. slow clients

def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (reading what it sends)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except (socket.timeout, TimeoutError):
        return False
    except ConnectionResetError:
        return True


def test_slow_clients_are_timed_out_and_connections_capped(out):
    app = create_app(open_archive(str(out)), checker=_stub_checker(), body_idle_s=1.0)
    with running(app, header_timeout_s=3, keep_alive_s=1, max_connections=10) as url:
        host, port = url.split("//")[1].split(":")
        port = int(port)
        slow = []
        for _ in range(6):  # slow headers: a request line, one header, then nothing
            s = socket.create_connection((host, port), timeout=5)
            s.sendall(f"GET /runs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-a: ".encode())
            slow.append(s)
        # A slow body: the headers of an upload, 100 bytes of 5,000, then nothing.
        body = socket.create_connection((host, port), timeout=5)
        body.sendall(f"POST /check HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: {url}\r\n"
                     "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 5000"
                     "\r\n\r\n"
                     .encode() + b"--b\r\n" + b"x" * 94)
        # A body that never ends on a route that does not read it: answered, then closed.
        unread = socket.create_connection((host, port), timeout=5)
        unread.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                       "Content-Length: 1000\r\n\r\n0123456789".encode())
        # Idle after one answered request: the keep-alive timeout.
        idle = socket.create_connection((host, port), timeout=5)
        idle.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        assert _get(f"{url}/healthz").status_code == 200  # still answering meanwhile
        # Over the connection limit: 503 at once, closed.
        extra = [socket.create_connection((host, port), timeout=5) for _ in range(8)]
        time.sleep(0.3)
        refused = 0
        for s in extra:
            s.settimeout(1)
            try:
                refused += s.recv(200).startswith(b"HTTP/1.1 503")
            except (socket.timeout, TimeoutError, ConnectionResetError):
                pass
        assert refused >= 3  # 6 slow + 1 body (+ unread and idle, soon closed) + 8 > 10
        for s in extra:
            s.close()
        t0 = time.monotonic()
        answer = b""
        body.settimeout(8)
        while b"\r\n\r\n" not in answer:
            chunk = body.recv(4096)
            if not chunk:
                break
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert all(_closed_within(s, 8) for s in slow)
        assert _closed_within(idle, 8) and _closed_within(unread, 8)
        assert time.monotonic() - t0 < 10
        for s in (*slow, body, idle, unread):
            s.close()
        assert _get(f"{url}/healthz").status_code == 200


# ---------------------------------------------------------------------- 8. leftovers

def test_sigterm_removes_the_upload_folder_and_start_sweeps_stale_ones(tmp_path, out):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = tmp / f"{UPLOAD_PREFIX}stale", tmp / f"{UPLOAD_PREFIX}live"
    for folder, pid in ((stale, dead.pid), (live, os.getpid())):
        (folder / "upload-x").mkdir(parents=True)
        (folder / PID_FILE).write_text(str(pid))
    proc, url = _cli_server([str(out)], tmp)
    try:
        assert _get(f"{url}/healthz").status_code == 200
        mine = [p for p in tmp.iterdir() if p.name.startswith(UPLOAD_PREFIX) and p != live]
        assert len(mine) == 1 and (mine[0] / PID_FILE).read_text() == str(proc.pid)
        assert not stale.exists() and live.exists()  # swept at start; a live one is kept
    finally:
        code = _stop(proc, signal.SIGTERM)
    assert code in (0, 128 + signal.SIGTERM), code
    assert sorted(p.name for p in tmp.iterdir()) == [live.name]
    assert sweep_upload_roots(str(tmp)) == []  # the live one (this process) stays
