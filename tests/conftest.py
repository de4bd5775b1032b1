"""Shared fixtures: a local 2-CPU Ray, a moto S3 server on 127.0.0.1, a tiny model
checkpoint, generated media (good and bad), and ../shared/data when it exists."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Fake credentials for the moto server, set before any Ray worker is started so that
# actors inherit them. They are never real keys.
TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "deepaudit-test-key",
    "AWS_SECRET_ACCESS_KEY": "deepaudit-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def pytest_configure(config: pytest.Config) -> None:
    for key, value in TEST_ENV.items():
        os.environ[key] = value
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(key, None)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or $DEEPAUDIT_SHARED_DATA); skips the test when absent."""
    root = Path(os.environ.get("DEEPAUDIT_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not (root / "MANIFEST.tsv").is_file():
        pytest.skip(f"shared media not found at {root}")
    return root


@pytest.fixture(autouse=True)
def ray_data_context_reset():
    """``configure_ray_data`` changes Ray Data's process-wide DataContext; put Ray's defaults
    back after each test, so no test depends on what an earlier one ran."""
    yield
    import sys

    if "ray.data" in sys.modules:
        import ray.data

        from deepaudit.infra.ray_runtime import DATA_CONTEXT_SETTINGS

        defaults, ctx = ray.data.DataContext(), ray.data.DataContext.get_current()
        for name in DATA_CONTEXT_SETTINGS:
            setattr(ctx, name, getattr(defaults, name))


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs on loopback, shared by the session, shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            object_store_memory=1_000_000_000,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-speaking server (moto) on 127.0.0.1 with an empty bucket ``audit``."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="audit")
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def s3fs_client(s3_server):
    from deepaudit.infra.storage import StorageConfig, s3_filesystem

    return s3_filesystem(StorageConfig(endpoint_url=s3_server))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny ResNeXt-LSTM checkpoint (random weights, marked trained so verdicts are
    emitted): exercises the real checkpoint path at CI speed."""
    import torch

    from deepaudit.models.checkpoint import save_checkpoint
    from deepaudit.models.registry import create_model

    torch.manual_seed(1234)
    model = create_model("resnext_lstm_tiny")
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_checkpoint(model, path, name="resnext_lstm_tiny", trained=True,
                    notes="test fixture: random weights")
    return path



@pytest.fixture
def tiny_card(tiny_model, tmp_path) -> Path:
    """A private copy of the tiny checkpoint's card and weights, for tests that write into
    the card (evaluate --calibrate / --record-out-of-domain)."""
    import shutil

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(tiny_model.with_suffix(suffix), model_dir / f"tiny{suffix}")
    return model_dir / "tiny.json"

def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True)


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict[str, Path]:
    """Generated media: good items and every kind of bad input the audit must survive."""
    import cv2

    from deepaudit.pipeline.demo_media import face_photos, make_test_clip, no_face_photos

    d = tmp_path_factory.mktemp("media")
    m: dict[str, Path] = {}
    m["face_video"] = make_test_clip(d / "face.mp4", seconds=2.0, face="astronaut")
    m["face_video_2"] = make_test_clip(d / "face2.mp4", seconds=2.0, face="grace_hopper")
    photo = face_photos()["grace_hopper"]
    m["face_image"] = d / "face.jpg"
    cv2.imwrite(str(m["face_image"]), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    m["face_png"] = d / "face.png"
    cv2.imwrite(str(m["face_png"]), cv2.cvtColor(face_photos()["astronaut"], cv2.COLOR_RGB2BGR))
    m["no_face_image"] = d / "cat.jpg"
    chelsea = cv2.cvtColor(no_face_photos()["chelsea"], cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(m["no_face_image"]), chelsea)
    # An odd but decodable codec/container: FFV1 in Matroska.
    m["odd_codec"] = d / "ffv1.mkv"
    _ffmpeg("-i", str(m["face_video"]), "-c:v", "ffv1", "-t", "1", str(m["odd_codec"]))

    good = m["face_video"].read_bytes()
    m["truncated"] = d / "truncated.mp4"  # moov at the end is cut off
    m["truncated"].write_bytes(good[: len(good) // 3])
    m["corrupt"] = d / "corrupt.mp4"  # header smashed
    m["corrupt"].write_bytes(b"\x00garbage" * 64 + good[512:])
    m["zero_byte"] = d / "empty.mp4"
    m["zero_byte"].write_bytes(b"")
    m["not_media"] = d / "notes.mp4"
    m["not_media"].write_text("this is a text file, not a video\n" * 20)
    m["missing"] = d / "does-not-exist.mp4"
    m["audio_only"] = d / "tone.m4a"
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac",
            str(m["audio_only"]))
    m["huge"] = d / "huge.jpg"  # 96 MP: over the 80 MP decode limit
    _ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=12000x8000", "-frames:v", "1", "-q:v", "31",
             str(m["huge"]))
    return m


# Expected outcome per generated item: (status, error code prefix or None).
EXPECTED = {
    "face_video": ("ok", None),
    "face_video_2": ("ok", None),
    "face_image": ("ok", None),
    "face_png": ("ok", None),
    "odd_codec": ("ok", None),
    "no_face_image": ("no_face", "no_face"),
    "truncated": ("error", "not_media"),
    "corrupt": ("error", "not_media"),
    "zero_byte": ("error", "empty"),
    "not_media": ("error", "not_media"),
    "missing": ("error", "missing"),
    "audio_only": ("error", "no_video_stream"),
    "huge": ("error", "too_large"),
}
