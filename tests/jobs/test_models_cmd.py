"""``deepaudit models`` prints every model name whole at 80 columns: through CliRunner, a
pipe and a real terminal (issue 31: the names were cut to ``clip_effnet_f…``)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest
from typer.testing import CliRunner

from deepaudit.jobs.cli import app
from deepaudit.models.checkpoint import resolve_model
from deepaudit.models.registry import list_models

ENTRY = [sys.executable, "-c", "from deepaudit.jobs.cli import app; app()", "models"]


def _assert_names_whole(output: str) -> None:
    assert "…" not in output, output
    starts = {line.split()[0] for line in output.splitlines() if line.strip()}
    starts |= {line.strip("│┃ ").split()[0] for line in output.splitlines()
               if line.strip("│┃ ").strip()}
    missing = [name for name in list_models() if name not in starts]
    assert not missing, f"names not printed whole: {missing}\n{output}"
    default = resolve_model(None).name
    assert any(line.strip("│┃ ").startswith(f"{default} (default)")
               for line in output.splitlines()), output


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return {**env, "NO_COLOR": "1", **extra}


@pytest.mark.parametrize("columns", ["80", "60"])
def test_names_whole_through_clirunner(columns):
    r = CliRunner(env={"COLUMNS": columns, "NO_COLOR": "1", "TERM": "dumb"}).invoke(
        app, ["models"])
    assert r.exit_code == 0, r.output
    _assert_names_whole(r.output)
    width = int(columns)
    long_lines = [ln for ln in r.output.splitlines()
                  if len(ln) > width and not any(ln.startswith(f"{n}:") for n in list_models())]
    assert not long_lines, long_lines  # only the caveats run on (the terminal wraps them)


def test_wide_terminal_keeps_the_table():
    r = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}).invoke(
        app, ["models"])
    assert r.exit_code == 0, r.output
    assert "ROC AUC on unseen sources" in r.output and "┃ name" in r.output
    _assert_names_whole(r.output)


@pytest.mark.parametrize("columns", ["80", None])
def test_names_whole_through_a_pipe(columns):
    env = _env(**({"COLUMNS": columns} if columns else {}))
    done = subprocess.run(ENTRY, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    _assert_names_whole(done.stdout)


def test_names_whole_on_an_80_column_terminal():
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        proc = subprocess.Popen(ENTRY, env=_env(TERM="xterm"), stdin=follower,
                                stdout=follower, stderr=subprocess.PIPE)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    finally:
        os.close(leader)
    text = re.sub(r"\x1b\[[0-9;]*m", "", b"".join(chunks).decode())  # colour and bold
    _assert_names_whole(text.replace("\r\n", "\n"))
