"""The learnt localisation head (models/mask_head.py): IoU, shapes, fitting, round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepaudit.models import clip_vit
from deepaudit.models.mask_head import (
    GRID,
    MaskHead,
    downsample,
    fit_mask_head,
    iou,
    localise,
    patch_tokens,
    region_target,
)


def test_iou_on_known_masks():
    a = np.zeros((4, 4))
    a[:2, :2] = 0.9  # 4 pixels
    b = np.zeros((4, 4))
    b[:2, :] = 1.0  # 8 pixels, 4 shared
    assert iou(a, b) == pytest.approx(0.5)
    assert iou(b, b) == pytest.approx(1.0)
    assert iou(a, 1 - b) == pytest.approx(0.0)
    empty = np.zeros((4, 4))
    assert iou(empty, empty) == pytest.approx(1.0)  # two empty masks agree
    assert iou(a, empty) == pytest.approx(0.0)
    # The threshold applies to the prediction; the target is binarised at 0.5.
    assert iou(a * 0.5, b, threshold=0.4) == pytest.approx(0.5)
    assert iou(a, b * 0.4) == pytest.approx(0.0)
    batch = iou(np.stack([a, b]), np.stack([b, b]))
    assert batch.shape == (2,) and batch == pytest.approx([0.5, 1.0])


def test_region_target_and_downsample():
    m = np.zeros((28, 28), np.float32)
    m[:14, :14] = 0.25  # a weak blend still marks its region
    assert region_target(m).max() == 1.0
    assert region_target(np.zeros((3, 3))).sum() == 0
    d = downsample(region_target(m)[None], GRID)
    assert d.shape == (1, GRID, GRID) and d[0, :7, :7].min() == 1.0 and d[0, 7:].max() == 0


def test_forward_shapes_and_round_trip():
    head = MaskHead(block=6, hidden=8)
    tokens = torch.randn(3, GRID * GRID, 768)
    assert head(tokens).shape == (3, GRID, GRID)
    with torch.no_grad():
        p = head.probabilities(tokens, 224)
    assert p.shape == (3, 224, 224) and 0 <= float(p.min()) and float(p.max()) <= 1
    back = MaskHead.from_state_dict(head.state_dict())
    assert (back.block, back.hidden) == (6, 8)
    torch.testing.assert_close(back(tokens), head(tokens))
    prefixed = {f"mask_head.{k}": v for k, v in head.state_dict().items()}
    assert MaskHead.from_state_dict(prefixed, prefix="mask_head.").block == 6
    with pytest.raises(ValueError):
        MaskHead(block=13)


def _synthetic(n: int, seed: int):
    """Tokens carrying a fixed direction inside a random rectangle (the target)."""
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(99).normal(size=768).astype(np.float32)
    tokens = rng.normal(size=(n, GRID, GRID, 768)).astype(np.float32)
    masks = np.zeros((n, GRID, GRID), np.float32)
    for i in range(n):
        if i % 4 == 0:
            continue  # some reals: empty targets
        y, x = rng.integers(0, 8, 2)
        h, w = rng.integers(3, 7, 2)
        masks[i, y:y + h, x:x + w] = 1
    tokens += 0.5 * masks[..., None] * direction
    return tokens.reshape(n, GRID * GRID, 768).astype(np.float16), masks


def test_fit_learns_a_token_to_mask_mapping():
    x, y = _synthetic(160, 0)
    xt, yt = _synthetic(40, 1)
    head = fit_mask_head(x, y, block=4, hidden=16, epochs=8, seed=0)
    assert head.block == 4 and not head.training
    with torch.no_grad():
        trained = iou(torch.sigmoid(head(torch.from_numpy(xt).float())).numpy(), yt).mean()
        untrained = iou(torch.sigmoid(MaskHead(4, 16)(torch.from_numpy(xt).float())).numpy(),
                        yt).mean()
    assert trained > 0.8 and trained > untrained + 0.4
    again = fit_mask_head(x, y, block=4, hidden=16, epochs=8, seed=0)  # deterministic
    for a, b in zip(head.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not clip_vit.wheel_path().is_file(),
                    reason="the pinned CLIP wheel is not fetched (make setup)")
def test_localise_runs_the_tower_to_the_heads_block():
    from deepaudit.models.clip_branch import CLIP_PREPROCESS

    tower = clip_vit.load_tower()
    head = MaskHead(block=2, hidden=8)
    crops = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    maps = localise(tower, head, crops, chunk=2)
    assert maps.shape == (3, 112, 112) and maps.dtype == np.float32
    assert 0 <= maps.min() and maps.max() <= 1
    with torch.no_grad():
        tokens = patch_tokens(tower, CLIP_PREPROCESS.normaliser()(crops), 2)
        ref = head.probabilities(tokens, 112).numpy()
    np.testing.assert_allclose(maps, ref, atol=1e-5)
    assert localise(tower, head, crops[:0]).shape == (0, 112, 112)


def test_patch_bank_caches_and_train_mask_head_reports_held_out_iou(tmp_path, monkeypatch):
    from deepaudit.training.patch_features import (
        MaskHeadConfig,
        PatchConfig,
        build_patch_bank,
        select_items,
        train_mask_head,
    )

    monkeypatch.setenv("DEEPAUDIT_CACHE", str(tmp_path))
    rng = np.random.default_rng(0)
    items, crops = [], {}
    for s in ("a", "b"):
        for label in (0, 1):
            for i in range(6):
                key = f"{s}{label}{i}"
                items.append({"item_key": key, "source": s, "label": label, "group": key,
                              "media_type": "image", "media_id": key})
                crops[key] = (rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8), [0, 1, 2])
    calls = []

    def embed(batch):  # stands in for the tower: token = the patch's mean brightness
        calls.append(len(batch))
        small = torch.from_numpy(batch).float().mean(-1)[:, None]
        grid = torch.nn.functional.adaptive_avg_pool2d(small, GRID).flatten(1)[..., None]
        return (grid.expand(-1, -1, 768) / 255).numpy()[:, None].astype(np.float16)

    cfg = PatchConfig(blocks=(3,), max_reals_per_source=4, max_fakes_per_source=1)
    chosen = select_items(items, cfg)
    assert len(chosen) == 2 * (4 + 1) and chosen == select_items(items, cfg)
    bank = build_patch_bank(chosen, crops, "key", cfg, embed=embed)
    views = [m["view"] for m in bank["meta"]]
    assert views.count("sbi") == 8 and views.count("orig") == 10
    assert bank["tokens"].shape == (18, 1, GRID * GRID, 768)
    assert bank["masks"].shape == (18, 56, 56)
    sbi = [i for i, v in enumerate(views) if v == "sbi"]
    assert bank["masks"][sbi].max() == pytest.approx(1.0, abs=1e-3)  # region over its peak
    n = sum(calls)
    build_patch_bank(chosen, crops, "key", cfg, embed=embed)  # cached: nothing embedded
    assert sum(calls) == n
    head, metrics = train_mask_head(items, crops, "key", MaskHeadConfig(
        block=3, hidden=4, epochs=1, val_fraction=0.5, features=cfg), embed=embed)
    assert head.block == 3 and metrics["block"] == 3 and metrics["iou_size"] == 56
    assert metrics["n_train_views"] + metrics["val_n_sbi"] + metrics["val_n_real"] == 16


def test_partial_blend_keeps_the_sbi_blend_only_inside_its_blob():
    from deepaudit.models.sbi import self_blend
    from deepaudit.training.patch_features import partial_blend

    rng = np.random.default_rng(1)
    crop = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
    fake, mask = self_blend(crop, rng, return_mask=True)
    out, region = partial_blend(crop, fake, mask, rng)
    assert region.shape == mask.shape and (region <= mask + 1e-6).all()
    assert 0 < (region >= 0.5 * region.max()).mean() < (mask >= 0.5 * mask.max()).mean()
    untouched = region < 1e-4
    np.testing.assert_array_equal(out[untouched], crop[untouched])
    full = region >= mask - 1e-4  # blob ~1: the SBI fake itself
    assert np.abs(out[full & (mask > 0.1)].astype(int) - fake[full & (mask > 0.1)]).max() <= 1
