"""`evaluate --perturb pgd:EPS` needs a detector it can attack (one with a CLIP branch):
a CNN-only model is refused before any audit runs."""

from __future__ import annotations

from typer.testing import CliRunner

from deepaudit.jobs.cli import app

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})


def test_pgd_on_a_model_without_clip_branch_is_refused(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"uri,label\n{tmp_path / 'a.jpg'},fake\n{tmp_path / 'b.jpg'},real\n")
    result = runner.invoke(app, ["evaluate", str(manifest), "--model", "effnet_lite0_lstm",
                                 "-o", str(tmp_path / "out"), "--perturb", "pgd:2"])
    assert result.exit_code != 0
    assert "needs a detector with a CLIP branch" in result.output
    assert not (tmp_path / "out" / "metrics.json").exists()
