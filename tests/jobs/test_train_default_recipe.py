"""``deepaudit train DATA`` without ``--config`` trains the shipped default's recipe, as its
model card records it, and says so (issue 31: it trained effnet_lite0_lstm for 12 epochs).
Nothing here trains: the resolved config is checked, and the command stops on bad data."""

from __future__ import annotations

import tomllib
from pathlib import Path

from typer.testing import CliRunner

from deepaudit.jobs.cli import app
from deepaudit.models.checkpoint import resolve_model
from deepaudit.training.config import (
    NOT_RECIPE,
    TrainConfig,
    default_recipe,
    default_recipe_note,
    train_config,
)

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})


def _cli(tmp_path, **typed) -> tuple[dict, set[str]]:
    """The command's defaults for the keys that matter, plus what was typed."""
    cli = {"inputs": ("data.csv",), "output": str(tmp_path / "run"),
           "model": "effnet_lite0_lstm", "epochs": 12, "seq_epochs": 8, "lr": 3e-4,
           "address": "local", "num_cpus": None, "cache": None}
    cli.update(typed)
    return cli, {"inputs", "output", *typed}


def test_no_config_resolves_to_the_default_cards_recipe(tmp_path):
    handle = resolve_model(None)
    recorded = handle.card["training_data"]["recipe"]
    cli, typed = _cli(tmp_path, num_cpus=2)
    cfg = train_config(cli, None, typed)
    assert cfg.model == handle.name != "effnet_lite0_lstm"
    for key, value in recorded.items():
        if key in NOT_RECIPE:
            continue
        got = getattr(cfg, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    # where and on what stays this run's: inputs, output, the typed --num-cpus
    assert cfg.inputs == ("data.csv",) and cfg.output == cli["output"] and cfg.num_cpus == 2
    assert cfg.recipe_file.endswith(handle.model_id)
    note = default_recipe_note(cfg)
    assert note and handle.name in note and handle.model_id in note


def test_the_card_and_the_repositorys_recipe_file_agree():
    """The card is the source (it ships in the package; recipes/ does not): every key of
    recipes/<default>.toml resolves to the same value from the card."""
    handle = resolve_model(None)
    toml = tomllib.loads((RECIPES / f"{handle.name}.toml").read_text())
    shipped, source = default_recipe()
    assert handle.model_id in source
    for key, value in toml.items():
        got = shipped[key.replace("-", "_")]
        assert (list(got) if isinstance(got, tuple) else got) == value, key


def test_typed_options_beat_the_default_recipe_and_a_model_picks_the_registry(tmp_path):
    cli, typed = _cli(tmp_path, epochs=3, clip_l2=0.5)
    cfg = train_config(cli, None, typed)
    assert cfg.model == resolve_model(None).name and cfg.clip_l2 == 0.5 and cfg.epochs == 3
    for picks in ({"model": "effnet_lite0_lstm"}, {"init_from": "imagenet"}):
        cli, typed = _cli(tmp_path, **picks)
        cfg = train_config(cli, None, typed)
        assert cfg.model == "effnet_lite0_lstm" and cfg.epochs == 12
        assert cfg.recipe_file is None and default_recipe_note(cfg) is None
    cfg = train_config(_cli(tmp_path)[0], RECIPES / "effnet_lite0.toml", {"inputs", "output"})
    assert default_recipe_note(cfg) is None and cfg.model == "effnet_lite0_lstm"
    assert default_recipe_note(TrainConfig(inputs=("x",), output=str(tmp_path))) is None


def test_train_without_config_says_which_recipe_it_trains(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("uri\n/a.jpg\n")  # no labels: the run stops before any training
    result = runner.invoke(app, ["train", str(m), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "label" in result.output, result.output
    text = " ".join(result.output.split())
    assert "no --config: training the shipped default's recipe" in text
    assert resolve_model(None).model_id in text
    result = runner.invoke(app, ["train", str(m), "-o", str(tmp_path / "out2"), "--model",
                                 "effnet_lite0_lstm"])
    assert result.exit_code == 2 and "no --config" not in result.output, result.output
