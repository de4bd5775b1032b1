"""Reviews (issue 26 item 1) through ``deepaudit serve``'s HTTP API on a real server on
127.0.0.1: written, read, filtered (unreviewed, confirmed, overturned), repeated (the latest
wins, history kept), refused (unknown item, no CSRF token, no server token, a foreign
Origin, bad values), a review folder the server cannot write (read-only, with the reason),
and read back by ``deepaudit query`` (the reviews view, latest.review) and the report."""

from __future__ import annotations

import csv
import hashlib
import io
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
from typer.testing import CliRunner

from deepaudit.jobs.cli import app as cli
from deepaudit.pipeline.query import run_query
from deepaudit.serve.app import create_app
from deepaudit.serve.data import open_archive
from tests.jobs.serve_helpers import SCRIPT_ID, T0, running, verdict_rows, write_run

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
TOKEN = "review-token-0123456789"


@pytest.fixture
def out(tmp_path) -> Path:
    """Run 1: 24 rows; run 2 re-audits the first 6 media ids with another model."""
    out = tmp_path / "out"
    write_run(out, "run-1", verdict_rows("run-1", 24, seed=1))
    r2 = verdict_rows("run-2", 6, seed=2, t0=T0.replace(day=2))
    for r in r2:
        r["model"] = "m@def"
    write_run(out, "run-2", r2, t0=T0.replace(day=2))
    return out


def _digest(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "runs").rglob("*")) if p.is_file()}


