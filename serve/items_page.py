"""The items page of ``deepaudit serve``: filters, sort and keyset pages over the snapshot
(see :mod:`.data`), rendered once per set of parameters."""

from __future__ import annotations

from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from deepaudit.pipeline.reviews import review_state
from deepaudit.serve.item_query import (
    MEDIA_TYPES,
    REVIEW_FILTERS,
    STATUSES,
    VERDICTS,
    ItemQuery,
)
from deepaudit.serve.site import Site


def routes(site: Site) -> list[Route]:
    def items_page(request: Request):
        # The snapshot never changes while the server runs: a page already rendered for the
        # same parameters is served again (reviewers share links, go back and forth).
        # Kept without start, which only numbers the rows: paging through the same page
        # from other numbers (or a crafted start) replaces an entry, never adds one.
        q = ItemQuery.parse(request.query_params)
        key = tuple(sorted((k, v) for k, v in request.query_params.multi_items()
                           if k not in ("token", "start")))
        found = site.page_cache.peek(key)
        if found is None or found[0] != q.start:
            found = (q.start, items_html(request, q))
            site.page_cache.put(key, found)
        return HTMLResponse(found[1])

    def items_html(request: Request, q: ItemQuery) -> bytes:
        page = site.archive.page(q)
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

        models = sorted({r["model"] for r in page.rows if r["model"]}) or site.archive.models
        for r in page.rows:  # the latest review of its media id, and what it says of r
            found = site.archive.reviews.of(r["media_id"])
            r["review_"] = found and {**found, "state": review_state(found["review"],
                                                                     r["verdict"])}
        nav = {
            "first": link() if (q.after or q.before is not None) else None,
            "prev": link(before=page.prev_cursor,
                         start=max(0, page.first_row - 1 - q.limit)) if page.prev_cursor else None,
            "next": link(after=page.next_cursor, start=page.first_row - 1 + len(page.rows))
            if page.next_cursor else None,
            "last": link(before="end") if page.next_cursor else None,
        }
        export = {fmt: f"/items.{fmt}{link()}" for fmt in ("csv", "parquet")}
        return site.render(request, "items.html", q=q, page=page,
                           columns=site.archive.list_shown, nav=nav, sort_link=sort_link,
                           export=export, verdicts=VERDICTS, statuses=STATUSES,
                           media_types=MEDIA_TYPES, review_filters=REVIEW_FILTERS,
                           models=site.archive.models, runs=list(site.archive.runs), link=link,
                           error_codes=site.archive.error_codes,
                           models_quality=site.quality_for(models)).body

    return [
        Route("/items", items_page),
    ]
