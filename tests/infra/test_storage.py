"""One S3 client per process, config and AWS environment (infra/storage.py)."""

from __future__ import annotations

from deepaudit.infra.storage import StorageConfig, filesystem_for, s3_filesystem


def test_one_client_per_config_and_environment(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    cfg = StorageConfig(endpoint_url="http://127.0.0.1:9")
    fs = s3_filesystem(cfg)
    assert s3_filesystem(StorageConfig(endpoint_url="http://127.0.0.1:9")) is fs
    assert filesystem_for("s3://bucket/key.jpg", cfg)[0] is fs
    assert s3_filesystem(StorageConfig(endpoint_url="http://127.0.0.1:10")) is not fs
    assert s3_filesystem(StorageConfig(endpoint_url="http://127.0.0.1:9",
                                       max_attempts=2)) is not fs
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "c")  # new credentials: a new client
    fresh = s3_filesystem(cfg)
    assert fresh is not fs
    assert s3_filesystem(cfg) is fresh


def test_the_client_cache_is_bounded(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    first = s3_filesystem(StorageConfig(endpoint_url="http://127.0.0.1:1"))
    for port in range(2, 12):
        s3_filesystem(StorageConfig(endpoint_url=f"http://127.0.0.1:{port}"))
    assert s3_filesystem(StorageConfig(endpoint_url="http://127.0.0.1:1")) is not first
