"""The ``deepaudit`` command line: wiring only; each command lives in its own module."""

from __future__ import annotations

import typer

from deepaudit.jobs.audit_cmd import audit_command
from deepaudit.jobs.check import check_command
from deepaudit.jobs.demo_cmd import demo_command
from deepaudit.jobs.evaluate import evaluate_command
from deepaudit.jobs.manifest_cmd import manifest_command
from deepaudit.jobs.models_cmd import models_command
from deepaudit.jobs.query import query_command
from deepaudit.jobs.report import report_command
from deepaudit.jobs.serve_cmd import serve_command
from deepaudit.jobs.submit import job_logs_command, job_status_command, submit_command
from deepaudit.jobs.train_cmd import train_command

app = typer.Typer(
    name="deepaudit",
    help=(
        "Audit media archives for deepfakes. A Ray Data job: FFmpeg samples frames, "
        "RetinaFace crops faces on CPU actors, a CNN-LSTM (EfficientNet-Lite0 by default) "
        "scores each video on GPU actors (CPU when there is none); one verdict row per "
        "input lands in Parquet.\n\n"
        "New here? Run 'deepaudit demo' first (it builds a small archive and audits it), "
        "then 'deepaudit check FILE' on a file of your own."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

app.command("audit")(audit_command)
app.command("demo")(demo_command)
app.command("models")(models_command)
app.command("manifest")(manifest_command)
app.command("query")(query_command)
app.command("serve", short_help="Browse audit results in a web browser.")(serve_command)
app.command(
    "submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)(submit_command)
app.command("status")(job_status_command)
app.command("logs")(job_logs_command)
app.command("report", short_help="Write a self-contained HTML report of an audit run.")(
    report_command)
app.command("check", short_help="Check a few local files now, without a manifest or Ray.")(
    check_command)
app.command("train")(train_command)
app.command("evaluate")(evaluate_command)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
