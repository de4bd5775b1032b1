"""Evidence with a learnt localisation head: a detector with ``localise`` adds a fifth
panel ("predicted region (model estimate)") and ``predicted_region`` to the JSON; without
it, or when it returns None or fails, the strip is unchanged."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from deepaudit.models.gradcam import Explanation
from deepaudit.pipeline.evidence import (
    COLUMNS,
    REGION_COLUMN,
    EvidenceBuilder,
    EvidenceConfig,
    render_strip,
)

SIZE, GAP, TOP = 200, 4, 52


class _Detector:
    """The evidence builder's view of a detector: explain (and maybe localise)."""

    cam_method = "test maps"

    def explain(self, features, lengths, positions, crops):
        yy, xx = np.mgrid[0:SIZE, 0:SIZE]
        cam = np.exp(-((xx - 60) ** 2 + (yy - 60) ** 2) / 900.0).astype(np.float32)
        out, k0 = [], 0
        for pos in positions:
            k = len(pos)
            maps = np.stack([cam] * k)
            out.append(Explanation(tuple(pos), maps, maps, np.ones(k), np.ones(k),
                                   np.full(k, 0.9), 0.9))
            k0 += k
        return out


class _Localising(_Detector):
    def __init__(self, result="maps"):
        self.result, self.calls = result, []

    def localise(self, crops):
        self.calls.append(crops.shape)
        if self.result == "raise":
            raise RuntimeError("boom")
        if self.result is None:
            return None
        region = np.zeros(crops.shape[:3], np.float32)
        region[:, 50:150, 40:120] = 0.8  # 100 x 80 px of 200 x 200
        return region


def _rows(n_frames=(3, 1)):
    rows, arrays = [], []
    rng = np.random.default_rng(0)
    for i, n in enumerate(n_frames):
        rows.append({"media_id": f"clip{i}.mp4", "uri": f"/x/clip{i}.mp4", "verdict": "fake",
                     "p_fake": 0.9, "threshold": 0.5, "model": "m",
                     "frame_indices": list(range(0, 10 * n, 10)),
                     "frame_p_fake": [0.9 - 0.1 * k for k in range(n)]})
        arrays.append(rng.integers(0, 255, (n, SIZE, SIZE, 3), dtype=np.uint8))
    rows.append({"media_id": "real.jpg", "verdict": "real"})  # not explained
    arrays.append(rng.integers(0, 255, (1, SIZE, SIZE, 3), dtype=np.uint8))
    return rows, arrays


def _build(tmp_path: Path, model):
    rows, arrays = _rows()
    lengths = [len(a) for a in arrays]
    builder = EvidenceBuilder(EvidenceConfig(root=str(tmp_path / "ev"), run_id="r", top_k=2),
                              model, contextlib.nullcontext)
    builder.add(rows, arrays, torch.zeros(sum(lengths), 4), lengths)
    out = []
    for row in rows[:2]:
        png = Path(row["evidence"])
        out.append((cv2.imread(str(png)), json.loads(png.with_suffix(".json").read_text())))
    return out


@pytest.mark.parametrize("model", [_Detector(), _Localising(None), _Localising("raise")])
def test_without_a_region_the_strip_keeps_four_panels(tmp_path, model):
    for img, meta in _build(tmp_path, model):
        assert img.shape[1] == 4 * SIZE + 5 * GAP
        assert meta["columns"] == list(COLUMNS) and "predicted_region" not in meta


def test_a_localising_detector_adds_the_region_panel_and_json(tmp_path):
    model = _Localising()
    (img, meta), (img1, meta1) = _build(tmp_path, model)
    assert model.calls == [(3, SIZE, SIZE, 3)]  # one call: both items' picked frames
    for im, m, k in ((img, meta, 2), (img1, meta1, 1)):
        assert im.shape == (TOP + k * (SIZE + GAP) + GAP, 5 * SIZE + 6 * GAP, 3)
        assert m["columns"] == [*COLUMNS, REGION_COLUMN]
        region = m["predicted_region"]
        assert "estimate" in region["method"] and "self-blended" in region["method"]
        assert [f["frame_index"] for f in region["frames"]] == [
            f["frame_index"] for f in m["frames"]]
        for f in region["frames"]:
            assert f["area"] == pytest.approx(100 * 80 / SIZE**2, abs=1e-4)
            assert f["box"] == [40, 50, 119, 149] and f["peak"] == pytest.approx(0.8)
    # The fifth panel: the crop under the map, the region outlined in green.
    x5 = GAP + 4 * (SIZE + GAP)
    panel = img[TOP:TOP + SIZE, x5:x5 + SIZE].astype(int)
    green = (panel[..., 1] > 200) & (panel[..., 0] < 80) & (panel[..., 2] < 80)
    assert green[50:150, 38:42].mean() > 0.5 and not green[:40].any()


def test_render_strip_checks_region_shape():
    crops = np.zeros((1, SIZE, SIZE, 3), np.uint8)
    cam = np.zeros((1, SIZE, SIZE), np.float32)
    with pytest.raises(ValueError):
        render_strip(crops, cam, cam, [0], [0.5], "x", region=np.zeros((1, 10, 10)))
    png = render_strip(crops, cam, cam, [0], [0.5], "x", region=cam)
    assert cv2.imdecode(np.frombuffer(png, np.uint8), 1).shape[1] == 5 * SIZE + 6 * GAP
