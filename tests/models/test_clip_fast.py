"""Cheaper CLIP towers (models/clip_fast.py): each candidate against the float tower on
real aligned face crops, its call contract, batch and thread independence, and int8
kernels that do not saturate on AVX2's code path. Needs the wheel `make setup` fetches."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.nn.functional import cosine_similarity

from deepaudit.models import clip_fast, clip_vit
from deepaudit.models.clip_branch import CLIP_PREPROCESS, probe_inputs

pytestmark = pytest.mark.skipif(not clip_vit.wheel_path().is_file(),
                                reason="the pinned CLIP wheel is not fetched (make setup)")

BLOCKS = (10, 11, 12)
# The bar each candidate is claimed to clear (min over crops of the probe input's
# cosine to float). 0.999 is the bar for shipping without retraining the probe.
BARS = {"int8x2": 0.9999, "int8mix": 0.999, "int8": 0.98, "px192": 0.95, "tome8": 0.95}


@pytest.fixture(scope="module")
def tower():
    return clip_vit.load_tower()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    """Four real aligned face crops (RetinaFace + the audit's aligner), CLIP-normalised."""
    from deepaudit.models.face_detector import RetinaFaceDetector
    from deepaudit.pipeline.crop import align_crop, select_face
    from deepaudit.pipeline.demo_media import face_photos

    det, crops = RetinaFaceDetector(), []
    for photo in face_photos().values():
        faces = det.detect(photo)[0]
        crops.append(align_crop(photo, faces[select_face(faces)], 224))
    crops.append(crops[0][:, ::-1])  # a mirrored face: a fourth crop
    return CLIP_PREPROCESS.normaliser("cpu")(np.stack(crops))


@pytest.fixture(scope="module")
def reference(tower, pixels) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([tower(p, blocks=BLOCKS)[0] for p in pixels.split(1)])


@pytest.mark.parametrize("name", sorted(BARS))
def test_candidate_stays_close_to_float_alone_or_batched_at_any_thread_count(
        name, tower, pixels, reference):
    fast = clip_fast.build(name, tower)
    before = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(2)
            batched, embeds, hidden = fast(pixels, blocks=BLOCKS)
            torch.set_num_threads(1)
            alone = torch.cat([fast(p, blocks=BLOCKS)[0] for p in pixels.split(1)])
    finally:
        torch.set_num_threads(before)
    assert batched.shape == reference.shape and embeds.shape == (len(pixels), 512)
    assert hidden.shape[0] == len(pixels) and hidden.shape[2] == 768
    # One crop at a time inside: a crop's tokens never depend on its batch or threads.
    assert torch.equal(batched, alone)
    idx = tuple(range(1, len(BLOCKS) + 1))
    cos = cosine_similarity(probe_inputs(batched, idx), probe_inputs(reference, idx), dim=-1)
    assert cos.min() >= BARS[name], f"{name}: probe-input cosine {cos.min():.5f}"


def test_int8x2_clears_the_bar_on_every_probe_block(tower, pixels, reference):
    fast = clip_fast.build("int8x2", tower)
    with torch.inference_mode():
        got = fast(pixels, blocks=BLOCKS)[0]
    assert cosine_similarity(got, reference, dim=-1).min() >= 0.9999


def test_the_wrapper_alone_changes_nothing(tower, pixels, reference):
    with torch.inference_mode():
        got = clip_fast.build("float", tower)(pixels, blocks=BLOCKS)[0]
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


def test_smaller_input_and_merging_shorten_the_sequence(tower, pixels):
    with torch.inference_mode():
        assert clip_fast.build("px160", tower)(pixels[:1])[2].shape[1] == 101
        assert clip_fast.build("tome8", tower)(pixels[:1])[2].shape[1] == 197 - 12 * 8


def test_embedder_gives_all_twelve_blocks_crop_by_crop(tower, pixels):
    crops = np.random.default_rng(0).integers(0, 256, size=(3, 224, 224, 3), dtype=np.uint8)
    embed = clip_fast.embedder("int8x2", tower)
    out = embed(crops)
    assert out.shape == (3, 12, 768) and out.dtype == np.float32
    np.testing.assert_array_equal(out[1:2], embed(crops[1:2]))
    assert embed(crops[:0]).shape == (0, 12, 768)


def test_unknown_candidates_and_settings_are_refused(tower):
    with pytest.raises(ValueError, match="choose from"):
        clip_fast.build("int4", tower)
    with pytest.raises(ValueError, match="multiple of 16"):
        clip_fast.FastTower(tower, size=200)
    with pytest.raises(ValueError, match="merge"):
        clip_fast.FastTower(tower, merge=40)


AVX2_CHECK = textwrap.dedent("""
    import torch
    from deepaudit.models.clip_fast import Int8Linear

    # Worst case for AVX2's u8 x s8 pair sums: every weight code +127, every activation
    # but one at the top code.
    lin = torch.nn.Linear(256, 8)
    with torch.no_grad():
        lin.weight.fill_(0.5)
        lin.bias.zero_()
    x = torch.ones(3, 256)
    x[:, 0] = 0.0
    exact = lin(x)
    for passes in (1, 2):
        got = Int8Linear(lin, passes=passes)(x)
        assert torch.allclose(got, exact, rtol=1e-5), (passes, got[0, :2], exact[0, :2])
    # Control: 8-bit activations on the same kernel do saturate (the AVX2 path is real).
    eight = torch.ops.quantized.linear_dynamic(x, Int8Linear(lin)._packed, False)
    assert float(eight[0, 0]) < 0.9 * float(exact[0, 0]), (eight[0, 0], exact[0, 0])
    # Typical layers: int8-exact weights, heavy-tailed activations.
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(768, 512)
    with torch.no_grad():
        lin.weight.copy_(torch.randint(-127, 128, (512, 768), generator=g) / 2000.0)
    x = torch.randn(50, 768, generator=g) * torch.rand(768, generator=g).pow(4) * 20
    exact = lin(x)
    for passes, bound in ((1, 0.05), (2, 1e-3)):
        err = float((Int8Linear(lin, passes=passes)(x) - exact).norm() / exact.norm())
        assert err < bound, (passes, err)
    print("ok")
""")


def test_int8_does_not_saturate_on_the_avx2_kernel():
    """fbgemm's AVX2 kernel (forced by FBGEMM_ENABLE_INSTRUCTIONS even on a CPU with
    VNNI) sums u8 x s8 pairs in 16 bits; 7-bit activations keep every sum in range."""
    env = {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", AVX2_CHECK], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout + done.stderr
