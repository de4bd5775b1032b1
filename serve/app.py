"""The ``deepaudit serve`` web application (Starlette + Jinja2, no script on any page):
:func:`create_app` puts together the pages (``runs_page``, ``items_page``, ``export``,
``item_page``, ``review_page``, ``check_page``: each a ``routes(site)``), the error pages
and the guard.

Security (see :mod:`.security` and docs/serve.md, "Security model"):

* :class:`~.security.Guard` checks every request's Host (DNS rebinding), the token when
  there is one, and the request size, and puts the security headers on every reply;
* files are served only when a verdict row names them (its evidence strip and JSON),
  resolved under ``OUT/evidence/`` of the row's run; no route takes a path; source media
  is drawn (never served) only from local paths and the buckets the output names;
* every page is a Jinja template with autoescape on; a Content-Security-Policy allows
  nothing but this origin's CSS and images; CSV exports neutralise spreadsheet formulas;
* the upload (to a private temp dir, removed after each request) needs an Origin of this
  server (or Sec-Fetch-Site: same-origin) and a CSRF token this server signed (form field
  and SameSite=Strict cookie), is capped in size before it is read, sniffed by content,
  and rate-limited per client;
* a review (the only write to the target: a new part in its ``_reviews/``) needs the same
  Origin and CSRF token, is rate-limited per client, and is refused (410) once its run or
  the output was removed; notes refuse control and bidi characters and are escaped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from deepaudit.pipeline.reviews import ReviewStore, check_reviewer
from deepaudit.serve import (
    check_page,
    export,
    item_page,
    items_page,
    review_page,
    runs_page,
)
from deepaudit.serve.common import BadRequest, Gone, NotFound, Unavailable
from deepaudit.serve.data import Archive
from deepaudit.serve.export import neutralise  # noqa: F401 (re-exported)
from deepaudit.serve.security import (  # noqa: F401 (sniff: re-exported)
    Guard,
    HostCheck,
    RateLimiter,
    sniff,
    token_problem,
)
from deepaudit.serve.site import Site

log = logging.getLogger(__name__)
HERE = Path(__file__).parent


def default_reviewer() -> str:
    """The OS user name (``--reviewer``'s default)."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        return f"uid-{os.getuid()}"


def review_setup(archive: Archive, enabled: bool) -> tuple[ReviewStore | None, str | None]:
    """Where this server writes reviews, or why it does not (the pages say so)."""
    if not enabled:
        return None, "reviews are off on this server (started with --no-review)"
    store = ReviewStore(archive.target, archive.storage)
    problem = store.problem()
    if problem:
        log.info("serve: reviews are off: %s", problem)
        return None, f"reviews are off: {problem}"
    return store, None


def create_app(archive: Archive, token: str | None = None, checker=None,
               max_upload_mb: int = 100, uploads_per_minute: int = 10,
               upload_root: str | None = None, host: str = "127.0.0.1",
               allowed_hosts: list[str] | None = None, body_idle_s: float = 15.0,
               body_total_s: float | None = None, reviewer: str | None = None,
               reviews: bool = True) -> Guard:
    """The web app over ``archive``, bound to ``host`` (which, with ``allowed_hosts``,
    says which Host headers name it); ``checker`` (a :class:`deepaudit.jobs.check.Checker`)
    enables the Check-a-file page. A request body must keep coming (``body_idle_s``) and
    end within ``body_total_s`` (default: 60 s, or 1 s per MB of the upload cap).
    Reviews are written to the target's ``_reviews/`` as ``reviewer`` (default: the OS user
    name); with ``reviews=False``, or when that folder cannot be written, the pages are
    read-only and say why."""
    if token is not None and token_problem(token):
        raise ValueError(token_problem(token))
    hosts = HostCheck(host, allowed_hosts)
    css = (HERE / "static" / "serve.css").read_text()
    from deepaudit.pipeline.render import CSS as REPORT_CSS

    stylesheet = REPORT_CSS + css
    max_upload = max_upload_mb * 2**20
    owns_root = upload_root is None
    if owns_root:
        from deepaudit.serve.server import make_upload_root

        upload_root = make_upload_root()
    os.makedirs(upload_root, mode=0o700, exist_ok=True)
    os.chmod(upload_root, 0o700)
    site = Site(archive=archive, hosts=hosts, limiter=RateLimiter(uploads_per_minute),
                upload_root=upload_root, max_upload=max_upload, checker=checker)
    site.review_store, site.reviews_off = review_setup(archive, reviews)
    site.reviewer = check_reviewer(reviewer or default_reviewer())

    def error_page(request: Request, status: int, message: str, headers=None):
        # A JSON client (a review posted with Accept: application/json, reviews.json) gets
        # JSON; a picture or a download plain text; a page the error page.
        if request.headers.get("accept", "").startswith("application/json") or \
                request.url.path.endswith(".json"):
            return JSONResponse({"error": message}, status_code=status, headers=headers)
        if request.url.path.endswith((".png", ".jpg", ".csv", ".parquet")):
            return PlainTextResponse(f"{status}: {message}", status_code=status,
                                     headers=headers)
        resp = site.render(request, "error.html", status=status, status_code=status,
                           message=message)
        resp.headers.update(headers or {})
        return resp

    async def bad_request(request, exc):
        return error_page(request, 400, str(exc))

    async def not_found(request, exc):
        return error_page(request, 404, str(exc))

    async def gone(request, exc):
        return error_page(request, 410, str(exc))

    async def unavailable(request, exc):
        return error_page(request, 503, str(exc))

    async def http_error(request, exc):  # a 405 keeps its Allow
        return error_page(request, exc.status_code, str(exc.detail), exc.headers)

    async def internal(request, exc):
        log.exception("serve: %s %s failed", request.method, request.url.path)
        return error_page(request, 500, f"internal error ({type(exc).__name__}); see the "
                          "server's log")

    def style(request: Request):
        return Response(stylesheet, media_type="text/css")  # no-store, as every reply

    def health(request: Request):
        return JSONResponse({"ok": True, "items": archive.n_items, "runs": len(archive.runs)})

    routes = [Route("/", lambda r: RedirectResponse("/runs", 303)),
              *runs_page.routes(site), *items_page.routes(site), *export.routes(site),
              *review_page.routes(site), *item_page.routes(site), *check_page.routes(site),
              Route("/static/style.css", style), Route("/healthz", health)]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:  # a folder this app made is removed when the server stops
            if owns_root:
                shutil.rmtree(upload_root, ignore_errors=True)

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        BadRequest: bad_request, Gone: gone, NotFound: not_found, Unavailable: unavailable,
        HTTPException: http_error, Exception: internal})
    app.state.upload_root = upload_root
    app.state.archive = archive
    app.state.site = site

    wrapped = Guard(app, token, max_upload, hosts, body_idle_s=body_idle_s,
                    body_total_s=body_total_s or max(60.0, float(max_upload_mb)))
    wrapped.state = app.state  # for tests
    wrapped.upload_root = upload_root
    return wrapped
