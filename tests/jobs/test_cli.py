"""The deepaudit command line, through typer's CliRunner."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from deepaudit.jobs.cli import app

# Wide and colourless, so rich does not wrap or style option names.
runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})


def test_help_explains_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for word in ("audit", "demo", "models"):
        assert word in result.output
    result = runner.invoke(app, ["audit", "--help"])
    assert result.exit_code == 0
    for option in ("--output", "--model", "--frames", "--address", "--s3-endpoint",
                   "--decode-actors", "--classify-actors", "--batch-size"):
        assert option in result.output


def test_models_lists_registered_architectures():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    assert "resnext_lstm" in result.output and "resnext_lstm_tiny" in result.output


def test_bad_manifest_exits_2_with_a_message_that_says_what_to_fix(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("path\n/a.mp4\n")
    result = runner.invoke(app, ["audit", str(m), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "no 'uri' column" in result.output
    assert not (tmp_path / "out" / "runs").exists()  # nothing started


def test_unknown_model_exits_2(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("uri\n/a.mp4\n")
    result = runner.invoke(app, ["audit", str(m), "-o", str(tmp_path / "o"), "--model", "nope"])
    assert result.exit_code == 2
    assert "resnext_lstm" in result.output  # lists what exists


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_audit_json_summary(ray_local, tiny_model, media, tmp_path):
    m = tmp_path / "m.csv"
    m.write_text(f"uri,label\n{media['face_image']},real\n{media['not_media']},\n")
    result = runner.invoke(app, ["audit", str(m), "-o", str(tmp_path / "out"), "--model",
                                 str(tiny_model), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rows_in"] == summary["rows_out"] == 2
    assert summary["status"] == {"ok": 1, "no_face": 0, "error": 1}
    assert summary["error_codes"] == {"not_media": 1}


@pytest.mark.parametrize("bad", ["../../x", "a/b", ".hidden", "x" * 200])
def test_unsafe_run_id_is_refused_before_any_work(tmp_path, bad):
    m = tmp_path / "m.csv"
    m.write_text("uri\n/a.mp4\n")
    result = runner.invoke(app, ["audit", str(m), "-o", str(tmp_path / "out"), "--run-id", bad])
    assert result.exit_code == 2 and "safe folder name" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()


def test_audit_help_is_readable_at_80_columns():
    """Options in panels, and no option name cut ('--classify-act…') at 80 columns."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "80", "TERM": "xterm"}
    out = subprocess.run([sys.executable, "-m", "deepaudit.jobs.cli", "audit", "--help"],
                         capture_output=True, text=True, env=env, timeout=120).stdout
    assert max(len(line) for line in out.splitlines()) <= 80
    for panel in ("Input", "Output", "Model", "Cluster", "Advanced"):
        assert f"─ {panel} ─" in out, out
    names = ["--output", "--ledger", "--max-attempts", "--retry-errors", "--any-model",
             "--include", "--exclude", "--s3-endpoint", "--run-id", "--evidence",
             "--evidence-max", "--roll-rows", "--roll-seconds", "--json", "--progress",
             "--model", "--frames", "--threshold", "--device", "--address", "--num-cpus",
             "--decode-actors", "--classify-actors", "--min-cpus", "--min-gpus",
             "--batch-size", "--torch-threads", "--crop-batch", "--retry-lost", "--verbose"]
    words = set(out.replace("│", " ").split())
    for name in names:
        assert name in words, (name, out)
    assert "…" not in out
    assert len(out.splitlines()) < 120
