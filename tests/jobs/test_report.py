"""``deepaudit report``: a self-contained page, checked in a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from deepaudit.jobs.cli import app
from deepaudit.pipeline.audit import AuditConfig, run_audit
from deepaudit.pipeline.render import label_value
from deepaudit.pipeline.report import load_run, render_report

from ..browser import chrome

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
SCRIPT_ID = "<script>window.__pwned=1</script>"
IMG_ID = '"><img src=x onerror="window.__pwned=2">'
SECTIONS = ["summary", "status-counts", "histogram", "roc", "confusion", "flagged", "errors",
            "throughput"]


@pytest.fixture(scope="module")
def audited(ray_local, tiny_model, media, tmp_path_factory) -> tuple[Path, dict]:
    """A real audit with labels, hostile ids, errors, and every scored item flagged."""
    d = tmp_path_factory.mktemp("report")
    rows = [
        (media["face_image"], "face_image", "real"),
        (media["face_png"], "face_png", "fake"),
        (media["face_video"], "face_video", "fake"),
        (media["face_video_2"], "face_video_2", "real"),
        (media["no_face_image"], "no_face_image", "fake"),
        (media["not_media"], SCRIPT_ID, "real"),
        (media["missing"], IMG_ID, None),
    ]
    manifest = d / "m.parquet"
    pq.write_table(pa.table({"uri": [str(r[0]) for r in rows], "media_id": [r[1] for r in rows],
                             "label": [r[2] for r in rows]}), manifest)
    out = d / "out"
    summary = run_audit(AuditConfig(manifest=str(manifest), output=str(out), model=str(tiny_model),
                                    threshold=0.01, frames=3))
    return out, summary


def _chrome():
    return chrome("the report test", window="1280,1000")


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_report_renders_in_chromium(audited, tmp_path):
    out, summary = audited
    page = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(out), "--output", str(page)])
    assert result.exit_code == 0, result.output
    text = page.read_text()
    # Self-contained: no script, no external reference, a policy that forbids fetching.
    assert "<script" not in text.replace("&lt;script", "")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)
    assert "default-src 'none'" in text

    driver = _chrome()
    try:
        driver.get(page.as_uri())
        assert summary["run_id"] in driver.title
        find = lambda css: driver.find_elements("css selector", css)  # noqa: E731
        for sid in SECTIONS:
            (el,) = find(f"#{sid}")
            assert el.is_displayed() and el.size["height"] > 40, sid
        assert summary["run_id"] in find("#summary")[0].text
        # Counts as the run summary has them.
        for status, n in summary["status"].items():
            (cell,) = find(f'#status-counts tr[data-status="{status}"] td.count')
            assert cell.text == str(n), status
        assert summary["status"] == {"ok": 4, "no_face": 1, "error": 2}
        # Every picture decoded: histogram, ROC, one evidence thumbnail per flagged item.
        images = find("img")
        loaded = driver.execute_script(
            "return Array.from(document.images).map(i => i.complete && i.naturalWidth)")
        assert all(w and w > 100 for w in loaded), loaded
        assert all(i.get_attribute("src").startswith("data:image/") for i in images)
        assert len(find("#histogram img")) == 1 and len(find("#roc img")) == 1
        assert len(find("#flagged img.thumb")) == summary["fakes"] == 4
        # Confusion matrix at threshold 0.01: every scored item predicted fake.
        cells = {c.get_attribute("data-cell"): int(c.text)
                 for c in find("#confusion td[data-cell]")}
        assert cells == {"tn": 0, "fp": 2, "fn": 0, "tp": 2}
        # Hostile ids are shown as text and never run.
        assert driver.execute_script("return window.__pwned === undefined")
        errors = find("#errors")[0].text
        assert SCRIPT_ID in errors and IMG_ID in errors and "not_media" in errors
        assert "items/s" in find("#throughput")[0].text
        # Nothing was fetched: the page's only resources are data: URIs.
        fetched = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)")
        assert not [u for u in fetched if not u.startswith("data:")], fetched
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, min(height, 6000))
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    assert shot.stat().st_size > 50_000
    if os.environ.get("DEEPAUDIT_SCREENSHOT_DIR"):  # for a person to look at
        shutil.copy(shot, Path(os.environ["DEEPAUDIT_SCREENSHOT_DIR"]) / "report.png")


def _fake_run(out: Path, run_id: str, rows: list[dict], **summary) -> None:
    run_dir = out / "runs" / run_id
    run_dir.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), run_dir / "verdicts-00000.parquet")
    s = {"run_id": run_id, "state": "completed", "model": "m@x", "model_trained": True,
         "threshold": 0.5, "status": {}, "verdicts": {}, "error_codes": {}, "fakes": 0, **summary}
    (run_dir / "_summary.json").write_text(json.dumps(s))
    (out / "_summary.json").write_text(json.dumps(s))


def _row(media_id: str, p: float | None, verdict: str | None, status: str = "ok", **kw) -> dict:
    return {"media_id": media_id, "uri": f"/x/{media_id}", "status": status, "error": None,
            "verdict": verdict, "p_fake": p, "threshold": 0.5, "evidence": None, **kw}


def test_report_without_labels_and_with_missing_evidence(tmp_path):
    out = tmp_path / "out"
    _fake_run(out, "r1", [
        _row("<script>alert(1)</script>", 0.9, "fake", evidence="/gone/r1.png"),
        _row("b", 0.2, "real"),
        _row("c", None, None, "error", error="not_media: <b>bad</b>"),
    ], fakes=1)
    html = render_report(load_run(str(out)))
    assert 'id="metrics-note"' in html and 'id="roc"' not in html and 'id="confusion"' not in html
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)" in html
    assert "<b>bad</b>" not in html and "&lt;b&gt;bad&lt;/b&gt;" in html
    assert "no evidence for this item" in html
    assert 'id="histogram"' in html and "data:image/png;base64," in html


def test_report_picks_a_run_and_says_what_to_do(tmp_path):
    out = tmp_path / "out"
    _fake_run(out, "old", [_row("a", 0.9, "fake", label="fake")], fakes=1)
    _fake_run(out, "new", [_row("a", 0.1, "real", label="real")])
    assert load_run(str(out)).summary["run_id"] == "new"
    assert load_run(str(out), "old").rows.column("p_fake").to_pylist() == [pytest.approx(0.9)]
    result = runner.invoke(app, ["report", str(out), "--run-id", "nope", "-o",
                                 str(tmp_path / "r.html")])
    assert result.exit_code == 2 and "new" in result.output and "old" in result.output
    result = runner.invoke(app, ["report", str(tmp_path / "empty"), "-o", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and "no run summary" in result.output
    assert not (tmp_path / "r.html").exists()


@pytest.mark.s3
def test_report_of_an_s3_output_embeds_its_evidence(s3_server, s3fs_client, tmp_path):
    from deepaudit.infra.storage import StorageConfig
    from deepaudit.pipeline.evidence import EvidenceWriter, render_strip

    local = tmp_path / "out"
    crops = np.full((1, 64, 64, 3), 128, np.uint8)
    heat = np.zeros((1, 64, 64), np.float32)
    heat[0, 10:30, 10:30] = 1.0
    png = render_strip(crops, heat, heat, [7], [0.9], "FAKE")
    storage = StorageConfig(endpoint_url=s3_server)
    uri = EvidenceWriter("s3://audit/rep/evidence", storage).write("../a", "r1.png", png)
    _fake_run(local, "r1", [_row("../a", 0.9, "fake", evidence=uri, label="fake"),
                            _row("b", 0.1, "real", label="real")], fakes=1)
    s3fs_client.put(str(local) + "/", "audit/rep/", recursive=True)
    data = load_run("s3://audit/rep", storage=storage)
    html = render_report(data, storage)
    assert html.count('class="thumb"') == 1 and 'id="roc"' in html
    result = runner.invoke(app, ["report", "s3://audit/rep", "--s3-endpoint", s3_server,
                                 "-o", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.html").read_text().count('class="thumb"') == 1


def test_labels():
    assert [label_value(v) for v in ("FAKE", "real", "1", 0, None, "unknown", " Fake ")] == \
        [1, 0, 1, 0, None, None, 1]