class Reviewer:
    """A browser-like client: opens an item page (CSRF cookie and field), posts its form
    with the page's Origin, as a browser does."""

    def __init__(self, url: str, headers: dict | None = None) -> None:
        self.url, self.s = url, requests.Session()
        self.s.headers.update({"Origin": url, **(headers or {})})

    def page(self, run: str, row: int) -> requests.Response:
        return self.s.get(f"{self.url}/runs/{run}/items/{row}", timeout=30)

    def csrf(self, run: str = "run-1", row: int = 0) -> str:
        return re.search(r'name="csrf" value="([^"]+)"', self.page(run, row).text)[1]

    def review(self, run: str, row: int, review: str, note: str | None = None,
               csrf: str | None = "get", **kw) -> requests.Response:
        data = {"review": review, **({"note": note} if note is not None else {})}
        if csrf == "get":  # the item page's own form field
            csrf = self.csrf(run, row)
        if csrf:
            data["csrf"] = csrf
        return self.s.post(f"{self.url}/runs/{run}/items/{row}/review", data=data,
                           timeout=30, **kw)

    def state(self, run: str, row: int) -> dict:
        r = self.s.get(f"{self.url}/runs/{run}/items/{row}/reviews.json", timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def rows(self, **params) -> list[dict]:
        r = self.s.get(f"{self.url}/items.csv", params=params, timeout=30)
        assert r.status_code == 200, r.text
        return list(csv.DictReader(io.StringIO(r.text)))

    def page_rows(self, **params) -> list[tuple[str, str]]:
        html = self.s.get(f"{self.url}/items", params={**params, "limit": 500},
                          timeout=30).text
        return re.findall(r'href="/runs/([^/]+)/items/(\d+)"', html.split('id="items"')[1])


def _verdict(out: Path, run: str, row: int) -> str | None:
    t = pq.read_table(out / "runs" / run / "verdicts-00000.parquet").to_pylist()
    return next(r["verdict"] for r in t if r["manifest_row"] == row)


def test_write_read_and_the_verdict_files_never_change(out):
    before = _digest(out)
    with running(create_app(open_archive(str(out)), reviewer="ann")) as url:
        c = Reviewer(url)
        page = c.page("run-1", 0).text
        assert 'id="review-form"' in page and "Not reviewed yet" in page and "as ann" in page
        r = c.review("run-1", 0, "real", note='<img src=x onerror="alert(1)"> looks real')
        assert r.status_code == 200 and r.url.endswith("/runs/run-1/items/0#review")
        assert 'id="review-value">real<' in r.text and "by <b class=\"id\">ann</b>" in r.text
        assert "<img src=x" not in r.text and "&lt;img src=x onerror=" in r.text
        st = c.state("run-1", 0)
        assert st["review"]["review"] == "real" and st["review"]["reviewer"] == "ann"
        assert st["review"]["uri"] == "/archive/cam0/clip-00000.mp4"
        assert st["review"]["model"] == "m@abc" and st["review"]["run_id"] == "run-1"
        assert st["state"] == ("overturned" if _verdict(out, "run-1", 0) == "fake"
                               else "confirmed")
        # The review belongs to the media id: run 2's row of it shows it too.
        assert c.state("run-2", 0)["review"]["review"] == "real"
        js = c.review("run-1", 6, "unsure", headers={"Accept": "application/json"})
        assert js.status_code == 201 and js.json()["review"] == "unsure"
    parts = sorted((out / "_reviews").glob("review-*.parquet"))
    assert len(parts) == 2
    rows = [r for p in parts for r in pq.read_table(p).to_pylist()]
    assert {r["review"] for r in rows} == {"real", "unsure"}
    assert set(rows[0]) == {"media_id", "uri", "fingerprint", "model", "run_id", "review",
                            "note", "reviewer", "reviewed_at"}
    assert _digest(out) == before  # no verdict file or summary was touched
    # A new server reads them back.
    with running(create_app(open_archive(str(out)))) as url:
        assert Reviewer(url).state("run-1", 0)["review"]["note"].endswith("looks real")


def test_filters_unreviewed_confirmed_overturned(out):
    with running(create_app(open_archive(str(out)))) as url:
        c = Reviewer(url)
        assert len(c.rows(review="unreviewed")) == 30 and not c.rows(review="confirmed")
        v = {i: _verdict(out, "run-1", i) for i in range(24)}
        fake = [i for i in range(24) if v[i] == "fake" and i >= 6][:2]
        real = [i for i in range(24) if v[i] == "real" and i >= 6][:2]
        no_verdict = [i for i in range(6, 24) if v[i] is None][0]
        for i in fake[:1] + real[:1]:
            assert c.review("run-1", i, v[i]).status_code == 200  # agree
        for i in fake[1:] + real[1:]:
            assert c.review("run-1", i, "real" if v[i] == "fake" else "fake").status_code == 200
        c.review("run-1", no_verdict, "fake")
        c.review("run-1", 0, "unsure")  # in both runs
        ids = {name: {(r["run_id"], int(r["manifest_row"])) for r in c.rows(review=name)}
               for name in ("unreviewed", "reviewed", "confirmed", "overturned", "unsure")}
        assert ids["confirmed"] == {("run-1", fake[0]), ("run-1", real[0])}
        assert ids["overturned"] == {("run-1", fake[1]), ("run-1", real[1])}
        assert ids["unsure"] == {("run-1", 0), ("run-2", 0)}
        assert len(ids["reviewed"]) == 7 and len(ids["unreviewed"]) == 23
        assert not ids["reviewed"] & ids["unreviewed"]
        # The pages select the same rows as the exports (masks and SQL agree).
        for name, want in ids.items():
            assert {(r, int(m)) for r, m in c.page_rows(review=name)} == want, name
        html = c.s.get(f"{url}/items", params={"review": "overturned"}, timeout=30).text
        assert html.count('data-review="overturned"') == 2
        assert '<option value="overturned" selected>' in html
        # Combined with other filters.
        assert {r["run_id"] for r in c.rows(review="unsure", model="m@def")} == {"run-2"}
        assert c.s.get(f"{url}/items", params={"review": "maybe"}, timeout=30).status_code == 400


def test_a_repeated_review_latest_wins_and_history_is_kept(out):
    with running(create_app(open_archive(str(out)), reviewer="ann")) as url:
        c = Reviewer(url)
        verdict = _verdict(out, "run-1", 8)
        other = "real" if verdict == "fake" else "fake"
        c.review("run-1", 8, verdict, note="first look")
        assert {(r, int(m)) for r, m in c.page_rows(review="confirmed")} == {("run-1", 8)}
        c.review("run-1", 8, other, note="second look")
        st = c.state("run-1", 8)
        assert st["review"]["note"] == "second look" and st["state"] == "overturned"
        assert [h["note"] for h in st["history"]] == ["second look", "first look"]
        assert not c.rows(review="confirmed")  # the filter follows the latest review
        assert [(r["run_id"], r["manifest_row"]) for r in c.rows(review="overturned")] == \
            [("run-1", "8")]
        page = c.page("run-1", 8).text
        history = page.split('id="review-history"')[1].split("</table>")[0]
        assert history.index("second look") < history.index("first look")
    assert len(list((out / "_reviews").glob("review-*.parquet"))) == 2


def test_refused_reviews_write_nothing(out):
    with running(create_app(open_archive(str(out)))) as url:
        c = Reviewer(url)
        csrf = c.csrf()
        for path in ("/runs/run-1/items/99999/review", "/runs/nope/items/0/review"):
            r = c.s.post(url + path, data={"csrf": csrf, "review": "fake"}, timeout=30)
            assert r.status_code == 404, (path, r.status_code)
        assert c.s.post(f"{url}/runs/run-1/items/x/review", data={"csrf": csrf,
                        "review": "fake"}, timeout=30).status_code == 400
        assert c.review("run-1", 0, "fake", csrf=None).status_code == 403  # no CSRF field
        r = c.review("run-1", 0, "fake", csrf="forged-token-value")
        assert r.status_code == 403 and "security token" in r.text
        r = c.review("run-1", 0, "fake", headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and "another site" in r.text
        bare = requests.post(f"{url}/runs/run-1/items/0/review",  # the field, no cookie
                             data={"csrf": csrf, "review": "fake"}, timeout=30)
        assert bare.status_code == 403
        r = c.review("run-1", 0, "maybe")
        assert r.status_code == 400 and "one of fake, real, unsure" in r.text
        assert c.review("run-1", 0, "fake", note="x" * 2001).status_code == 400
        r = c.review("run-1", 0, "fake", note="a\x00b", headers={"Accept": "application/json"})
        assert r.status_code == 400 and "control characters" in r.json()["error"]
        assert c.review("run-1", 0, "").status_code == 400
        assert c.state("run-1", 0)["review"] is None
    assert not (out / "_reviews").exists()


def test_the_token_is_needed_to_review(out):
    with running(create_app(open_archive(str(out)), token=TOKEN)) as url:
        anon = requests.post(f"{url}/runs/run-1/items/0/review", data={"review": "fake"},
                             timeout=30)
        assert anon.status_code == 401
        c = Reviewer(url, headers={"Authorization": f"Bearer {TOKEN}"})
        csrf = c.csrf()
        no_token = requests.post(f"{url}/runs/run-1/items/0/review",
                                 data={"csrf": csrf, "review": "fake"},
                                 cookies={"deepaudit_csrf": csrf}, timeout=30)
        assert no_token.status_code == 401
        assert c.review("run-1", 0, "fake", csrf=csrf).status_code == 200
        assert c.state("run-1", 0)["review"]["review"] == "fake"
    assert len(list((out / "_reviews").glob("*.parquet"))) == 1


def test_an_unwritable_review_folder_leaves_the_pages_read_only(out):
    (out / "_reviews").write_text("a file where the review folder must be")
    with running(create_app(open_archive(str(out)))) as url:
        c = Reviewer(url)
        page = c.page("run-1", 0)
        assert page.status_code == 200 and 'id="review-form"' not in page.text
        off = re.search(r'id="reviews-off">([^<]+)<', page.text)[1]
        assert "Read-only: reviews are off" in off and "_reviews" in off and "is a file" in off
        csrf = re.search(r"deepaudit_csrf", page.headers.get("set-cookie", ""))
        assert csrf
        r = c.s.post(f"{url}/runs/run-1/items/0/review",
                     data={"csrf": c.s.cookies["deepaudit_csrf"], "review": "fake"}, timeout=30)
        assert r.status_code == 503 and "reviews are off" in r.text
        for path in ("/runs", "/items", "/items?review=unreviewed", "/items.csv",
                     "/runs/run-1/items/3", "/runs/run-1"):
            assert c.s.get(url + path, timeout=30).status_code == 200, path
        assert c.s.get(f"{url}/healthz", timeout=30).json()["ok"]
    # The command starts too, and says so.
    assert (out / "_reviews").is_file()


def test_a_write_that_fails_later_is_a_clear_503(out):
    with running(create_app(open_archive(str(out)))) as url:
        c = Reviewer(url)
        assert c.review("run-1", 1, "fake").status_code == 200
        # The folder is swapped for a file under the running server.
        for p in (out / "_reviews").iterdir():
            p.unlink()
        (out / "_reviews").rmdir()
        (out / "_reviews").write_text("in the way")
        r = c.review("run-1", 2, "real")
        assert r.status_code == 503 and "could not be written" in r.text
        assert "nothing was saved" in r.text and 'id="review-form"' in r.text
        assert c.state("run-1", 2)["review"] is None
        assert c.page("run-1", 2).status_code == 200


def test_no_review_and_the_reviewer_name(out):
    with running(create_app(open_archive(str(out)), reviews=False)) as url:
        page = Reviewer(url).page("run-1", 0).text
        assert "--no-review" in page and 'id="review-form"' not in page
    with pytest.raises(ValueError):
        create_app(open_archive(str(out)), reviewer="two\nlines")
    result = runner.invoke(cli, ["serve", str(out), "--reviewer", "a\x01b"])
    assert result.exit_code == 2 and "reviewer name" in result.output
    assert "--reviewer" in runner.invoke(cli, ["serve", "--help"]).output


def test_hostile_notes_are_escaped_on_every_page(out):
    with running(create_app(open_archive(str(out)), reviewer="<b>eve</b>")) as url:
        c = Reviewer(url)
        c.review("run-1", 3, "fake", note=SCRIPT_ID)
        for path in ("/runs/run-1/items/3", "/items", "/items?review=reviewed"):
            html = c.s.get(url + path, timeout=30).text
            assert "<script>window" not in html and "<b>eve</b>" not in html, path
        assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in c.page("run-1", 3).text


def test_query_reviews_view_and_latest_review_column(out):
    with running(create_app(open_archive(str(out)), reviewer="ann")) as url:
        c = Reviewer(url)
        c.review("run-1", 0, "fake", note="1")
        c.review("run-1", 0, "real", note="2")
        c.review("run-1", 9, "unsure")
    t = run_query(str(out), "SELECT media_id, review, note, reviewer FROM reviews "
                            "ORDER BY reviewed_at").to_pylist()
    assert [(r["review"], r["note"]) for r in t] == [("fake", "1"), ("real", "2"),
                                                      ("unsure", None)]
    latest = run_query(str(out), "SELECT media_id, model, review FROM latest "
                                 "ORDER BY media_id, model").to_pylist()
    by = {(r["media_id"], r["model"]): r["review"] for r in latest}
    assert by[("cam0/clip-00000.mp4", "m@abc")] == "real"
    assert by[("cam0/clip-00000.mp4", "m@def")] == "real"
    assert by[("cam0/clip-00009.mp4", "m@abc")] == "unsure"
    assert sum(v is None for v in by.values()) == len(by) - 3
    assert len(latest) == 30  # run 2's ids are run 1's first six, with another model
    result = runner.invoke(cli, ["query", str(out), "SELECT review, count(*) AS n FROM latest "
                                 "GROUP BY ALL ORDER BY n DESC", "-f", "jsonl"])
    assert result.exit_code == 0 and '"review": "real"' in result.output
    # Without reviews: an empty view, a null column.
    bare = out.parent / "bare"
    write_run(bare, "run-1", verdict_rows("run-1", 5, seed=3))
    assert run_query(str(bare), "SELECT count(*) AS n FROM reviews").to_pylist() == [{"n": 0}]
    assert run_query(str(bare), "SELECT count(review) AS n FROM latest").to_pylist() == \
        [{"n": 0}]


def test_report_shows_the_precision_among_reviewed_flags(out):
    from deepaudit.pipeline.report import load_run, render_report
    from deepaudit.pipeline.reviews import ReviewStore, review_row

    assert 'id="reviews"' not in render_report(load_run(str(out), "run-1"))
    rows = pq.read_table(out / "runs" / "run-1" / "verdicts-00000.parquet").to_pylist()
    flagged = [r for r in rows if r["verdict"] == "fake"]
    store = ReviewStore(str(out))
    said = ["fake", "fake", "real", "unsure"]
    store.append([review_row(r, v, None, "ann") for r, v in zip(flagged, said)])
    store.append([review_row(flagged[2], "fake", "second look", "bob")])  # latest wins
    store.append([review_row(next(r for r in rows if r["verdict"] == "real"), "fake",
                             SCRIPT_ID, "ann")])  # not a flag: not counted
    section = render_report(load_run(str(out), "run-1")).split('id="reviews"')[1]
    section = section.split("</section>")[0]
    assert f"<td>flagged fake</td><td>{len(flagged)}</td>" in section
    assert "<td>reviewed</td><td>4</td>" in section
    assert "<b>1.000</b> (3 of 3)" in section and "<td>unsure</td><td>1</td>" in section
    store.append([review_row(flagged[0], "real", None, "ann")])
    section = render_report(load_run(str(out), "run-1")).split('id="reviews"')[1]
    assert "<b>0.667</b> (2 of 3)" in section


def test_the_command_starts_read_only_and_says_why(out, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import threading

    (out / "_reviews").write_text("in the way")
    exe = Path(sys.executable).parent / "deepaudit"
    env = {**os.environ, "TMPDIR": str(tmp_path), "NO_COLOR": "1", "COLUMNS": "300"}
    proc = subprocess.Popen([str(exe), "serve", str(out), "--port", "0", "--no-check",
                             "--reviewer", "ann"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        seen = []
        for line in proc.stderr:  # until the line with the link
            seen.append(line)
            if found := re.search(r"serving on (http://\S+?:\d+)", line):
                break
        else:
            raise AssertionError("serve did not start: " + "".join(seen)[-2000:])
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        text = "".join(seen)
        assert "note: reviews are off: the review folder" in text and "is a file" in text
        url = found[1].replace("localhost", "127.0.0.1")
        page = requests.get(f"{url}/runs/run-1/items/0", timeout=30)
        assert page.status_code == 200 and 'id="reviews-off"' in page.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    (out / "_reviews").unlink()
    proc = subprocess.Popen([str(exe), "serve", str(out), "--port", "0", "--no-check",
                             "--reviewer", "ann"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = next(ln for ln in proc.stderr if "reviews go to" in ln or "serving on" in ln)
        assert f"reviews go to {out}/_reviews as ann" in line
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


@pytest.mark.s3
def test_reviews_of_an_s3_output(s3_server, s3fs_client, tmp_path):
    from deepaudit.infra.storage import StorageConfig

    local = tmp_path / "out"
    write_run(local, "run-s3", verdict_rows("run-s3", 12, seed=5, prefix="s3://audit/media"))
    s3fs_client.put(str(local), "audit/review-out", recursive=True)
    storage = StorageConfig(endpoint_url=s3_server)
    archive = open_archive("s3://audit/review-out", storage)
    with running(create_app(archive, reviewer="ann")) as url:
        c = Reviewer(url)
        assert c.review("run-s3", 0, "fake", note="s3").status_code == 200
        assert c.state("run-s3", 0)["review"]["note"] == "s3"
    parts = s3fs_client.glob("audit/review-out/_reviews/review-*.parquet")
    assert len(parts) == 1 and not s3fs_client.glob("audit/review-out/_reviews/.*")
    got = run_query("s3://audit/review-out", "SELECT review FROM latest WHERE review IS NOT "
                    "NULL", storage).to_pylist()
    assert got == [{"review": "fake"}]
