"""Reviews in ``deepaudit serve``: a reviewer marks an item fake, real or unsure, with an
optional note. Each review is a new row in ``OUT/_reviews/`` (:mod:`deepaudit.pipeline.
reviews`); no verdict file is touched. The post needs an Origin of this server and a CSRF
token it signed (as uploads), the token when the server has one (:class:`~.security.Guard`),
and a writable review folder: without one the pages stay read-only and say why. A review of
an item whose run (or the whole output) was removed since the start is a 410 and writes
nothing; the review folder is made, never the output above it.

``POST /runs/{run_id}/items/{row}/review`` (form: ``csrf``, ``review``, ``note``): 303 back
to the item page, or with ``Accept: application/json`` 201 and the row written.
``GET /runs/{run_id}/items/{row}/reviews.json``: the item's latest review and history."""

from __future__ import annotations

import logging

import pyarrow as pa
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse
from starlette.routing import Route

from deepaudit.pipeline import reviews as rv
from deepaudit.serve.common import Gone, storage_errors
from deepaudit.serve.item_page import item_of, render_item
from deepaudit.serve.security import csrf_problem, origin_problem
from deepaudit.serve.site import Site

log = logging.getLogger(__name__)


def _json_row(row: dict) -> dict:
    return {**row, "reviewed_at": row["reviewed_at"].isoformat()}


def routes(site: Site) -> list[Route]:
    def write(row: dict, run_id: str) -> None:
        with site.review_lock:  # the part, then the in-memory state the pages read
            site.archive.check_current(run_id)  # Gone: the run or the output was removed
            try:
                site.review_store.append([row])
            except FileNotFoundError:  # the output folder is gone: nothing is made again
                raise Gone("this output was removed after this server started; nothing was "
                           "saved: restart deepaudit serve") from None
            site.archive.reviews.add(pa.Table.from_pylist([row], schema=rv.REVIEW_SCHEMA))
            site.page_cache.clear()  # items pages show and filter by review

    async def post_review(request: Request):
        item = item_of(site, request)  # 400, 404: no such item (or media id)
        wants_json = request.headers.get("accept", "").startswith("application/json")
        typed: dict = {}

        def refuse(status: int, message: str):
            if wants_json:
                return JSONResponse({"error": message}, status_code=status)
            return render_item(site, request, item, status, review_error=message, form=typed)

        problem = origin_problem(request, site.hosts)  # before the body is read
        if problem:
            return refuse(403, problem)
        form = await request.form(max_files=0, max_fields=8)
        typed = {k: form.get(k) for k in ("review", "note") if isinstance(form.get(k), str)}
        problem = csrf_problem(request, form, site.csrf)
        if problem:
            return refuse(403, problem)
        if site.reviews_off:
            return refuse(503, site.reviews_off)
        wait = site.review_limiter.allow(request.client.host if request.client else "?")
        if wait:
            return refuse(429, f"too many reviews from this address: try again in {wait:.0f} s")
        review, note = form.get("review"), form.get("note")
        if not isinstance(review, str) or not review:
            return refuse(400, "choose fake, real or unsure")
        try:  # the note's rule (length, control and bidi characters) is the library's
            row = rv.review_row(item, review, note if isinstance(note, str) else None,
                                site.reviewer)
        except rv.ReviewError as exc:
            return refuse(400, str(exc))
        try:
            await run_in_threadpool(write, row, item["run_id"])
        except storage_errors() as exc:
            log.warning("serve: writing a review to %s failed: %s", site.review_store.uri, exc)
            return refuse(503, f"the review could not be written to {site.review_store.uri} "
                               f"({type(exc).__name__}: {str(exc)[:200]}); nothing was saved")
        if wants_json:
            return JSONResponse(_json_row(row), status_code=201)
        base = f"/runs/{item['run_id']}/items/{item['manifest_row']}"
        return RedirectResponse(f"{base}#review", status_code=303)

    def get_reviews(request: Request):
        item = item_of(site, request)
        latest = site.archive.reviews.of(item["media_id"])
        return JSONResponse({
            "media_id": item["media_id"], "verdict": item.get("verdict"),
            "review": latest and _json_row(latest),
            "state": rv.review_state(latest and latest["review"], item.get("verdict")),
            "history": [_json_row(r) for r in site.archive.reviews.history(item["media_id"])],
            "reviews_off": site.reviews_off})

    return [
        Route("/runs/{run_id}/items/{row}/review", post_review, methods=["POST"]),
        Route("/runs/{run_id}/items/{row}/reviews.json", get_reviews),
    ]
