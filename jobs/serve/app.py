"""The ``deepaudit serve`` web application (Starlette + Jinja2, no script on any page).

Security, in one place:

* a token (``--token``), when set, is checked on every request with
  :func:`hmac.compare_digest`: ``Authorization: Bearer``, a ``?token=`` link (which sets
  an HttpOnly cookie and redirects to the same page without it), or that cookie;
* files are served only when a verdict row names them (its evidence strip and JSON),
  resolved under ``OUT/evidence/`` of the row's run; no route takes a path;
* every page is a Jinja template with autoescape on; a Content-Security-Policy allows
  nothing but this origin's CSS and images;
* the upload (the only write, to a private temp dir, removed after each request) needs a
  CSRF token (double-submit cookie, SameSite=Strict, and Origin checked), is capped in
  size before it is read, sniffed by content, and rate-limited per client.
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections import defaultdict, deque
from pathlib import Path
from urllib.parse import urlencode

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from deepaudit.jobs.serve.data import (
    LIST_SHOWN,
    LRU,
    STATUSES,
    VERDICTS,
    Archive,
    BadRequest,
    ItemQuery,
    NotFound,
)

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
TOKEN_COOKIE, CSRF_COOKIE = "deepaudit_token", "deepaudit_csrf"
CSP = ("default-src 'none'; img-src 'self' data:; style-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
# (magic bytes at offset, offset, extension, kind); ISO BMFF (mp4/mov) has "ftyp" at 4.
SNIFF = [(b"\xff\xd8\xff", 0, ".jpg", "image"), (b"\x89PNG\r\n\x1a\n", 0, ".png", "image"),
         (b"BM", 0, ".bmp", "image"), (b"WEBP", 8, ".webp", "image"),
         (b"ftyp", 4, ".mp4", "video"), (b"\x1aE\xdf\xa3", 0, ".mkv", "video"),
         (b"AVI ", 8, ".avi", "video")]


def sniff(head: bytes) -> tuple[str, str] | None:
    """(extension, kind) of an upload from its first bytes, or None when it is neither a
    supported image nor a supported video container."""
    for magic, at, ext, kind in SNIFF:
        if head[at:at + len(magic)] == magic:
            if ext == ".webp" and head[:4] != b"RIFF":
                continue
            if ext == ".avi" and head[:4] != b"RIFF":
                continue
            return ext, kind
    return None


class RateLimiter:
    """At most ``n`` events per ``window_s`` per client."""

    def __init__(self, n: int, window_s: float = 60.0) -> None:
        self.n, self.window = n, window_s
        self.events: dict[str, deque] = defaultdict(deque)
        self.lock = threading.Lock()

    def allow(self, client: str) -> float:
        """0 when allowed (and counted), else seconds until the next one is."""
        now = time.monotonic()
        with self.lock:
            q = self.events[client]
            while q and now - q[0] > self.window:
                q.popleft()
            if len(q) >= self.n:
                return self.window - (now - q[0])
            q.append(now)
            return 0.0


class Guard:
    """Pure ASGI middleware: token check, request size cap, security headers."""

    def __init__(self, app, token: str | None, max_upload: int) -> None:
        self.app, self.token, self.max_upload = app, token, max_upload

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        if self.token is not None:
            given = _given_token(request)
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                resp = PlainTextResponse(
                    "401: this server needs its token: open the link it printed (?token=...) "
                    "or send 'Authorization: Bearer TOKEN'", status_code=401,
                    headers={"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, send)
            if "token" in request.query_params and request.method == "GET":
                rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
                url = request.url.path + ("?" + urlencode(rest) if rest else "")
                resp = RedirectResponse(url, status_code=303)
                resp.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
                return await resp(scope, receive, send)
        limit = self.max_upload + 64 * 1024  # the multipart envelope around the file
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            resp = PlainTextResponse(f"413: uploads are limited to {self.max_upload // 2**20} MB",
                                     status_code=413)
            return await resp(scope, receive, send)
        seen = 0

        async def capped_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"uploads are limited to "
                                             f"{self.max_upload // 2**20} MB")
            return message

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                for k, v in ((b"content-security-policy", CSP.encode()),
                             (b"x-content-type-options", b"nosniff"),
                             (b"x-frame-options", b"DENY"),
                             (b"referrer-policy", b"same-origin"),
                             (b"cache-control", b"no-store")):
                    if not any(h[0].lower() == k for h in headers):
                        headers.append((k, v))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, capped_receive, send_with_headers)


def _given_token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE)


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")),
                             autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)

    def fmt(v, digits: int = 3):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        if hasattr(v, "strftime"):
            return v.strftime("%Y-%m-%d %H:%M:%S")
        return v

    env.filters["fmt"] = fmt
    env.filters["short"] = lambda v, n=80: v if v is None or len(str(v)) <= n else \
        str(v)[: n - 1] + "…"
    return env


def create_app(archive: Archive, token: str | None = None, checker=None,
               max_upload_mb: int = 100, uploads_per_minute: int = 10,
               upload_root: str | None = None) -> Starlette:
    """The web app over ``archive``; ``checker`` (a :class:`deepaudit.jobs.check.Checker`)
    enables the Check-a-file page."""
    env = _env()
    css = (HERE / "static" / "serve.css").read_text()
    from deepaudit.jobs.report import CSS as REPORT_CSS

    stylesheet = REPORT_CSS + css
    max_upload = max_upload_mb * 2**20
    limiter = RateLimiter(uploads_per_minute)
    check_lock = threading.Lock()
    upload_root = upload_root or tempfile.mkdtemp(prefix="deepaudit-serve-")
    os.makedirs(upload_root, mode=0o700, exist_ok=True)
    os.chmod(upload_root, 0o700)
    figures: dict = {}
    page_cache = LRU(512)

    def render(request: Request, name: str, status: int = 200, **ctx) -> HTMLResponse:
        ctx.setdefault("models_quality", [])
        html = env.get_template(name).render(
            request=request, target=archive.target, n_items=archive.n_items,
            is_ledger=archive.is_ledger, has_check=checker is not None, **ctx)
        return HTMLResponse(html, status_code=status)

    def quality_for(models) -> list[dict]:
        return [{"model": m, **archive.quality(m)} for m in models if m]

    def png(data: bytes | None, mime: str = "image/png") -> Response:
        if data is None:
            raise NotFound("no picture for this")
        return Response(data, media_type=mime, headers={"Cache-Control": "private, max-age=600"})

    # ------------------------------------------------------------------ pages

    def runs_page(request: Request):
        runs = archive.run_list()
        return render(request, "runs.html", runs=runs,
                      models_quality=quality_for(archive.models))

    def run_page(request: Request):
        run_id = request.path_params["run_id"]
        run = archive.run(run_id)
        scores, labels = archive.scores(run_id)
        model = run["row"].get("model") or run["summary"].get("model")
        return render(request, "run.html", run=run, run_id=run_id, n_scores=len(scores),
                      has_roc=labels is not None and 0 < sum(v for v in labels if v) <
                      sum(v is not None for v in labels),
                      models_quality=quality_for([model]))

    def run_figure(request: Request):
        from deepaudit.jobs.report import histogram_figure, roc_figure

        run_id, kind = request.path_params["run_id"], request.path_params["kind"]
        if kind not in ("histogram", "roc"):
            raise NotFound(f"no figure {kind!r}: there are histogram.png and roc.png")
        run = archive.run(run_id)
        key = (run_id, kind)
        if key not in figures:
            scores, labels = archive.scores(run_id)
            thr = run["summary"].get("threshold")
            if thr is None and scores:
                thr = archive.scalar("SELECT any_value(threshold) FROM items WHERE run_id = ?",
                                     [run_id])
            figures[key] = (histogram_figure(scores, labels, thr) if kind == "histogram"
                            else roc_figure(scores, labels))
        return png(figures[key])

    def items_page(request: Request):
        # The snapshot never changes while the server runs: a page already rendered for the
        # same parameters is served again (reviewers share links, go back and forth).
        q = ItemQuery.parse(request.query_params)
        key = tuple(sorted((k, v) for k, v in request.query_params.multi_items()
                           if k != "token"))
        html = page_cache.get(key, lambda: items_html(request, q))
        return HTMLResponse(html)

    def items_html(request: Request, q: ItemQuery) -> str:
        page = archive.page(q)
        filters = q.filters()

        def link(**changes):
            params = {**filters, "sort": q.sort, "order": q.order}
            if q.limit != 50:
                params["limit"] = q.limit
            params.update(changes)
            return "?" + urlencode({k: v for k, v in params.items() if v is not None})

        def sort_link(col):
            order = "asc" if (q.sort == col and q.order == "desc") else \
                "desc" if q.sort == col else ("desc" if col in ("p_fake", "audited_at",
                                                                 "margin") else "asc")
            return link(sort=col, order=order)

        models = sorted({r["model"] for r in page.rows if r["model"]}) or archive.models
        nav = {
            "first": link() if (q.after or q.before is not None) else None,
            "prev": link(before=page.prev_cursor,
                         start=max(0, page.first_row - 1 - q.limit)) if page.prev_cursor else None,
            "next": link(after=page.next_cursor, start=page.first_row - 1 + len(page.rows))
            if page.next_cursor else None,
            "last": link(before="end") if page.next_cursor else None,
        }
        export = {fmt: f"/items.{fmt}{link()}" for fmt in ("csv", "parquet")}
        return render(request, "items.html", q=q, page=page, columns=LIST_SHOWN, nav=nav,
                      sort_link=sort_link, export=export, verdicts=VERDICTS, statuses=STATUSES,
                      models=archive.models, runs=list(archive.runs), link=link,
                      error_codes=archive.error_codes,
                      models_quality=quality_for(models)).body.decode()

    def items_export(request: Request):
        fmt = request.path_params["fmt"]
        if fmt not in ("csv", "parquet"):
            raise NotFound(f"no export as {fmt!r}: there are items.csv and items.parquet")
        q = ItemQuery.parse(request.query_params)  # validated whole; the page is ignored
        reader = archive.export(q)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        headers = {"Content-Disposition": f'attachment; filename="deepaudit-items-{stamp}.{fmt}"'}
        if fmt == "csv":
            import pyarrow.csv as pacsv

            def rows():
                first = True
                for batch in reader:
                    buf = io.BytesIO()
                    pacsv.write_csv(batch, buf, pacsv.WriteOptions(include_header=first))
                    first = False
                    yield buf.getvalue()
            return StreamingResponse(rows(), media_type="text/csv", headers=headers)
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        with pq.ParquetWriter(buf, reader.schema) as w:
            for batch in reader:
                w.write_batch(batch)
        return Response(buf.getvalue(), media_type="application/vnd.apache.parquet",
                        headers=headers)

    def _item(request: Request) -> dict:
        try:
            row = int(request.path_params["row"])
        except ValueError:
            raise BadRequest("the item number must be a whole number") from None
        return archive.item(request.path_params["run_id"], row)

    def item_page(request: Request):
        item = _item(request)
        ev = archive.evidence(item, ".json")
        meta = None
        if ev is not None:
            fs, path = ev
            try:
                with fs.open(path, "r") as f:
                    meta = json.dumps(json.load(f), indent=2)
            except (OSError, ValueError):
                meta = None
        shown = {k: v for k, v in item.items() if k not in
                 ("face_boxes", "frame_indices", "frame_p_fake", "dropped_frames", "_id")}
        base = f"/runs/{item['run_id']}/items/{item['manifest_row']}"
        from deepaudit.infra.storage import filesystem_for

        reachable = False
        try:
            fs, path = filesystem_for(item.get("uri") or "", archive.storage)
            reachable = bool(item.get("uri")) and fs.isfile(path)
        except (OSError, ValueError):
            reachable = False
        return render(request, "item.html", item=item, shown=shown, base=base,
                      has_evidence=archive.evidence(item, ".png") is not None,
                      evidence_json=meta, history=archive.history(item["media_id"]),
                      ledger=archive.ledger_entries(item["media_id"]),
                      n_boxes=len(item.get("face_boxes") or []), reachable=reachable,
                      has_frames=bool(item.get("frame_p_fake")),
                      models_quality=quality_for([item.get("model")]))

    def item_file(request: Request):
        item = _item(request)
        kind = request.path_params["kind"]
        if kind in ("evidence.png", "evidence.json"):
            found = archive.evidence(item, kind[len("evidence"):])
            if found is None:
                raise NotFound("this item has no evidence file under its output folder")
            fs, path = found
            with fs.open(path, "rb") as f:
                data = f.read()
            return png(data, "image/png" if kind.endswith("png") else "application/json")
        if kind == "frames.png":
            from deepaudit.jobs.serve.figures import frame_scores_png

            if not item.get("frame_p_fake"):
                raise NotFound("this item has no frame scores")
            return png(frame_scores_png(item.get("frame_indices") or [], item["frame_p_fake"],
                                        item.get("threshold"), item.get("p_fake")))
        if kind == "faces.jpg":
            from deepaudit.jobs.serve.figures import faces_jpeg

            return png(faces_jpeg(item, archive.storage), "image/jpeg")
        raise NotFound(f"no {kind!r} for an item")

    # ------------------------------------------------------------------ check a file

    def csrf_of(request: Request) -> str:
        return request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)

    def check_form(request: Request, status: int = 200, result=None, error=None):
        token = csrf_of(request)
        quality = [{"model": checker.handle.model_id, **checker.handle.quality}] \
            if checker else []
        resp = render(request, "check.html", status=status, csrf=token, result=result,
                      error=error, max_mb=max_upload // 2**20, models_quality=quality,
                      threshold=checker.handle.config.threshold if checker else None)
        resp.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="strict")
        return resp

    async def check_page(request: Request):
        if checker is None:
            raise NotFound("checking files is off on this server (started with --no-check)")
        if request.method == "GET":
            return check_form(request)
        origin = request.headers.get("origin")
        host = request.headers.get("host")
        if origin and origin != "null" and origin.split("://", 1)[-1] != host:
            return check_form(request, 403, error="the form was posted from another site")
        form = await request.form(max_files=1, max_fields=4)
        cookie, field = request.cookies.get(CSRF_COOKIE), form.get("csrf")
        if not cookie or not isinstance(field, str) or \
                not hmac.compare_digest(cookie.encode(), field.encode()):
            return check_form(request, 403, error="the form's security token is missing or "
                              "stale: reload the page and upload again")
        wait = limiter.allow(request.client.host if request.client else "?")
        if wait:
            return check_form(request, 429, error=f"too many uploads from this address: try "
                              f"again in {wait:.0f} s")
        upload = form.get("file")
        if upload is None or isinstance(upload, str) or not upload.filename:
            return check_form(request, 400, error="choose a file to upload")
        data = await upload.read(max_upload + 1)
        await upload.close()
        if len(data) > max_upload:
            return check_form(request, 413, error=f"the file is over {max_upload // 2**20} MB")
        kind = sniff(data[:32])
        if kind is None:
            return check_form(request, 415, error="this is not an image (JPEG, PNG, BMP, "
                              "WebP) or a video (MP4/MOV, MKV/WebM, AVI) by its content")
        name = upload.filename[-200:]
        result = await run_in_threadpool(_run_check, data, kind[0], name)
        if request.headers.get("accept", "").startswith("application/json"):
            return JSONResponse(result)
        return check_form(request, 200, result=result)

    def _run_check(data: bytes, ext: str, name: str) -> dict:
        tmp = tempfile.mkdtemp(prefix="upload-", dir=upload_root)
        evidence_dir = None
        try:
            path = os.path.join(tmp, "upload" + ext)
            with open(path, "wb") as f:
                f.write(data)
            with check_lock:  # one model, one call at a time
                result = checker.check([path], media_ids=[f"upload:{secrets.token_hex(8)}:{name}"])
            f0 = result["files"][0]
            f0["file"] = name
            if f0.get("evidence"):
                evidence_dir = os.path.dirname(f0["evidence"])
                with open(f0["evidence"], "rb") as f:
                    f0["evidence_png"] = base64.b64encode(f.read()).decode()
                try:
                    with open(f0["evidence"][:-4] + ".json") as f:
                        f0["evidence_json"] = json.dumps(json.load(f), indent=2)
                except (OSError, ValueError):
                    f0["evidence_json"] = None
                f0["evidence"] = "(shown here; not kept)"
            return result
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if evidence_dir and os.path.realpath(evidence_dir).startswith(
                    os.path.realpath(upload_root) + os.sep):
                shutil.rmtree(evidence_dir, ignore_errors=True)

    # ------------------------------------------------------------------ errors

    def error_page(request: Request, status: int, message: str):
        if request.url.path.endswith((".png", ".jpg", ".json", ".csv", ".parquet")):
            return PlainTextResponse(f"{status}: {message}", status_code=status)
        return render(request, "error.html", status=status, status_code=status, message=message)

    async def bad_request(request, exc):
        return error_page(request, 400, str(exc))

    async def not_found(request, exc):
        return error_page(request, 404, str(exc))

    async def http_error(request, exc):
        return error_page(request, exc.status_code, str(exc.detail))

    async def internal(request, exc):
        log.exception("serve: %s %s failed", request.method, request.url.path)
        return error_page(request, 500, f"internal error ({type(exc).__name__}); see the "
                          "server's log")

    def style(request: Request):
        return Response(stylesheet, media_type="text/css",
                        headers={"Cache-Control": "private, max-age=3600"})

    def health(request: Request):
        return JSONResponse({"ok": True, "items": archive.n_items, "runs": len(archive.runs)})

    routes = [
        Route("/", lambda r: RedirectResponse("/runs", 303)),
        Route("/runs", runs_page),
        Route("/runs/{run_id}", run_page),
        Route("/runs/{run_id}/{kind:str}.png", run_figure),
        Route("/items", items_page),
        Route("/items.{fmt:str}", items_export),
        Route("/runs/{run_id}/items/{row}", item_page),
        Route("/runs/{run_id}/items/{row}/{kind}", item_file),
        Route("/check", check_page, methods=["GET", "POST"]),
        Route("/static/style.css", style),
        Route("/healthz", health),
    ]
    app = Starlette(routes=routes, exception_handlers={
        BadRequest: bad_request, NotFound: not_found, HTTPException: http_error,
        Exception: internal})
    app.state.upload_root = upload_root
    app.state.archive = archive

    wrapped = Guard(app, token, max_upload)
    wrapped.state = app.state  # for tests
    wrapped.upload_root = upload_root
    return wrapped
