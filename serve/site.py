"""What the pages of ``deepaudit serve`` share: the snapshot, the templates and their
filters, the upload settings, and the caches (one :class:`Site` per app)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from deepaudit.serve.common import LRU, NotFound
from deepaudit.serve.data import Archive
from deepaudit.serve.security import CsrfTokens, HostCheck, RateLimiter

HERE = Path(__file__).parent
# Rendered items pages kept: up to this many bytes (about 35 pages of 500 rows, or 350 of 50).
PAGE_CACHE_BYTES = 32 * 2**20


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


@dataclass
class Site:
    archive: Archive
    hosts: HostCheck
    limiter: RateLimiter
    upload_root: str
    max_upload: int  # bytes
    checker: Any = None  # a deepaudit.jobs.check.Checker: the Check-a-file page
    env: jinja2.Environment = field(default_factory=_env)
    check_lock: threading.Lock = field(default_factory=threading.Lock)  # one model call
    figures: dict = field(default_factory=dict)  # (run_id, kind) -> PNG
    # Rendered items pages: (start, HTML bytes) per set of parameters but start (which
    # numbers the rows only), within PAGE_CACHE_BYTES.
    page_cache: LRU = field(default_factory=lambda: LRU(
        512, max_bytes=PAGE_CACHE_BYTES, sizeof=lambda v: len(v[1])))
    csrf: CsrfTokens = field(default_factory=CsrfTokens)  # this server's CSRF tokens
    # Reviews: where they are written (a pipeline.reviews.ReviewStore), or why not.
    review_store: Any = None
    reviews_off: str | None = None
    reviewer: str = "unknown"
    review_limiter: RateLimiter = field(default_factory=lambda: RateLimiter(60))
    review_lock: threading.Lock = field(default_factory=threading.Lock)  # one write at a time

    def render(self, request: Request, name: str, status: int = 200, **ctx) -> HTMLResponse:
        ctx.setdefault("models_quality", [])
        html = self.env.get_template(name).render(
            request=request, target=self.archive.target, n_items=self.archive.n_items,
            is_ledger=self.archive.is_ledger, has_check=self.checker is not None,
            reviews_off=self.reviews_off, **ctx)
        return HTMLResponse(html, status_code=status)

    def quality_for(self, models) -> list[dict]:
        return [{"model": m, **self.archive.quality(m)} for m in models if m]

    @staticmethod
    def png(data: bytes | None, mime: str = "image/png") -> Response:
        if data is None:
            raise NotFound("no picture for this")
        return Response(data, media_type=mime)  # no-store, as every reply (security.Guard)
