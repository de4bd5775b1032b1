"""The ``deepaudit serve`` web application (Starlette + Jinja2, no script on any page).

Security (see :mod:`.security` and docs/serve.md, "Security model"):

* :class:`~.security.Guard` checks every request's Host (DNS rebinding), the token when
  there is one, and the request size, and puts the security headers on every reply;
* files are served only when a verdict row names them (its evidence strip and JSON),
  resolved under ``OUT/evidence/`` of the row's run; no route takes a path; source media
  is drawn (never served) only from local paths and the buckets the output names;
* every page is a Jinja template with autoescape on; a Content-Security-Policy allows
  nothing but this origin's CSS and images; CSV exports neutralise spreadsheet formulas;
* the upload (the only write, to a private temp dir, removed after each request) needs a
  CSRF token (double-submit cookie, SameSite=Strict, and an Origin of this server), is
  capped in size before it is read, sniffed by content, and rate-limited per client.
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
from pathlib import Path
from urllib.parse import urlencode

import jinja2
import pyarrow as pa
import pyarrow.compute as pc
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
    LRU,
    MEDIA_TYPES,
    STATUSES,
    VERDICTS,
    Archive,
    BadRequest,
    Gone,
    ItemQuery,
    NotFound,
    storage_errors,
)
from deepaudit.jobs.serve.security import (  # noqa: F401 (sniff: the tests import it here)
    CSRF_COOKIE,
    Guard,
    HostCheck,
    RateLimiter,
    sniff,
    token_problem,
)

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
# A CSV cell starting with one of these is a formula to a spreadsheet (OWASP, "CSV
# injection"): the export prefixes a single quote, which shows the text as it is.
FORMULA_START = "^[=+\\-@\t\r]"


def neutralise(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` with every text cell (and column name) that a spreadsheet would run as a
    formula prefixed with ``'``; numbers, times and nulls unchanged."""
    def safe(name: str) -> str:
        return "'" + name if name[:1] in ("=", "+", "-", "@", "\t", "\r") else name

    cols = []
    for col, f in zip(batch.columns, batch.schema):
        if pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
            risky = pc.fill_null(pc.match_substring_regex(col, FORMULA_START), False)
            col = pc.if_else(risky, pc.binary_join_element_wise("'", col, ""), col)
        cols.append(col)
    return pa.RecordBatch.from_arrays(cols, names=[safe(n) for n in batch.schema.names])


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")),
                             autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)

    def fmt(v, digits: int = 3):
        if v is None or isinstance(v, jinja2.Undefined):  # e.g. a run without a summary
            return "–"
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        if hasattr(v, "strftime"):
            return v.strftime("%Y-%m-%d %H:%M:%S")
        return v

    def tail(v, n: int = 60):
        """The end of a long path or id, whose file name tells rows apart:
        ``…/images/fake/genco_0001.png``; the full value goes in the cell's title."""
        if v is None:
            return ""
        v = str(v)
        if len(v) <= n:
            return v
        end = v[-(n - 1):]
        cut = end.find("/")
        if 0 <= cut < n // 3:  # start at a folder boundary when little is lost
            end = end[cut:]
        return "…" + end

    env.filters["fmt"] = fmt
    env.filters["tail"] = tail
    env.filters["short"] = lambda v, n=80: v if v is None or len(str(v)) <= n else \
        str(v)[: n - 1] + "…"
    return env


def create_app(archive: Archive, token: str | None = None, checker=None,
               max_upload_mb: int = 100, uploads_per_minute: int = 10,
               upload_root: str | None = None, host: str = "127.0.0.1",
               allowed_hosts: list[str] | None = None, body_idle_s: float = 15.0,
               body_total_s: float | None = None) -> Guard:
    """The web app over ``archive``, bound to ``host`` (which, with ``allowed_hosts``,
    says which Host headers name it); ``checker`` (a :class:`deepaudit.jobs.check.Checker`)
    enables the Check-a-file page. A request body must keep coming (``body_idle_s``) and
    end within ``body_total_s`` (default: 60 s, or 1 s per MB of the upload cap)."""
    if token is not None and token_problem(token):
        raise ValueError(token_problem(token))
    hosts = HostCheck(host, allowed_hosts)
    env = _env()
    css = (HERE / "static" / "serve.css").read_text()
    from deepaudit.jobs.report import CSS as REPORT_CSS

    stylesheet = REPORT_CSS + css
    max_upload = max_upload_mb * 2**20
    limiter = RateLimiter(uploads_per_minute)
    check_lock = threading.Lock()
    if upload_root is None:
        from deepaudit.jobs.serve.server import make_upload_root

        upload_root = make_upload_root()
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
        return render(request, "items.html", q=q, page=page, columns=archive.list_shown,
                      nav=nav, sort_link=sort_link, export=export, verdicts=VERDICTS,
                      statuses=STATUSES, media_types=MEDIA_TYPES,
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
                for batch in reader:  # cells a spreadsheet would run are neutralised
                    buf = io.BytesIO()
                    pacsv.write_csv(neutralise(batch), buf,
                                    pacsv.WriteOptions(include_header=first))
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
            except storage_errors():
                meta = None
        shown = {k: v for k, v in item.items() if k not in
                 ("face_boxes", "frame_indices", "frame_p_fake", "dropped_frames", "_id")}
        base = f"/runs/{item['run_id']}/items/{item['manifest_row']}"
        reachable = archive.media_reachable(item.get("uri"))
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
            try:
                with fs.open(path, "rb") as f:
                    data = f.read()
            except storage_errors():
                raise NotFound("this item's evidence file cannot be read (removed since the "
                               "server started?)") from None
            return png(data, "image/png" if kind.endswith("png") else "application/json")
        if kind == "frames.png":
            from deepaudit.jobs.serve.figures import frame_scores_png

            if not item.get("frame_p_fake"):
                raise NotFound("this item has no frame scores")
            return png(frame_scores_png(item.get("frame_indices") or [], item["frame_p_fake"],
                                        item.get("threshold"), item.get("p_fake")))
        if kind == "faces.jpg":
            from deepaudit.jobs.serve.figures import faces_jpeg

            source = archive.media_source(item.get("uri"))
            if source is None:
                raise NotFound("this item's media cannot be read from this server")
            return png(faces_jpeg(item, *source), "image/jpeg")
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
        # The Host was checked (Guard); the Origin must name this server too, not merely
        # repeat the Host (a rebinding page sends its own name in both).
        origin = request.headers.get("origin")
        port = (request.scope.get("server") or (None, None))[1]
        if origin and origin != "null" and not hosts.allows_origin(origin, port):
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

    async def gone(request, exc):
        return error_page(request, 410, str(exc))

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
        BadRequest: bad_request, Gone: gone, NotFound: not_found, HTTPException: http_error,
        Exception: internal})
    app.state.upload_root = upload_root
    app.state.archive = archive

    wrapped = Guard(app, token, max_upload, hosts, body_idle_s=body_idle_s,
                    body_total_s=body_total_s or max(60.0, float(max_upload_mb)))
    wrapped.state = app.state  # for tests
    wrapped.upload_root = upload_root
    return wrapped
