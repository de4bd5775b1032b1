"""The runs pages of ``deepaudit serve``: every run, and one run (summary, counts, the
report's score histogram and ROC curve)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.routing import Route

from deepaudit.serve.common import NotFound
from deepaudit.serve.site import Site


def routes(site: Site) -> list[Route]:
    def runs_page(request: Request):
        runs = site.archive.run_list()
        return site.render(request, "runs.html", runs=runs,
                           models_quality=site.quality_for(site.archive.models))

    def run_page(request: Request):
        run_id = request.path_params["run_id"]
        run = site.archive.run(run_id)
        scores, labels = site.archive.scores(run_id)
        model = run["row"].get("model") or run["summary"].get("model")
        return site.render(request, "run.html", run=run, run_id=run_id, n_scores=len(scores),
                           has_roc=labels is not None and 0 < sum(v for v in labels if v) <
                           sum(v is not None for v in labels),
                           models_quality=site.quality_for([model]))

    def run_figure(request: Request):
        from deepaudit.pipeline.render import histogram_figure, roc_figure

        run_id, kind = request.path_params["run_id"], request.path_params["kind"]
        if kind not in ("histogram", "roc"):
            raise NotFound(f"no figure {kind!r}: there are histogram.png and roc.png")
        run = site.archive.run(run_id)
        key = (run_id, kind)
        if key not in site.figures:
            scores, labels = site.archive.scores(run_id)
            thr = run["summary"].get("threshold")
            if thr is None and scores:
                thr = site.archive.scalar("SELECT any_value(threshold) FROM items WHERE run_id = ?",
                                     [run_id])
            site.figures[key] = (histogram_figure(scores, labels, thr) if kind == "histogram"
                            else roc_figure(scores, labels))
        return site.png(site.figures[key])

    return [
        Route("/runs", runs_page),
        Route("/runs/{run_id}", run_page),
        Route("/runs/{run_id}/{kind:str}.png", run_figure),
    ]
