"""One item's page in ``deepaudit serve``: its metadata, frame scores, face boxes, evidence,
its review (and the form to review it), history and ledger entries, and the pictures it
links to."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Route

from deepaudit.serve.common import BadRequest, NotFound, storage_errors
from deepaudit.serve.figures import scored_frames
from deepaudit.serve.security import CSRF_COOKIE, csrf_token
from deepaudit.serve.site import Site


def item_of(site: Site, request: Request) -> dict:
    """The verdict row a ``/runs/{run_id}/items/{row}`` path names (400, 404)."""
    try:
        row = int(request.path_params["row"])
    except ValueError:
        raise BadRequest("the item number must be a whole number") from None
    return site.archive.item(request.path_params["run_id"], row)


def render_item(site: Site, request: Request, item: dict, status: int = 200,
                review_error: str | None = None, form: dict | None = None):
    """The item page (``status``; with a refused review's message and what was typed)."""
    from deepaudit.pipeline.reviews import REVIEWS, review_state

    ev = site.archive.files.evidence(item, ".json")
    meta = None
    if ev is not None:
        fs, path = ev
        try:
            with fs.open(path, "r") as f:
                meta = json.dumps(json.load(f), indent=2)
        except storage_errors():
            meta = None
    shown = {k: v for k, v in item.items() if k not in
             ("face_boxes", "frame_indices", "frame_p_fake", "frame_weights",
              "dropped_frames", "_id")}
    if item.get("frame_weights"):  # which frames decided (an attention head's weights)
        shown["frame_weights"] = ", ".join(
            f"frame {i}: {w:.2f}" for i, w in zip(item.get("frame_indices") or [],
                                                   item["frame_weights"])
            if w is not None and w > 0)
    scored, _ = scored_frames(item.get("frame_indices"), item.get("frame_p_fake"))
    base = f"/runs/{item['run_id']}/items/{item['manifest_row']}"
    reachable = site.archive.files.media_reachable(item.get("uri"))
    review = site.archive.reviews.of(item["media_id"])
    csrf = csrf_token(request, site.csrf)
    resp = site.render(request, "item.html", status=status, item=item, shown=shown, base=base,
                       has_evidence=site.archive.files.evidence(item, ".png") is not None,
                       evidence_json=meta, history=site.archive.history(item["media_id"]),
                       ledger=site.archive.ledger_entries(item["media_id"]),
                       n_boxes=len(item.get("face_boxes") or []), reachable=reachable,
                       n_scored=len(scored), n_crops=len(item.get("frame_p_fake") or []),
                       models_quality=site.quality_for([item.get("model")]),
                       review=review, choices=REVIEWS,
                       review_state=review_state(review and review["review"],
                                                 item.get("verdict")),
                       reviews=site.archive.reviews.history(item["media_id"]),
                       reviewer=site.reviewer, csrf=csrf, review_error=review_error,
                       form=form or {})
    resp.set_cookie(CSRF_COOKIE, csrf, httponly=True, samesite="strict")
    return resp


def routes(site: Site) -> list[Route]:
    def _item(request: Request) -> dict:
        return item_of(site, request)

    def item_page(request: Request):
        return render_item(site, request, _item(request))

    def item_file(request: Request):
        item = _item(request)
        kind = request.path_params["kind"]
        if kind in ("evidence.png", "evidence.json"):
            found = site.archive.files.evidence(item, kind[len("evidence"):])
            if found is None:
                raise NotFound("this item has no evidence file under its output folder")
            fs, path = found
            try:
                with fs.open(path, "rb") as f:
                    data = f.read()
            except storage_errors():
                raise NotFound("this item's evidence file cannot be read (removed since the "
                               "server started?)") from None
            return site.png(data, "image/png" if kind.endswith("png")
                            else "application/json")
        if kind == "frames.png":
            from deepaudit.serve.figures import frame_scores_png

            if not scored_frames(item.get("frame_indices"), item.get("frame_p_fake"))[1]:
                raise NotFound("this item has no scored frames")
            return site.png(frame_scores_png(item.get("frame_indices") or [],
                                             item["frame_p_fake"], item.get("threshold"),
                                             item.get("p_fake")))
        if kind == "review":  # GET of the review form's target: it takes posts only
            raise HTTPException(405, "a review is posted from the item's page",
                                headers={"Allow": "POST"})
        if kind == "faces.jpg":
            from deepaudit.serve.figures import faces_jpeg

            source = site.archive.files.media_source(item.get("uri"))
            if source is None:
                raise NotFound("this item's media cannot be read from this server")
            return site.png(faces_jpeg(item, *source), "image/jpeg")
        raise NotFound(f"no {kind!r} for an item")

    return [
        Route("/runs/{run_id}/items/{row}", item_page),
        Route("/runs/{run_id}/items/{row}/{kind}", item_file),
    ]
