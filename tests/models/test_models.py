"""deepaudit.models: the ResNeXt backbone, the ResNeXt-LSTM, the registry and checkpoints."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deepaudit.models.checkpoint import (
    CARD_KEYS,
    DEFAULT_MODEL,
    file_sha256,
    resolve_model,
    save_checkpoint,
)
from deepaudit.models.registry import ModelConfig, create_model, get_config, list_models
from deepaudit.models.resnext import ResNeXt, resnext50_32x4d

TINY = "resnext_lstm_tiny"


@pytest.fixture(scope="module")
def resnext50() -> ResNeXt:
    return resnext50_32x4d().eval()


@pytest.fixture
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(TINY).eval()


def _clips(model: torch.nn.Module, batch: int, steps: int) -> torch.Tensor:
    size = model.config.input_size
    return torch.randn(batch, steps, 3, size, size, generator=torch.Generator().manual_seed(1))


# --- ResNeXt ---------------------------------------------------------------------------


def test_resnext50_has_torchvision_layout(resnext50):
    state = resnext50.state_dict()
    # torchvision's resnext50_32x4d: 25,028,904 parameters, of which fc is 2048*1000 + 1000.
    assert sum(p.numel() for p in resnext50.parameters()) == 25_028_904 - 2_049_000
    assert resnext50.feat_dim == 2048
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer1.0.conv2.weight"].shape == (128, 4, 3, 3)
    assert state["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert state["layer1.0.downsample.1.running_var"].shape == (256,)
    assert state["layer4.2.conv3.weight"].shape == (2048, 1024, 1, 1)
    assert state["layer4.2.bn3.num_batches_tracked"].dtype == torch.int64
    assert "layer4.3.conv1.weight" not in state and "layer3.5.conv1.weight" in state
    assert not any(key.startswith("fc.") for key in state)


def test_resnext50_features_are_7x7_at_224(resnext50):
    with torch.inference_mode():
        x = torch.randn(1, 3, 224, 224)
        assert resnext50.forward_features(x).shape == (1, 2048, 7, 7)
        assert resnext50(x).shape == (1, 2048)


def test_resnext_init_and_width_scaling():
    net = ResNeXt(layers=(1, 1, 1, 1), base_channels=16)  # 32x4d widths, divided by 4
    assert net.feat_dim == 512
    assert net.layer1[0].conv2.weight.shape == (32, 1, 3, 3)
    state = net.state_dict()
    assert all(not state[f"layer{i}.0.bn3.weight"].any() for i in range(1, 5))
    assert state["bn1.weight"].eq(1).all() and not state["bn1.bias"].any()
    no_zero = ResNeXt(layers=(1, 1, 1, 1), base_channels=16, zero_init_residual=False)
    assert no_zero.state_dict()["layer1.0.bn3.weight"].eq(1).all()
    with pytest.raises(ValueError, match="zero width"):
        ResNeXt(base_channels=8, groups=4, width_per_group=4)


# --- registry --------------------------------------------------------------------------


def test_registry_lists_and_configs():
    assert {"resnext_lstm", TINY} <= set(list_models())
    cfg = get_config("resnext_lstm")
    assert (cfg.input_size, cfg.frames, cfg.threshold) == (224, 16, 0.5)
    assert cfg.mean == (0.485, 0.456, 0.406) and cfg.std == (0.229, 0.224, 0.225)
    assert cfg.arch_kwargs["hidden_size"] == 256 and cfg.arch_kwargs["bidirectional"] is False
    get_config(TINY).arch_kwargs["hidden_size"] = 999  # a copy: the registry is untouched
    assert get_config(TINY).arch_kwargs["hidden_size"] == 32


def test_model_config_json_roundtrip():
    cfg = get_config("resnext_lstm")
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["mean"] == [0.485, 0.456, 0.406] and data["arch_kwargs"]["layers"] == [3, 4, 6, 3]
    assert ModelConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({**data, "bogus": 1})


def test_create_model_overrides():
    model = create_model(TINY, hidden_size=None, dropout=None)  # None = keep the default
    assert model.lstm.hidden_size == 32 and model.dropout.p == 0.4
    assert model.config == get_config(TINY)

    model = create_model(TINY, hidden_size=16, bidirectional=True, dropout=0.1)
    assert model.lstm.hidden_size == 16 and model.lstm.bidirectional
    assert model.video_head.in_features == 32 and model.dropout.p == 0.1
    assert model.config.arch_kwargs["hidden_size"] == 16
    assert model.config.arch_kwargs["bidirectional"] is True

    with pytest.raises(TypeError, match="hidden_size"):
        create_model(TINY, hiden_size=8)


def test_create_model_unknown_name_lists_models():
    with pytest.raises(ValueError, match="resnext_lstm_tiny") as err:
        create_model("resnet9000")
    assert "resnet9000" in str(err.value)


def test_create_model_loads_no_weights():
    a, b = create_model(TINY).state_dict(), create_model(TINY).state_dict()
    assert not torch.equal(a["frame_head.weight"], b["frame_head.weight"])
    torch.manual_seed(3)
    a = create_model(TINY).state_dict()
    torch.manual_seed(3)
    b = create_model(TINY).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- ResNeXt-LSTM ----------------------------------------------------------------------


def test_tiny_forward_shapes(tiny):
    x = _clips(tiny, batch=2, steps=3)
    with torch.inference_mode():
        video, frames = tiny(x, torch.tensor([3, 1]))
        assert video.shape == (2,) and frames.shape == (2, 3)
        features = tiny.frame_features(x.flatten(0, 1))
        assert features.shape == (6, tiny.backbone.feat_dim)
        assert tiny.frame_logits(features).shape == (6,)
        torch.testing.assert_close(tiny.frame_logits(features).view(2, 3), frames)
        assert tiny(x)[0].shape == (2,)  # lengths default to T


def test_sequence_logits_ignore_padding(tiny):
    gen = torch.Generator().manual_seed(2)
    dim = tiny.backbone.feat_dim
    short, long = torch.randn(1, 2, dim, generator=gen), torch.randn(1, 5, dim, generator=gen)
    garbage = 1e3 * torch.randn(1, 3, dim, generator=gen)
    with torch.inference_mode():
        alone = tiny.sequence_logits(short, torch.tensor([2]))
        padded = tiny.sequence_logits(torch.cat([short, garbage], 1), torch.tensor([2]))
        torch.testing.assert_close(padded, alone)
        # In a batch, unsorted lengths: each video's logit is the same as alone.
        batch = torch.cat([torch.cat([short, garbage], 1), long])
        both = tiny.sequence_logits(batch, torch.tensor([2, 5]))
        alone_long = tiny.sequence_logits(long, torch.tensor([5]))
        torch.testing.assert_close(both, torch.cat([alone, alone_long]))
        with pytest.raises(ValueError, match="lengths"):
            tiny.sequence_logits(batch, torch.tensor([0, 5]))


# --- checkpoints -----------------------------------------------------------------------


def _outputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        return model(_clips(model, batch=2, steps=3), torch.tensor([3, 2]))


def test_checkpoint_roundtrip_fp32(tiny, tmp_path):
    weights, card_path = save_checkpoint(tiny, tmp_path / "tiny.safetensors", name="mine",
                                         metrics={"auc": 0.5})
    assert card_path == tmp_path / "tiny.json"
    card = json.loads(card_path.read_text())
    assert set(CARD_KEYS) <= set(card)
    assert card["weights_file"] == "tiny.safetensors" and card["arch"] == TINY
    assert card["weights_sha256"] == file_sha256(weights) and card["trained"] is True
    assert card["dtype"] == "float32" and card["metrics"] == {"auc": 0.5}
    assert card["training_data"] is None and card["config"] == tiny.config.to_dict()

    for ref in (str(weights), card_path):
        handle = resolve_model(ref)
        assert handle.trained and handle.name == "mine"
        assert handle.model_id == f"mine@{card['weights_sha256'][:12]}"
        assert pickle.loads(pickle.dumps(handle)) == handle
        loaded = handle.load()
        assert not loaded.training and loaded.config == handle.config
        for got, want in zip(_outputs(loaded), _outputs(tiny), strict=True):
            assert torch.equal(got, want)


def test_checkpoint_roundtrip_fp16(tiny, tmp_path):
    weights, _ = save_checkpoint(tiny, tmp_path / "half.safetensors", dtype="float16",
                                 trained=False)
    stored = load_file(weights)
    assert stored["lstm.weight_ih_l0"].dtype == torch.float16
    assert stored["backbone.bn1.num_batches_tracked"].dtype == torch.int64
    handle = resolve_model(weights)
    assert handle.card["dtype"] == "float16" and handle.trained is False
    loaded = handle.load()
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for got, want in zip(_outputs(loaded), _outputs(tiny), strict=True):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=0)  # observed error ~1e-4


def test_corrupt_weights_fail_sha256_check(tiny, tmp_path):
    weights, _ = save_checkpoint(tiny, tmp_path / "tiny.safetensors")
    handle = resolve_model(weights)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256") as err:
        handle.load()
    assert str(weights) in str(err.value) and handle.sha256 in str(err.value)


def test_save_checkpoint_needs_safetensors_path(tiny, tmp_path):
    with pytest.raises(ValueError, match=".safetensors"):
        save_checkpoint(tiny, tmp_path / "tiny.pt")


def test_resolve_bogus_refs(tmp_path):
    with pytest.raises(ValueError, match="resnext_lstm_tiny") as err:
        resolve_model("no-such-model")
    assert ".safetensors" in str(err.value) and ".json" in str(err.value)
    with pytest.raises(FileNotFoundError):
        resolve_model(str(tmp_path / "missing.safetensors"))


def test_resolve_registered_name_without_weights():
    handle = resolve_model(TINY)
    assert handle.trained is False and handle.weights_path is None
    assert handle.model_id == f"{TINY}@untrained"
    assert handle.config == get_config(TINY)
    torch.manual_seed(5)
    a, b = handle.load(), handle.load()
    after_loads = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(1), after_loads)  # loading left the caller's RNG alone
    state_a, state_b = a.state_dict(), b.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not a.training
    assert resolve_model().name == DEFAULT_MODEL == "clip_effnet_fused"


def test_shipped_default_weights_are_trained_verified_and_not_stuck():
    """The default model ships trained weights under 60 MB whose sha256 matches the card,
    with validation metrics per source, a leave-one-family-out table, an out-of-domain
    measurement, a calibration, and scores that move with the input."""
    handle = resolve_model()
    assert handle.name == DEFAULT_MODEL and handle.trained, "models/weights/ lacks the default"
    assert os.path.getsize(handle.weights_path) <= 60 * 2**20
    assert file_sha256(handle.weights_path) == handle.sha256
    assert handle.model_id == f"{DEFAULT_MODEL}@{handle.sha256[:12]}"
    card = handle.card
    assert "deepaudit train" in card["notes"] and set(card["preprocess"]) == {"cnn", "clip"}
    val = card["metrics"]["val"]
    assert {"ffpp", "ciplab"} <= set(val["by_source"])
    assert 0.0 < val["overall"]["roc_auc"] <= 1.0
    # Chosen leave one family out, measured on media from sources it never trained on
    # (with a robustness figure), calibrated, and reproducible from the recipe.
    lofo = card["metrics"]["leave_one_family_out"]
    assert len(lofo["by_family"]) >= 10 and handle.quality["loso_auc"] == lofo["mean_auc"]
    assert abs(lofo["min_auc"] - min(lofo["by_family"].values())) < 1e-4
    assert handle.quality["worst_family"] == lofo["worst_family"]
    ood = card["metrics"]["out_of_domain"]
    assert 0.5 < ood["roc_auc"] <= 1.0 and "jpeg:50" in ood["robustness"]
    assert handle.quality["ood_auc"] == ood["roc_auc"]
    assert card["training_data"]["recipe"]["recipe_file"] == "recipes/clip_effnet_fused.toml"
    assert handle.config.calibration is not None and card["cost"]["cpu_ms_per_frame"] > 0
    assert 0.0 < handle.config.threshold < 1.0
    model = handle.load()
    size = handle.config.input_size
    crops = np.random.default_rng(3).integers(0, 256, (6, size, size, 3), dtype=np.uint8)
    p = model.score(crops, [2, 2, 1, 1]).video_p
    assert np.isfinite(p).all() and float(p.max() - p.min()) > 1e-4


def test_the_cnn_only_detector_still_ships():
    handle = resolve_model("effnet_lite0_lstm")
    assert handle.trained and file_sha256(handle.weights_path) == handle.sha256
    assert handle.card["training_data"]["recipe"]["recipe_file"] == "recipes/effnet_lite0.toml"


def test_one_frame_items_show_one_number_and_name_their_head():
    """An image's frame score is its item score, whatever head scored it (issue 24 #4)."""
    torch.manual_seed(0)
    model = create_model("effnet_lite_lstm_tiny").eval()
    crops = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    scores = model.score(crops, [1, 3])
    assert scores.frame_p[0] == scores.video_p[0]
    assert scores.head == ["sequence", "sequence"]
    with pytest.raises(ValueError, match="do not split"):
        model.score(crops, [2, 3])


