"""Output locations a user can get wrong: one clear line and exit 2, before any work,
never a traceback. Real CLI (typer's runner), real filesystem, real moto S3 server."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler

import pytest
from typer.testing import CliRunner

from deepaudit.infra.storage import OutputError, StorageConfig, check_writable
from deepaudit.jobs.cli import app

runner = CliRunner()
READ_ONLY = "/sys/fs/deepaudit-x"  # sysfs: not even root may create files there


@pytest.fixture
def small(tmp_path):
    """A file where a folder is expected, and a manifest to audit."""
    f = tmp_path / "small.csv"
    f.write_text("uri,label\n/nowhere.mp4,fake\n")
    return f


def _one_clear_line(result, code: int = 2, *words: str) -> None:
    out = result.output
    assert result.exit_code == code, out
    assert "Traceback" not in out and not isinstance(result.exception, (OSError, TypeError)), out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out
    for w in words:
        assert w in lines[0], out


def test_audit_output_under_a_file_or_read_only(small, tiny_model, tmp_path):
    r = runner.invoke(app, ["audit", str(small), "-o", f"{small}/out", "--model", str(tiny_model)])
    _one_clear_line(r, 2, "is a file, not a folder")
    r = runner.invoke(app, ["audit", str(small), "-o", READ_ONLY, "--model", str(tiny_model)])
    _one_clear_line(r, 2, "cannot be written", "choose a folder")
    r = runner.invoke(app, ["audit", str(small), "-o", str(tmp_path / "o"), "--ledger",
                            f"{small}/ledger", "--model", str(tiny_model)])
    _one_clear_line(r, 2, "--ledger")
    assert not (tmp_path / "o" / "runs").exists()  # nothing started


def test_report_evaluate_check_query_train_paths(small, tmp_path):
    r = runner.invoke(app, ["report", str(tmp_path), "-o", "/sys/fs/r.html"])
    _one_clear_line(r, 2, "cannot be written")
    r = runner.invoke(app, ["report", str(tmp_path), "-o", f"{small}/r.html"])
    _one_clear_line(r, 2, "is a file")
    for out in (f"{small}/out", READ_ONLY):
        r = runner.invoke(app, ["evaluate", str(small), "-o", out])
        _one_clear_line(r, 2, "--output")
        r = runner.invoke(app, ["train", str(small), "--output", out])
        # train's own printer wraps at the terminal width (jobs/train.py is not ours)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert "--output" in r.output and "error:" in r.output, r.output
    r = runner.invoke(app, ["check", str(small), "--evidence-dir", READ_ONLY])
    _one_clear_line(r, 2, "--evidence-dir")
    assert not (tmp_path / "deepaudit-evidence").exists()
    for target in (f"{small}/out", READ_ONLY, str(small)):
        r = runner.invoke(app, ["query", target, "SELECT 1"])
        _one_clear_line(r, 2)


def test_check_writable_creates_only_when_asked(tmp_path):
    check_writable(str(tmp_path / "a" / "b"), what="--output")  # probes tmp_path itself
    assert not (tmp_path / "a").exists() and list(tmp_path.iterdir()) == []
    check_writable(str(tmp_path / "a" / "b"), create=True)
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []
    with pytest.raises(OutputError, match="is a folder"):
        check_writable(str(tmp_path), is_file=True)


class _DenyWrites(BaseHTTPRequestHandler):
    """An S3 endpoint whose credentials may read but not write: AccessDenied on PUT."""

    body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
            b"<Message>Access Denied</Message></Error>")

    def log_message(self, *args) -> None:
        pass

    def _deny(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.body)

    do_PUT = do_POST = do_GET = do_HEAD = do_DELETE = _deny


@pytest.mark.s3
def test_s3_outputs_the_credentials_cannot_write(s3_server, small, tiny_model):
    from http.server import ThreadingHTTPServer

    with pytest.raises(OutputError, match="check the bucket name"):
        check_writable("s3://no-such-bucket/out", StorageConfig(endpoint_url=s3_server))
    check_writable("s3://audit/writable", StorageConfig(endpoint_url=s3_server))
    r = runner.invoke(app, ["audit", str(small), "-o", "s3://no-such-bucket/out", "--s3-endpoint",
                            s3_server, "--model", str(tiny_model)])
    _one_clear_line(r, 2, "s3://no-such-bucket/out")

    server = ThreadingHTTPServer(("127.0.0.1", 0), _DenyWrites)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(OutputError, match="credentials"):
            check_writable("s3://audit/out", StorageConfig(endpoint_url=endpoint, max_attempts=1))
        r = runner.invoke(app, ["evaluate", str(small), "-o", "s3://audit/out", "--s3-endpoint",
                                endpoint])
        _one_clear_line(r, 2, "PermissionError")
    finally:
        server.shutdown()
