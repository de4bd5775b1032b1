"""``deepaudit serve`` over a real tiny audit, in a real headless Chromium (selenium):
runs, filter by verdict, sort by score, open an item, its evidence loads, upload a file
and read its verdict. Screenshots go to $DEEPAUDIT_SCREENSHOT_DIR when it is set."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from selenium.webdriver.support.ui import Select, WebDriverWait

from deepaudit.pipeline.audit import AuditConfig, run_audit
from deepaudit.pipeline.check import Checker
from deepaudit.serve.app import create_app
from deepaudit.serve.data import open_archive
from tests.jobs.serve_helpers import IMG_ID, SCRIPT_ID, chrome, running


@pytest.fixture(scope="module")
def audited(ray_local, tiny_model, media, tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("serve-audit")
    rows = [(media["face_image"], "face_image", "real"), (media["face_png"], "face_png", "fake"),
            (media["face_video"], "face_video", "fake"),
            (media["face_video_2"], "face_video_2", "real"),
            (media["no_face_image"], "no_face_image", "fake"),
            (media["not_media"], SCRIPT_ID, "real"), (media["missing"], IMG_ID, None)]
    manifest = d / "m.parquet"
    pq.write_table(pa.table({"uri": [str(r[0]) for r in rows], "media_id": [r[1] for r in rows],
                             "label": [r[2] for r in rows]}), manifest)
    out = d / "out"
    summary = run_audit(AuditConfig(manifest=str(manifest), output=str(out),
                                    model=str(tiny_model), threshold=0.01, frames=3))
    return out, summary


def _shot(driver, name: str) -> None:
    target = os.environ.get("DEEPAUDIT_SCREENSHOT_DIR")
    if target:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1360, min(max(height, 700), 2400))
        driver.save_screenshot(str(Path(target) / f"serve-{name}.png"))
        driver.set_window_size(1360, 1000)


@pytest.mark.ray
@pytest.mark.slow  # a real audit on Ray (about 60 s) before the browser runs
@pytest.mark.timeout(500)
def test_serve_in_chromium(audited, tiny_model, media, tmp_path):
    out, summary = audited
    checker = Checker(model=str(tiny_model), threshold=0.01, frames=3,
                      evidence_dir=str(tmp_path / "uploads" / "evidence"))
    app = create_app(open_archive(str(out)), checker=checker,
                     upload_root=str(tmp_path / "uploads"))
    with running(app) as url:
        driver = chrome()
        driver.set_window_size(1360, 1000)
        find = lambda css: driver.find_elements("css selector", css)  # noqa: E731

        def wait(cond) -> None:  # a click navigates: read the new page, not the old one
            WebDriverWait(driver, 30).until(lambda d: cond())

        try:
            driver.get(f"{url}/runs")
            (row,) = find(f'tr[data-run="{summary["run_id"]}"]')
            quality = find(".quality")[0].text
            assert "ROC AUC" in quality or "not measured" in quality
            _shot(driver, "runs")
            row.find_element("css selector", "a").click()
            wait(lambda: summary["run_id"] in driver.title)
            loaded = driver.execute_script(
                "return Array.from(document.images).map(i => i.complete && i.naturalWidth)")
            assert len(loaded) == 2 and all(w and w > 100 for w in loaded), loaded  # hist, ROC
            _shot(driver, "run")
            # Items: filter by verdict, then sort by score.
            driver.get(f"{url}/items")
            assert len(find("#items tbody tr")) == 7
            Select(find('select[name="verdict"]')[0]).select_by_value("fake")
            find("#apply")[0].click()
            wait(lambda: "verdict=fake" in driver.current_url)
            rows = find("#items tbody tr")
            assert len(rows) == summary["fakes"] == 4
            assert {r.get_attribute("data-verdict") for r in rows} == {"fake"}
            find('th a[data-sort="p_fake"]')[0].click()  # already p_fake desc: now ascending
            wait(lambda: "order=asc" in driver.current_url)
            ps = [float(r.get_attribute("data-p")) for r in find("#items tbody tr")]
            assert ps == sorted(ps) and "order=asc" in driver.current_url
            find('th a[data-sort="p_fake"]')[0].click()
            wait(lambda: "order=desc" in driver.current_url)
            ps = [float(r.get_attribute("data-p")) for r in find("#items tbody tr")]
            assert ps == sorted(ps, reverse=True)
            driver.get(f"{url}/items")
            _shot(driver, "items")
            # Open the top flagged item: evidence, frame plot and face boxes load.
            driver.get(f"{url}/items?verdict=fake&sort=p_fake")
            find("#items tbody tr td.media a")[0].click()
            wait(lambda: find("#evidence-img"))
            for img in ("#evidence-img", "#faces-img", "#frames img"):
                (el,) = find(img)
                assert driver.execute_script(
                    "return arguments[0].complete && arguments[0].naturalWidth", el) > 50, img
            assert "History (1 verdict" in driver.page_source
            _shot(driver, "item")
            # Hostile ids never run, on any page.
            for path in ("/items", "/items?status=error", "/runs"):
                driver.get(url + path)
                assert driver.execute_script("return window.__pwned === undefined")
            # Check a file: upload and read its verdict.
            driver.get(f"{url}/check")
            find("#file")[0].send_keys(str(media["face_image"]))
            find("#submit")[0].click()
            WebDriverWait(driver, 120).until(lambda d: find("#result-verdict") or find("#error"))
            assert not find("#error"), find("#error")[0].text
            assert find("#result-verdict")[0].text.lower() == "fake"
            assert "p_fake" in find("#result")[0].text
            (ev,) = find("#result-evidence")
            assert driver.execute_script("return arguments[0].naturalWidth", ev) > 100
            _shot(driver, "check")
        finally:
            driver.quit()
    # The upload and its evidence are gone.
    assert not [p for p in (tmp_path / "uploads").rglob("*") if p.is_file()]