def test_calibration_is_monotone_keeps_the_ranking_and_matches_observed_rates():
    from deepaudit.models.detector import calibrate, fit_calibration, reliability_table
    from deepaudit.models.metrics import roc_auc

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    raw = np.clip(0.3 * labels + rng.normal(0.35, 0.15, 2000), 0, 1)  # badly scaled scores
    knots = fit_calibration(raw, labels)
    p = calibrate(raw, knots)
    assert np.all(np.diff(knots[0]) >= 0) and np.all(np.diff(knots[1]) > 0)
    assert roc_auc(labels, p) == pytest.approx(roc_auc(labels, raw), abs=1e-3)
    for row in reliability_table(p, labels):
        if row["n"] >= 100:  # predicted and observed fake rates agree per bin
            assert abs(row["mean_p"] - row["fake_rate"]) < 0.08, row
    assert ModelConfig(arch="x", input_size=64, mean=(0.5,) * 3, std=(0.5,) * 3, frames=1,
                       threshold=0.5, calibration=knots).calibration == knots
    with pytest.raises(ValueError, match="increasing"):
        ModelConfig(arch="x", input_size=64, mean=(0.5,) * 3, std=(0.5,) * 3, frames=1,
                    threshold=0.5, calibration=((0.0, 1.0), (1.0, 0.0)))
