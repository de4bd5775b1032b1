"""Issue 24: what a new user hits in the first hour, each case as the user typed it, with
the exact message and exit status expected."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from deepaudit.jobs.cli import app

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})


def one_line(result, code: int, *words: str) -> str:
    """The command printed one line (no traceback), exited ``code``, and said ``words``."""
    out = result.output
    assert result.exit_code == code, out
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out
    for w in words:
        assert w in lines[0], out
    return lines[0]


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """No AWS credentials anywhere botocore looks (environment, files, instance metadata)."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def wrong_credentials(monkeypatch):
    """The test server checks every request's signature: the test key is unknown to it."""
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)


def _s3_commands(endpoint: str, bucket: str = "audit") -> list[list[str]]:
    e = ["--s3-endpoint", endpoint]
    return [
        ["audit", f"s3://{bucket}/archive/", "-o", "out-unused", *e],
        ["audit", f"s3://{bucket}/m.csv", "-o", "out-unused", *e],
        ["manifest", f"s3://{bucket}/archive/", "-o", "m.parquet", *e],
        ["query", f"s3://{bucket}/out", "SELECT 1", *e],
    ]


@pytest.mark.s3
def test_s3_input_without_credentials(s3_server, no_credentials, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in _s3_commands(s3_server):
        r = runner.invoke(app, argv)
        one_line(r, 2, argv[1], "no S3 credentials were found",
                 "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.s3
def test_s3_input_with_wrong_credentials(s3_server, wrong_credentials, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in _s3_commands(s3_server):
        r = runner.invoke(app, argv)
        one_line(r, 2, argv[1], "access denied", "check that the credentials")


@pytest.mark.s3
def test_s3_input_in_a_missing_bucket(s3_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in _s3_commands(s3_server, bucket="no-such-bucket"):
        r = runner.invoke(app, argv)
        one_line(r, 2, argv[1], "the bucket 'no-such-bucket' does not exist",
                 "check the bucket name")


def test_s3_input_with_an_unreachable_endpoint(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["audit", "s3://audit/m.csv", "-o", "out", "--s3-endpoint", endpoint])
    one_line(r, 2, "s3://audit/m.csv", "cannot be reached", "check --s3-endpoint")


def test_device_cuda_without_a_gpu_is_a_usage_error(tiny_model, media, tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.csv").write_text(f"uri\n{media['face_image']}\n")
    r = runner.invoke(app, ["audit", "m.csv", "-o", "out", "--device", "cuda",
                            "--model", str(tiny_model)])
    one_line(r, 2, "--device cuda: torch sees no CUDA device", "--device cpu")
    r = runner.invoke(app, ["check", str(media["face_image"]), "--device", "cuda",
                            "--model", str(tiny_model)])
    one_line(r, 2, "--device cuda: torch sees no CUDA device", "--device cpu")
    assert list(tmp_path.iterdir()) == [tmp_path / "m.csv"]  # no work, no files


@pytest.mark.ray
def test_a_run_error_is_plain_text_naming_the_root_cause(ray_local):
    from deepaudit.jobs.audit import root_cause

    @ray_local.remote
    def broken():
        raise RuntimeError("device=cuda was asked for but torch sees no CUDA device")

    with pytest.raises(Exception) as info:
        ray_local.get(broken.remote())
    text = root_cause(info.value)
    assert text == "RuntimeError: device=cuda was asked for but torch sees no CUDA device"
    assert "\x1b" not in text and "\n" not in text


def test_check_writes_no_files_unless_asked(tiny_model, media, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["check", str(media["face_image"]), "--model", str(tiny_model),
                            "--threshold", "0.01"])
    assert r.exit_code == 1 and "FAKE" in r.output, r.output
    assert list(tmp_path.iterdir()) == []  # no ./deepaudit-evidence/
