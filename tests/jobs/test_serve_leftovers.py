"""``deepaudit serve`` after round 2 (issue 31 item 2): a note's characters are refused by
the library's one rule (pipeline/reviews.py), and the ``?token=`` link is printed only to a
terminal, never to a stderr that is kept (a pipe, a service's journal)."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from deepaudit.pipeline.reviews import ReviewError, read_reviews, text_problem
from deepaudit.serve.app import create_app
from deepaudit.serve.data import open_archive
from tests.jobs.serve_helpers import running, verdict_rows, write_run

TOKEN = "leftover-token-0123456789"


@pytest.fixture
def out(tmp_path) -> Path:
    out = tmp_path / "out"
    write_run(out, "run-1", verdict_rows("run-1", 12, seed=5))
    return out


# ---------------------------------------------------------------------- 1. one rule

@pytest.mark.parametrize("char", ["\u202e", "\u2067"])
def test_serve_refuses_a_bidi_note_with_the_librarys_rule(out, char):
    note = f"ok {char}txt.exe"
    with running(create_app(open_archive(str(out)))) as url:
        s = requests.Session()
        s.headers["Origin"] = url
        page = s.get(f"{url}/runs/run-1/items/2", timeout=30)
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)[1]
        r = s.post(f"{url}/runs/run-1/items/2/review", timeout=30,
                   data={"csrf": csrf, "review": "fake", "note": note},
                   headers={"Accept": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"] == text_problem(note)  # the library's words: one rule
    assert read_reviews(str(out)).num_rows == 0
    # The reviewer name, the other text a review holds, follows the same rule.
    with pytest.raises(ReviewError, match="reviewer name"):
        create_app(open_archive(str(out)), reviewer=f"ann{char}x",
                   upload_root=str(out.parent / "uploads"))


# ---------------------------------------------------------------------- 2. the link

def _serve(out: Path, tmp: Path, stderr) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "deepaudit"
    env = {**os.environ, "TMPDIR": str(tmp), "NO_COLOR": "1", "COLUMNS": "300",
           "DEEPAUDIT_SERVE_TOKEN": TOKEN}  # as a service passes it
    env.pop("FORCE_COLOR", None)
    return subprocess.Popen([str(exe), "serve", str(out), "--port", "0", "--no-check"],
                            stderr=stderr, stdout=subprocess.DEVNULL, env=env)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def test_a_piped_stderr_gets_the_link_without_the_token(out, tmp_path):
    proc = _serve(out, tmp_path, subprocess.PIPE)
    seen: list[str] = []
    drain = threading.Thread(target=lambda: seen.extend(x.decode() for x in proc.stderr),
                             daemon=True)
    drain.start()  # never blocks the server on a full pipe, nor the test on a silent one
    try:
        deadline = time.monotonic() + 120
        while not any("open it with" in ln for ln in seen):
            joined = "".join(seen)
            assert "serving on" not in joined or TOKEN not in joined, joined[-2000:]
            assert time.monotonic() < deadline and proc.poll() is None, joined[-2000:]
            time.sleep(0.1)
        line = next(ln for ln in seen if "serving on" in ln)
        link = re.search(r"serving on (http://\S+)", line)[1]
        assert link.endswith("/runs") and "token" not in link
        hint = next(ln for ln in seen if "open it with" in ln)
        assert "--token" in hint and "Authorization: Bearer TOKEN" in hint
        # The way in it names works with the token the operator passed.
        url = link.replace("localhost", "127.0.0.1")
        assert requests.get(url, timeout=30).status_code == 401
        assert requests.get(f"{url}?token={TOKEN}", timeout=30).status_code == 200
    finally:
        _stop(proc)
    drain.join(timeout=10)
    assert TOKEN not in "".join(seen)


def test_a_terminal_gets_the_link_with_the_token(out, tmp_path):
    master, slave = pty.openpty()
    proc = _serve(out, tmp_path, slave)
    os.close(slave)
    text = ""
    try:
        deadline = time.monotonic() + 120
        while "Ctrl-C stops" not in text:
            assert time.monotonic() < deadline and proc.poll() is None, text[-2000:]
            if select.select([master], [], [], 1)[0]:
                text += os.read(master, 4096).decode(errors="replace")
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)  # a terminal gets styles
        link = re.search(r"serving on (http://\S+)", text)[1]
        assert link.endswith(f"/runs?token={TOKEN}")
        assert "open it with" not in text
        r = requests.get(link.replace("localhost", "127.0.0.1"), timeout=30)
        assert r.status_code == 200
    finally:
        _stop(proc)
        os.close(master)
