"""Check a file, in ``deepaudit serve``: one upload scored by ``deepaudit check``'s code
(the model loaded once, at start), behind a CSRF token this server signed, an Origin of
this server, a size cap, sniffing by content and a per-client rate limit; nothing of it is
kept."""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import tempfile

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from deepaudit.serve.common import NotFound
from deepaudit.serve.security import (
    CSRF_COOKIE,
    csrf_problem,
    csrf_token,
    origin_problem,
    sniff,
)
from deepaudit.serve.site import Site


def routes(site: Site) -> list[Route]:
    def check_form(request: Request, status: int = 200, result=None, error=None):
        token = csrf_token(request, site.csrf)
        quality = [{"model": site.checker.handle.model_id, **site.checker.handle.quality}] \
            if site.checker else []
        resp = site.render(request, "check.html", status=status, csrf=token, result=result,
                           error=error, max_mb=site.max_upload // 2**20,
                           models_quality=quality, threshold=site.checker.handle.config.threshold
                           if site.checker else None)
        resp.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="strict")
        return resp

    async def check_page(request: Request):
        if site.checker is None:
            raise NotFound("checking files is off on this server (started with --no-check)")
        if request.method == "GET":
            return check_form(request)
        problem = origin_problem(request, site.hosts)  # before the body is read
        if problem:
            return check_form(request, 403, error=problem)
        form = await request.form(max_files=1, max_fields=4)
        problem = csrf_problem(request, form, site.csrf)
        if problem:
            return check_form(request, 403, error=problem)
        wait = site.limiter.allow(request.client.host if request.client else "?")
        if wait:
            return check_form(request, 429, error=f"too many uploads from this address: try "
                              f"again in {wait:.0f} s")
        upload = form.get("file")
        if upload is None or isinstance(upload, str) or not upload.filename:
            return check_form(request, 400, error="choose a file to upload")
        data = await upload.read(site.max_upload + 1)
        await upload.close()
        if len(data) > site.max_upload:
            return check_form(request, 413,
                              error=f"the file is over {site.max_upload // 2**20} MB")
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
        tmp = tempfile.mkdtemp(prefix="upload-", dir=site.upload_root)
        evidence_dir = None
        try:
            path = os.path.join(tmp, "upload" + ext)
            with open(path, "wb") as f:
                f.write(data)
            with site.check_lock:  # one model, one call at a time
                result = site.checker.check(
                    [path], media_ids=[f"upload:{secrets.token_hex(8)}:{name}"])
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
                    os.path.realpath(site.upload_root) + os.sep):
                shutil.rmtree(evidence_dir, ignore_errors=True)

    return [
        Route("/check", check_page, methods=["GET", "POST"]),
    ]
