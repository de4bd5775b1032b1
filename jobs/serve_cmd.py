"""``deepaudit serve OUT_OR_LEDGER``: options in, the web app of :mod:`deepaudit.serve`
out: browse what an audit found, in a web browser.

Pages: the runs; one run (summary, counts, score histogram, ROC with labels); the items
(filter, sort, keyset pages, export as CSV or Parquet); one item (metadata, frame scores,
face boxes, evidence, history across runs and models); and Check a file (an upload
through ``deepaudit check``'s code, with the model loaded once at start). Needs
``pip install 'deepaudit[serve]'``. See docs/serve.md.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Optional

import typer

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def serve_command(
    target: Annotated[str, typer.Argument(
        metavar="OUT_OR_LEDGER", show_default=False,
        help="An audit output folder (all its runs) or a ledger, local or s3://.")],
    host: Annotated[str, typer.Option(
        help="Address to listen on. Anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8765,
    token: Annotated[Optional[str], typer.Option(
        envvar="DEEPAUDIT_SERVE_TOKEN", show_envvar=True,
        help="Require this token (16+ visible characters) on every request (Bearer header, "
             "or the link printed when stderr is a terminal, "
             "which sets a cookie). Required with a non-loopback --host.")] = None,
    model: Annotated[Optional[str], typer.Option(
        metavar="NAME|PATH", help="Model for Check a file (default: the shipped one).")] = None,
    threshold: Annotated[Optional[float], typer.Option(
        metavar="P", help="Fake threshold for Check a file (default: the card's).")] = None,
    check: Annotated[bool, typer.Option(
        help="Offer Check a file (loads the model and face detector once, at start).")] = True,
    max_upload_mb: Annotated[int, typer.Option(
        min=1, max=4096, metavar="MB", help="Largest upload for Check a file.")] = 100,
    uploads_per_minute: Annotated[int, typer.Option(
        min=1, metavar="N", help="Uploads per client address per minute.")] = 10,
    s3_endpoint: Annotated[Optional[str], typer.Option(
        metavar="URL", help="S3 endpoint URL (overrides AWS_ENDPOINT_URL).")] = None,
    allowed_host: Annotated[Optional[list[str]], typer.Option(
        metavar="NAME[:PORT]",
        help="Another Host name to answer to (a proxy's), besides localhost, 127.0.0.1, "
             "[::1] and --host; repeatable.")] = None,
    forwarded_allow_ips: Annotated[Optional[str], typer.Option(
        metavar="IPS",
        help="Trust X-Forwarded-For/-Proto from these proxy addresses (comma-separated); "
             "never trusted by default.")] = None,
    reviewer: Annotated[Optional[str], typer.Option(
        metavar="NAME", help="Name recorded with each review (default: the OS user name).")]
    = None,
    review: Annotated[bool, typer.Option(
        help="Let reviewers mark items fake, real or unsure (written to OUT_OR_LEDGER/"
             "_reviews/; --no-review: read-only).")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every request.")] = False,
) -> None:
    """Browse an audit's verdicts in a web browser: runs, items (filter, sort, export),
    each item's evidence, history and review, and check a file by upload. It never changes
    a verdict: reviews go to their own _reviews/ folder."""
    from rich.console import Console
    from rich.markup import escape

    from deepaudit.jobs.logs import setup_logging

    setup_logging(verbose)
    err = Console(stderr=True)
    if host not in LOOPBACK and not token:
        err.print(f"[red]error:[/red] --host {escape(host)} is reachable from other machines: "
                  "give --token TOKEN (for example --token "
                  f"{secrets.token_urlsafe(18)}) or bind 127.0.0.1", soft_wrap=True)
        raise typer.Exit(2)
    try:
        import jinja2  # noqa: F401
        import python_multipart  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        err.print(f"[red]error:[/red] deepaudit serve needs its extra: pip install "
                  f"'deepaudit\\[serve]' ({escape(str(exc))})", soft_wrap=True)
        raise typer.Exit(2) from None
    from deepaudit.pipeline.reviews import ReviewError, check_reviewer
    from deepaudit.serve.security import HostCheck, token_problem

    if token is not None and token_problem(token):
        err.print(f"[red]error:[/red] {escape(token_problem(token))}", soft_wrap=True)
        raise typer.Exit(2)
    try:
        HostCheck(host, allowed_host)
        if reviewer is not None:
            check_reviewer(reviewer)
    except (ValueError, ReviewError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    import shutil
    import signal
    import sys

    from deepaudit.serve.server import make_upload_root

    # uvicorn re-raises the signal that stopped it once it has shut down; SIGTERM's default
    # action would then end the process before the upload folder is removed (SIGINT's
    # KeyboardInterrupt runs the finally). Exit through Python on SIGTERM too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    upload_root = make_upload_root()  # private (0700): uploads only; stale ones swept
    try:
        _serve(target, host, port, token, model, threshold, check, max_upload_mb,
               uploads_per_minute, s3_endpoint, verbose, upload_root, err,
               allowed_host or [], forwarded_allow_ips, reviewer, review)
    finally:
        shutil.rmtree(upload_root, ignore_errors=True)


def _serve(target, host, port, token, model, threshold, check, max_upload_mb,
           uploads_per_minute, s3_endpoint, verbose, upload_root, err, allowed_hosts,
           forwarded_allow_ips, reviewer, review) -> None:
    import socket
    import sys

    import uvicorn
    from rich.markup import escape

    from deepaudit.infra.storage import StorageConfig
    from deepaudit.pipeline.query import QueryError
    from deepaudit.serve.app import create_app
    from deepaudit.serve.data import open_archive
    from deepaudit.serve.server import server_config

    try:
        with err.status(f"reading {escape(target)}..."):
            archive = open_archive(target, StorageConfig(endpoint_url=s3_endpoint))
        checker = None
        if check:
            from deepaudit.pipeline.check import Checker

            with err.status("loading the model and face detector for Check a file..."):
                checker = Checker(model=model, threshold=threshold,
                                  evidence_dir=f"{upload_root}/evidence")
    except (QueryError, ValueError, FileNotFoundError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    app = create_app(archive, token=token, checker=checker, max_upload_mb=max_upload_mb,
                     uploads_per_minute=uploads_per_minute, upload_root=upload_root,
                     host=host, allowed_hosts=allowed_hosts, reviewer=reviewer,
                     reviews=review)
    # Bind here, so that the printed link has the real port (also with --port 0).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    except OSError as exc:
        sock.close()
        err.print(f"[red]error:[/red] cannot listen on {escape(host)}:{port} ({escape(str(exc))})",
                  soft_wrap=True)
        raise typer.Exit(2) from None
    port = sock.getsockname()[1]
    site = app.state.site
    if site.reviews_off:
        err.print(f"[yellow]note:[/yellow] {escape(site.reviews_off)}; the pages are read-only",
                  soft_wrap=True)
    else:
        err.print(f"reviews go to {escape(site.review_store.uri)} as "
                  f"{escape(site.reviewer)}", soft_wrap=True)
    shown = "localhost" if host in LOOPBACK else (f"[{host}]" if ":" in host else host)
    link = f"http://{shown}:{port}/runs"
    # The token only on a terminal: a stderr kept elsewhere (a service's journal, a log
    # file) would keep the secret too.
    on_terminal = sys.stderr.isatty()
    opened = f"{link}?token={token}" if token and on_terminal else link
    err.print(f"{archive.n_items} verdict rows in {len(archive.runs)} run(s) from "
              f"{escape(target)}; serving on {escape(opened)} (Ctrl-C stops)", soft_wrap=True)
    if token and not on_terminal:
        err.print("open it with the token given to --token (or DEEPAUDIT_SERVE_TOKEN): "
                  f"{escape(link)}?token=TOKEN once in a browser (it sets a cookie), or "
                  "the header Authorization: Bearer TOKEN; not printed here, as this "
                  "output is not a terminal", soft_wrap=True)
    config = server_config(app, host=host, port=port, verbose=verbose,
                           forwarded_allow_ips=forwarded_allow_ips)
    uvicorn.Server(config).run(sockets=[sock])
