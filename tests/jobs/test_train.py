"""``deepaudit train``: config checks, the data pieces, the crop cache, and a real Ray Train
run of the tiny model on a small learnable set (loss goes down, the card is written,
resuming continues from the last epoch)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from deepaudit.jobs.cli import app
from deepaudit.models.registry import create_model
from deepaudit.training.config import TrainConfig
from deepaudit.training.loop import lr_lambda
from deepaudit.training.phase1 import CropDataset, FrameNet
from deepaudit.training.phase2 import SequenceNet
from deepaudit.training.run import run_train

from ..toy_data import build_toy_set

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return build_toy_set(tmp_path_factory.mktemp("toy"), per_photo=8, videos=True)


# --- no Ray ---------------------------------------------------------------------------


def test_train_config_refuses_impossible_values(tmp_path):
    ok = dict(inputs=("x.csv",), output=str(tmp_path))
    TrainConfig(**ok)
    for bad, msg in ((dict(model="nope"), "unknown model"), (dict(seq_epochs=0), "seq-epochs"),
                     (dict(epochs=0), "init-from"), (dict(freeze=4), "freeze"),
                     (dict(sbi=1.5), "sbi"), (dict(loss="hinge"), "loss"),
                     (dict(output="s3://b/out"), "local folder"), (dict(folds=3, fold=3), "fold"),
                     (dict(input_size=8), "input-size"), (dict(early_stop="acc"), "early-stop")):
        with pytest.raises(ValueError, match=msg):
            TrainConfig(**{**ok, **bad})


def test_real_only_training_split_needs_self_blended_fakes():
    import pyarrow as pa

    from deepaudit.training.datasets import DatasetError
    from deepaudit.training.run import check_usable

    items = pa.table({"split": ["train", "train", "val", "val"], "label": [0, 0, 0, 1]})
    with pytest.raises(DatasetError, match="both real and fake items"):
        check_usable(items)
    check_usable(items, sbi=0.5)  # reals plus self-blended fakes: the SBI protocol
    fakes_only = pa.table({"split": ["train", "val"], "label": [1, 0]})
    with pytest.raises(DatasetError):
        check_usable(fakes_only, sbi=0.5)


def test_lr_schedule_shapes():
    cos = lr_lambda("cosine", total=100, warmup=10)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0) and cos(100) == pytest.approx(0.01)
    assert cos(55) == pytest.approx(0.505, abs=1e-3)
    step = lr_lambda("step", total=90, warmup=0)
    assert step(59) == 1.0 and step(60) == pytest.approx(0.1)
    assert lr_lambda("constant", 10, 0)(9) == 1.0


def test_crop_dataset_is_deterministic_and_makes_self_blended_fakes():
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (6, 64, 64, 3), dtype=np.uint8)
    labels = np.array([0, 0, 0, 1, 1, 1])
    data = CropDataset(crops, labels, aug=None, sbi=1.0, seed=5)
    x0, y0 = data[0]
    x0_again, _ = data[0]
    assert np.array_equal(x0, x0_again) and y0 == 1  # every real became a fake
    assert not np.array_equal(x0, crops[0])
    x3, y3 = data[3]
    assert y3 == 1 and np.array_equal(x3, crops[3])  # fakes are left alone
    data.epoch = 1
    assert not np.array_equal(data[0][0], x0)  # a new epoch, a new blend
    plain = CropDataset(crops, labels, aug=None, sbi=0.0, seed=5)
    assert [plain[i][1] for i in range(6)] == labels.tolist()


def test_phase_views_share_the_models_parameters():
    torch.manual_seed(0)
    model = create_model("resnext_lstm_tiny").eval()
    frame_net, seq_net = FrameNet(model), SequenceNet(model)
    ids = {id(p) for p in model.parameters()}
    assert {id(p) for p in frame_net.parameters()} <= ids
    assert {id(p) for p in seq_net.parameters()} <= ids
    assert not any(n.startswith("lstm") for n, _ in frame_net.named_parameters())
    assert not any(n.startswith("backbone") for n, _ in seq_net.named_parameters())
    x = torch.randn(2, 3, 3, 64, 64)
    with torch.inference_mode():
        video, frames = model(x)
        torch.testing.assert_close(frame_net(x.flatten(0, 1)), frames.flatten())
        feats = model.frame_features(x.flatten(0, 1)).view(2, 3, -1)
        torch.testing.assert_close(seq_net(feats, torch.tensor([3, 3])), video)


def test_train_help_is_short_and_every_recipe_key_is_documented():
    from dataclasses import fields

    from typer.main import get_command

    from deepaudit.training.config import TrainConfig

    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    for option in ("--output", "--config", "--epochs", "--seq-epochs", "--resume", "--sbi",
                   "--workers", "--address", "--cache", "--init-from"):
        assert option in result.output
    params = get_command(app).commands["train"].params
    shown = [p for p in params if p.param_type_name == "option" and not p.hidden]
    assert len(shown) <= 16, [p.name for p in shown]
    # Every hidden option is a recipe key the help text and docs/training.md name.
    docs = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    help_text = " ".join(result.output.split())
    names = {f.name for f in fields(TrainConfig)}
    for p in params:
        if getattr(p, "hidden", False):
            flag = max(p.opts, key=len)
            assert f"`{flag}`" in docs, flag
            assert flag[2:] in help_text, flag
            assert (p.name if p.name != "gpu" else "use_gpu") in names, p.name


def test_train_cli_reports_bad_inputs(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("uri\n/a.jpg\n")
    result = runner.invoke(app, ["train", str(m), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "label" in result.output


# --- Ray -----------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_crop_cache_reuses_crops_and_records_failures(ray_local, toy, media, tmp_path):
    import pyarrow as pa

    from deepaudit.training.crop_cache import CropCacheConfig, build_crop_cache, load_crops
    from deepaudit.training.datasets import LABELLED_SCHEMA

    picks = [toy / "real/astronaut-00.jpg", toy / "fake/astronaut-00.jpg",
             toy / "real/astronaut-clip.mp4", media["no_face_image"], media["not_media"]]
    rows = [{"uri": str(p), "media_id": p.name + str(i), "label": i % 2, "group": f"g{i}",
             "links": [], "sequence": None, "source": "toy", "method": None,
             "media_type": "video" if p.suffix == ".mp4" else "image"}
            for i, p in enumerate(picks)]
    table = pa.Table.from_pylist(rows, schema=LABELLED_SCHEMA)
    cfg = CropCacheConfig(root=str(tmp_path / "cache"), frames=3, size=64)
    first = build_crop_cache(table, cfg)
    assert first.decoded_now == 5
    assert first.items["status"].to_pylist() == ["ok", "ok", "ok", "no_face", "error"]
    assert first.error_codes() == {"no_face": 1, "not_media": 1}
    assert {u["status"] for u in first.unusable()} == {"no_face", "error"}
    assert first.items["n_crops"].to_pylist()[:3] == [1, 1, 3]
    crops = load_crops(first.directory, first.items["item_key"].to_pylist())
    assert set(crops) == set(first.items["item_key"].to_pylist()[:3])
    video, frames = crops[first.items["item_key"][2].as_py()]
    assert video.shape == (3, 64, 64, 3) and video.dtype == np.uint8 and frames == sorted(frames)

    again = build_crop_cache(table, cfg)  # nothing new: nothing decoded
    assert again.decoded_now == 0
    assert again.items["status"].to_pylist() == first.items["status"].to_pylist()
    os.utime(picks[0], (1_000_000_000, 1_000_000_000))  # "changed" file: decoded again
    third = build_crop_cache(table, cfg)
    assert third.decoded_now == 1 and third.items["status"][0].as_py() == "ok"
    other = build_crop_cache(table, CropCacheConfig(root=str(tmp_path / "cache"), frames=3,
                                                    size=48))
    assert other.directory != first.directory and other.decoded_now == 5


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_end_to_end_then_resume(ray_local, toy, tmp_path):
    out = tmp_path / "run"
    base = dict(inputs=(str(toy / "labels.csv"),), output=str(out), model="resnext_lstm_tiny",
                epochs=2, seq_epochs=1, batch_size=8, seq_batch_size=4, lr=2e-3,
                warmup_epochs=0, train_frames=4, early_stop="none", val_fraction=0.25, sbi=0.2,
                cpus_per_worker=1.0, cache=str(tmp_path / "cache"))
    events: list[dict] = []
    first = run_train(TrainConfig(**base), on_event=events.append)

    # Progress reached the driver: per-step and per-epoch reports from the worker.
    kinds = {e["type"] for e in events}
    assert {"crops", "start", "step", "epoch", "info"} <= kinds
    phase1 = [h for h in first["history"] if h["phase"] == 1]
    assert [h["epoch"] for h in phase1] == [1, 2]
    assert phase1[1]["train_loss"] < phase1[0]["train_loss"]  # the loss goes down
    assert max(h["val_auc"] for h in phase1) >= 0.75  # and the toy problem is learnt

    card = json.loads(Path(first["card"]).read_text())
    assert card["trained"] is True and card["dtype"] == "float16"
    cfgc = card["config"]
    assert (cfgc["arch"], cfgc["input_size"], cfgc["frames"]) == ("resnext_lstm_tiny", 64, 8)
    chosen = card["metrics"]["threshold"]
    assert cfgc["threshold"] == chosen["value"] and 0 < chosen["value"] < 1
    assert "Youden" in chosen["rule"] and card["metrics"]["val"]["overall"]["threshold"] == \
        pytest.approx(chosen["value"])
    assert cfgc["mean"] == [0.485, 0.456, 0.406] and len(cfgc["std"]) == 3
    td = card["training_data"]
    assert td["labelled"] == {"labels": {"real": 25, "fake": 25}}
    assert td["without_crops"]["status"] == {"ok": 50}
    assert sum(td["used"]["val"]["labels"].values()) == first["val_items"] > 0
    split = json.loads((out / "split.json").read_text())
    assert td["split"]["groups"] == split["groups"] and len(split["groups"]) == 50
    assert td["recipe"]["epochs"] == 2 and "self-blended" in card["notes"]
    val = card["metrics"]["val"]["overall"]
    for key in ("accuracy", "precision", "recall", "f1", "fpr", "roc_auc", "average_precision",
                "confusion_matrix"):
        assert key in val
    assert pq.read_table(out / "val_predictions.parquet").num_rows == first["val_items"]
    val_manifest = (out / "val_manifest.csv").read_text().splitlines()
    assert val_manifest[0] == "uri,media_id,label,group,source"
    assert len(val_manifest) - 1 == first["val_items"]

    from deepaudit.models.checkpoint import resolve_model

    handle = resolve_model(first["card"])  # what the audit will load: sha256 checked
    assert handle.trained and handle.config.input_size == 64
    assert handle.load().frame_head.weight.dtype == torch.float32

    with pytest.raises(ValueError, match="--resume"):  # never silently mixes two runs
        run_train(TrainConfig(**base))

    second = run_train(TrainConfig(**{**base, "epochs": 3, "resume": True}))
    assert second["resumed_from"] == {"phase1_epochs": 2, "phase2_epochs": 1,
                                      "steps": first["steps"]}
    again1 = [h for h in second["history"] if h["phase"] == 1]
    assert [h["epoch"] for h in again1] == [1, 2, 3]
    assert again1[:2] == phase1  # epochs 1-2 came from the checkpoint, not a rerun
    steps_per_epoch = phase1[0]["steps"]
    assert again1[2]["steps"] == first["steps"] + steps_per_epoch  # the step count went on
    assert json.loads(Path(second["card"]).read_text())["metrics"]["best_epochs"]["phase2"] == 1


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_ddp_workers_with_data_cache_and_checkpoints_on_s3(ray_local, s3_server, toy,
                                                               tmp_path):
    """The cluster setup on one machine: inputs, crop cache and Ray Train checkpoints on
    S3 (moto), two DDP workers (gloo)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    for p in sorted(toy.rglob("*")):
        if p.suffix in (".jpg", ".mp4"):
            s3.upload_file(str(p), "audit", f"ddp/data/{p.relative_to(toy)}")
    out = tmp_path / "ddp"
    result = run_train(TrainConfig(
        inputs=("s3://audit/ddp/data",), output=str(out), model="resnext_lstm_tiny",
        epochs=1, seq_epochs=1, batch_size=4, seq_batch_size=4, warmup_epochs=0,
        train_frames=4, early_stop="none", val_fraction=0.25, workers=2, cpus_per_worker=0.9,
        cache="s3://audit/ddp/cache", checkpoint_storage="s3://audit/ddp/ckpt",
        s3_endpoint=s3_server))
    split = json.loads((out / "split.json").read_text())
    n_val = sum(sum(v.values()) for v in split["counts"]["val"].values())
    # Each worker scores its own shard of the validation items; the gathered predictions
    # cover all of them exactly once.
    preds = pq.read_table(out / "val_predictions.parquet")
    assert result["val_items"] == preds.num_rows == n_val
    assert len(set(preds["media_id"].to_pylist())) == n_val
    assert preds["uri"][0].as_py().startswith("s3://audit/ddp/data/")
    assert result["workers"] == 2
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="audit", Prefix="ddp/")["Contents"]]
    assert any(k.startswith("ddp/ckpt/train/checkpoint_") and k.endswith("/final.pt")
               for k in keys)
    assert any(k.startswith("ddp/cache/") and k.endswith(".crops.parquet") for k in keys)
    assert Path(result["card"]).is_file()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_recipe_end_to_end_through_the_cli(ray_local, toy, tmp_path):
    """`train --config recipes/tiny.toml`: the shipped recipe's shape (head epoch, balanced
    draws with self-blended fakes, threshold at a validation FPR) on the tiny model."""
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "tiny.toml"
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "train", "--config", str(recipe), str(toy / "labels.csv"), "-o", str(out),
        "--cache", str(tmp_path / "cache"), "--cpus-per-worker", "1", "--target-fpr", "0.1",
        "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    card = json.loads(Path(summary["card"]).read_text())
    assert card["arch"] == "effnet_lite_lstm_tiny" and card["config"]["input_size"] == 64
    recipe_used = card["training_data"]["recipe"]
    assert recipe_used["recipe_file"] == str(recipe) and recipe_used["balance"] is True
    assert recipe_used["target_fpr"] == 0.1  # the command line beat the recipe's default
    phase1 = [h for h in summary["history"] if h["phase"] == 1]
    assert [h["epoch"] for h in phase1] == [1, 2]
    assert phase1[0]["steps"] == 64 // 16  # epoch_crops / batch_size draws per epoch
    assert "false-positive rate at most 0.1" in card["metrics"]["threshold"]["rule"]
    preds = pq.read_table(out / "val_predictions.parquet").to_pylist()
    reals = [p["p_fake"] for p in preds if p["label"] == 0]
    t = card["config"]["threshold"]
    assert sum(p >= t for p in reals) <= 0.1 * len(reals)
