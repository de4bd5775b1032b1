"""Issue 24: what a new user hits in the first hour, each case as the user typed it, with
the exact message and exit status expected."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepaudit.jobs.cli import app

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})


def one_line(result, code: int, *words: str) -> str:
    """The command printed one line (no traceback), exited ``code``, and said ``words``."""
    out = result.output
    assert result.exit_code == code, out
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out
    for w in words:
        assert w in lines[0], out
    return lines[0]


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """No AWS credentials anywhere botocore looks (environment, files, instance metadata)."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def wrong_credentials(monkeypatch):
    """The test server checks every request's signature: the test key is unknown to it."""
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)


def _s3_commands(endpoint: str, bucket: str = "audit") -> list[list[str]]:
    e = ["--s3-endpoint", endpoint]
    return [
        ["audit", f"s3://{bucket}/archive/", "-o", "out-unused", *e],
        ["audit", f"s3://{bucket}/m.csv", "-o", "out-unused", *e],
        ["manifest", f"s3://{bucket}/archive/", "-o", "m.parquet", *e],
        ["query", f"s3://{bucket}/out", "SELECT 1", *e],
        ["report", f"s3://{bucket}/out", "-o", "report.html", *e],
    ]


@pytest.mark.s3
def test_s3_input_without_credentials(s3_server, no_credentials, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in _s3_commands(s3_server):
        r = runner.invoke(app, argv)
        one_line(r, 2, argv[1], "no S3 credentials were found",
                 "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.s3
def test_s3_input_with_wrong_credentials(s3_server, wrong_credentials, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in _s3_commands(s3_server):
        r = runner.invoke(app, argv)
        one_line(r, 2, argv[1], "access denied", "check that the credentials")


@pytest.mark.s3
def test_s3_input_in_a_missing_bucket(s3_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in _s3_commands(s3_server, bucket="no-such-bucket"):
        r = runner.invoke(app, argv)
        one_line(r, 2, argv[1], "the bucket 'no-such-bucket' does not exist",
                 "check the bucket name")


def test_s3_input_with_an_unreachable_endpoint(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["audit", "s3://audit/m.csv", "-o", "out", "--s3-endpoint", endpoint])
    one_line(r, 2, "s3://audit/m.csv", "cannot be reached", "check --s3-endpoint")


def test_device_cuda_without_a_gpu_is_a_usage_error(tiny_model, media, tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.csv").write_text(f"uri\n{media['face_image']}\n")
    r = runner.invoke(app, ["audit", "m.csv", "-o", "out", "--device", "cuda",
                            "--model", str(tiny_model)])
    one_line(r, 2, "--device cuda: torch sees no CUDA device", "--device cpu")
    r = runner.invoke(app, ["check", str(media["face_image"]), "--device", "cuda",
                            "--model", str(tiny_model)])
    one_line(r, 2, "--device cuda: torch sees no CUDA device", "--device cpu")
    assert list(tmp_path.iterdir()) == [tmp_path / "m.csv"]  # no work, no files


@pytest.mark.ray
def test_a_run_error_is_plain_text_naming_the_root_cause(ray_local):
    from deepaudit.pipeline.audit import root_cause

    @ray_local.remote
    def broken():
        raise RuntimeError("device=cuda was asked for but torch sees no CUDA device")

    with pytest.raises(Exception) as info:
        ray_local.get(broken.remote())
    text = root_cause(info.value)
    assert text == "RuntimeError: device=cuda was asked for but torch sees no CUDA device"
    assert "\x1b" not in text and "\n" not in text


def test_check_writes_no_files_unless_asked(tiny_model, media, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["check", str(media["face_image"]), "--model", str(tiny_model),
                            "--threshold", "0.01"])
    assert r.exit_code == 1 and "FAKE" in r.output, r.output
    assert list(tmp_path.iterdir()) == []  # no ./deepaudit-evidence/


def test_a_missing_folder_says_it_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["audit", "archive/", "-o", "out"])
    one_line(r, 2, "archive/ does not exist")


def test_media_type_filters_manifests_and_folders(media, tmp_path):
    import shutil

    from deepaudit.infra.listing import ListingConfig, ListingStats
    from deepaudit.infra.storage import StorageConfig
    from deepaudit.pipeline.manifest import ManifestError, read_input

    folder = tmp_path / "archive"
    folder.mkdir()
    for name in ("face_video", "face_image", "face_png"):
        shutil.copy(media[name], folder / media[name].name)
    (folder / "notes.txt").write_text("not media\n")
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri\n" + "".join(f"{p}\n" for p in sorted(folder.iterdir())))
    videos = ListingConfig(media_types=("video",))
    # A manifest row whose type its name does not tell is kept (its verdict row says what
    # it is); a folder's non-media files were never items.
    for source, names in ((folder, ["face.mp4"]), (manifest, ["face.mp4", "notes.txt"])):
        stats = ListingStats()
        t = read_input(str(source), StorageConfig(), videos, stats)
        assert [Path(u).name for u in t["uri"].to_pylist()] == names, source
        # Rows keep their manifest position: the verdict writer needs it increasing.
        assert t["manifest_row"].to_pylist() == sorted(t["manifest_row"].to_pylist())
    stats = ListingStats()
    assert read_input(str(folder), StorageConfig(), None, stats).num_rows == 3
    assert stats.not_media == 1  # notes.txt: counted in the run summary
    only_txt = tmp_path / "t.csv"
    only_txt.write_text(f"uri\n{folder / 'face.jpg'}\n")
    with pytest.raises(ManifestError, match="has no video items"):
        read_input(str(only_txt), StorageConfig(), videos)


def test_fail_on_exit_codes():
    from deepaudit.jobs.audit_cmd import FailOn, exit_code

    s = {"state": "completed", "verdicts": {"fake": 1}, "status": {"error": 2}}
    assert exit_code(s, None) == 0  # the default: scheduled runs are not gates
    assert exit_code(s, FailOn.fake) == 4 and exit_code(s, FailOn.any) == 4
    assert exit_code(s, FailOn.error) == 3
    clean = {"state": "completed", "verdicts": {"fake": 0}, "status": {"error": 0}}
    assert all(exit_code(clean, f) == 0 for f in FailOn)
    assert exit_code({**clean, "state": "failed"}, None) == 1


def test_a_wide_table_is_printed_whole_into_a_pipe(capsys):
    from rich.table import Table

    from deepaudit.pipeline.terminal import print_table

    t = Table("slice", *(f"column{i}" for i in range(12)), "FPR", "last")
    t.add_row("media_type=video", *("0.123" for _ in range(12)), "0.050", "end")
    print_table(t)
    out = capsys.readouterr().out
    assert "last" in out and "end" in out and "…" not in out


def test_progress_rate_and_eta_settle_after_the_first_rows():
    from deepaudit.pipeline.terminal import RateEta

    now = [100.0]
    eta = RateEta(clock=lambda: now[0])
    assert eta.text(0, 50) == "starting"  # Ray starting: no rate yet
    now[0] = 130.0
    assert eta.text(1, 50) == "measuring"  # the first rows start the clock
    now[0] = 140.0
    assert eta.text(21, 51) == "2.00 items/s, ETA 0:00:15"


@pytest.mark.ray
def test_audit_of_a_folder_as_a_user_runs_it(ray_local, tiny_model, media, tmp_path, monkeypatch):
    """Items 5, 6, 7, 9, 10: one real audit of a folder with a stray text file."""
    import json
    import shutil

    import pyarrow.parquet as pq

    from deepaudit.pipeline.model_card import CARD_METADATA_KEY

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "archive" / "some" / "deep" / "folder" / "of" / "media"
    folder.mkdir(parents=True)
    for name in ("face_video", "face_image", "face_png"):
        shutil.copy(media[name], folder / media[name].name)
    (folder / "notes.txt").write_text("not media\n")
    r = runner.invoke(app, ["audit", "archive", "-o", "out", "--model", str(tiny_model),
                            "--frames", "2", "--threshold", "0.01", "--fail-on", "fake",
                            "--top", "2"])
    assert r.exit_code == 4, r.output  # --fail-on fake, and something was flagged
    text = " ".join(r.output.split())
    assert "3/3" in text, r.output  # the progress bar, with its total
    assert "skipped │ 1 not media" in text, r.output
    assert "top 2 flagged (of 3)" in text, r.output
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["skipped"] == {"not_media": 1, "excluded": 0}
    assert [t["p_fake"] for t in summary["top_flagged"]] == sorted(
        (t["p_fake"] for t in summary["top_flagged"]), reverse=True)
    # Item 5: the model card summary rides in each verdict file's key-value metadata.
    (vfile,) = (tmp_path / "out" / "runs" / summary["run_id"]).glob("verdicts-*.parquet")
    card = json.loads(pq.read_schema(vfile).metadata[CARD_METADATA_KEY.encode()])
    assert card["model"] == summary["model"] and "out_of_domain_auc" in card
    assert card["caveat"] == summary["model_quality"]["caveat"]
    # Item 6: query's table keeps the end of long paths (the file name).
    r = runner.invoke(app, ["query", "out", "SELECT media_id, uri, evidence, status, verdict, "
                            "model, run_id, error FROM latest ORDER BY media_id"])
    assert r.exit_code == 0, r.output
    for name in ("face.jpg", "face.mp4", "face.png"):
        assert name in r.output, r.output
    assert re.search(r"…[^ │]*face\.jpg", r.output), r.output  # cut at the start
    assert "--format csv prints them whole" in r.output


def test_help_names_the_first_step():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "Run 'deepaudit demo' first" in text and "'deepaudit check FILE'" in text


def test_an_unknown_media_type_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["audit", ".", "-o", "out", "--media-type", "audio"])
    one_line(r, 2, "--media-type must be video or image, got audio")


def test_every_ffmpeg_gets_nostdin():
    from deepaudit.pipeline.media import no_stdin

    assert no_stdin(["ffmpeg", "-i", "x.mp4", "pipe:"]) == ["ffmpeg", "-nostdin", "-i", "x.mp4",
                                                            "pipe:"]
    assert no_stdin(["/usr/bin/ffmpeg", "-nostdin", "-i", "x"]).count("-nostdin") == 1
    assert no_stdin(["ffprobe", "-v", "error", "x"]) == ["ffprobe", "-v", "error", "x"]
