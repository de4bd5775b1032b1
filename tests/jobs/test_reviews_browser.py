"""A review in a real headless Chromium: open an item, mark it, see the review on its page
and find it with the items page's review filter. Screenshots go to
$DEEPAUDIT_SCREENSHOT_DIR when it is set."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
from selenium.webdriver.support.ui import Select, WebDriverWait

from deepaudit.serve.app import create_app
from deepaudit.serve.data import open_archive
from tests.jobs.serve_helpers import chrome, running, verdict_rows, write_run


def test_review_an_item_in_chromium(tmp_path):
    out = tmp_path / "out"
    rows = verdict_rows("run-1", 12, seed=4)
    rows[2].update(status="ok", verdict="fake", p_fake=0.93, error=None)
    write_run(out, "run-1", rows)
    with running(create_app(open_archive(str(out)), reviewer="ann")) as url:
        driver = chrome()
        find = lambda css: driver.find_elements("css selector", css)  # noqa: E731

        def wait(cond) -> None:
            WebDriverWait(driver, 30).until(lambda d: cond())

        try:
            driver.get(f"{url}/items?sort=manifest_row&order=asc")
            find('#items tbody tr td.media a')[2].click()
            assert "Not reviewed yet" in find("#review")[0].text
            find("#review-real")[0].click()  # the reviewer disagrees with "fake"
            find("#review-note-input")[0].send_keys("<b>a real person</b>, checked the source")
            find("#review-submit")[0].click()
            # The post answers with a redirect: wait for the new page, not the old one.
            wait(lambda: driver.current_url.endswith("/runs/run-1/items/2#review")
                 and find("#review-value"))
            assert find("#review-value")[0].text == "real"
            assert find("#review-state")[0].text == "overturned"
            assert find("#review-note")[0].text == "<b>a real person</b>, checked the source"
            assert len(find("#review-history tbody tr")) == 1
            shot = os.environ.get("DEEPAUDIT_SCREENSHOT_DIR")
            if shot:
                driver.save_screenshot(str(Path(shot) / "serve-review.png"))
            # The items page: filter by review state.
            driver.get(f"{url}/items")
            Select(find('select[name="review"]')[0]).select_by_value("overturned")
            find("#apply")[0].click()
            wait(lambda: "review=overturned" in driver.current_url)
            (row,) = find("#items tbody tr")
            assert row.find_element("css selector", "td.media a").get_attribute(
                "href").endswith("/runs/run-1/items/2")
            assert row.find_element("css selector", "td.review").text == "overturned"
            Select(find('select[name="review"]')[0]).select_by_value("unreviewed")
            find("#apply")[0].click()
            wait(lambda: "review=unreviewed" in driver.current_url)
            assert len(find("#items tbody tr")) == 11
            assert driver.execute_script("return window.__pwned === undefined")
        finally:
            driver.quit()
    (part,) = (out / "_reviews").glob("review-*.parquet")
    assert pq.read_table(part).to_pylist()[0]["reviewer"] == "ann"
