"""The HTML report of an audit run (``deepaudit report OUT``): one self-contained page.

The page needs no network to view: CSS is inline, every picture (matplotlib plots from
:mod:`deepaudit.models.metrics`, evidence thumbnails) is a base64 ``data:`` URI, there is
no script, and a Content-Security-Policy forbids fetching anything else. Every string
that comes from the data (media ids, URIs, error messages) is HTML-escaped.

Sections carry stable ids for tests and for people who link to them: ``#summary``,
``#status-counts``, ``#histogram``, ``#roc`` and ``#confusion`` (when the manifest had
labels), ``#flagged``, ``#reviews`` (when OUT has reviews: the precision among the
reviewed flags), ``#errors``, ``#throughput``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deepaudit.infra.storage import StorageConfig, filesystem_for, join
from deepaudit.models.quality import quality_text
from deepaudit.pipeline.render import (
    CSS,
    esc,
    fmt,
    histogram_figure,
    html_table,
    img_tag,
    labelled_pairs,
    labels_scores,
    present_columns,
    roc_figure,
)

log = logging.getLogger(__name__)

COLUMNS = [
    "media_id", "uri", "media_type", "status", "error", "verdict", "p_fake", "margin",
    "threshold", "n_frames_sampled", "n_frames_with_face", "evidence", "decode_ms",
    "detect_ms", "classify_ms", "label",
]


class ReportError(ValueError):
    """The report cannot be built; the message says what to do."""


@dataclass(frozen=True)
class RunData:
    out: str
    summary: dict
    rows: pa.Table
    note: str | None = None  # which run was chosen instead of the latest, and why


def load_run(out: str, run_id: str | None = None, storage: StorageConfig | None = None) -> RunData:
    """The summary and verdict rows of one run of ``out`` (the latest by default)."""
    from deepaudit.infra.storage import open_readable

    storage = storage or StorageConfig()
    fs, base = open_readable(out, storage, "OUT", ReportError)
    summary_path = f"{base}/runs/{run_id}/_summary.json" if run_id else f"{base}/_summary.json"
    if not fs.exists(summary_path):
        runs_dir = f"{base}/runs"
        runs = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(runs_dir, detail=False)) \
            if fs.exists(runs_dir) else []
        hint = f" Runs there: {', '.join(runs[-10:])}." if runs else " No runs found there."
        raise ReportError(f"no run summary at {summary_path}: is {out!r} an audit output "
                          f"folder (deepaudit audit --output)?{hint}")
    with fs.open(summary_path, "r") as f:
        summary = json.load(f)
    note = None
    files = _verdict_files(fs, f"{base}/runs/{summary['run_id']}")
    if not files and run_id is None:
        # The nightly case: an incremental run that skipped everything. Report the latest
        # run that has rows instead, and say so.
        chosen = _latest_run_with_rows(fs, base)
        if chosen is not None:
            note = (f"the latest run, {summary['run_id']}, audited nothing "
                    f"({summary.get('rows_in', 0)} items to do); reporting run "
                    f"{chosen[0]['run_id']}, the latest run with verdict rows")
            summary, files = chosen
    if not files:
        raise ReportError(f"run {summary['run_id']} has no verdict files in "
                          f"{base}/runs/{summary['run_id']}, and no earlier run has any")
    tables = []
    for p in files:
        with fs.open(p, "rb") as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in COLUMNS if c in pf.schema_arrow.names]
            tables.append(pf.read(columns=cols))
    rows = pa.concat_tables(tables, promote_options="permissive")
    return RunData(out=out, summary=summary, rows=rows, note=note)


def _verdict_files(fs, run_dir: str) -> list[str]:
    if not fs.exists(run_dir):
        return []
    return sorted(p for p in fs.ls(run_dir, detail=False)
                  if p.rsplit("/", 1)[-1].startswith("verdicts-") and p.endswith(".parquet"))


def _latest_run_with_rows(fs, base: str) -> tuple[dict, list[str]] | None:
    """(summary, verdict files) of the most recently started run that has rows."""
    summaries = []
    for path in fs.glob(f"{base}/runs/*/_summary.json"):
        try:
            with fs.open(path, "r") as f:
                summaries.append(json.load(f))
        except (OSError, ValueError):
            continue
    for s in sorted(summaries, key=lambda s: str(s.get("started_at") or ""), reverse=True):
        if s.get("rows_out"):
            files = _verdict_files(fs, f"{base}/runs/{s['run_id']}")
            if files:
                return s, files
    return None


def _thumbnail(uri: str | None, media_id: str, run_id: str, out: str,
               storage: StorageConfig, width: int = 600) -> bytes | None:
    """A JPEG thumbnail of an evidence strip: at its recorded URI, else where it would be
    under ``out`` (the output folder may have been moved since the run)."""
    import cv2

    from deepaudit.pipeline.evidence import evidence_dirname, safe_filename

    candidates = [uri] if uri else []
    candidates.append(join(out, "evidence", evidence_dirname(media_id),
                           safe_filename(run_id) + ".png"))
    for cand in candidates:
        try:
            fs, path = filesystem_for(cand, storage)
            if not fs.exists(path):
                continue
            with fs.open(path, "rb") as f:
                img = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_COLOR)
        except Exception as exc:  # unreadable evidence: the page says so, it does not fail
            log.warning("evidence %s unreadable: %s", cand, exc)
            continue
        if img is None:
            continue
        if img.shape[1] > width:
            img = cv2.resize(img, (width, round(img.shape[0] * width / img.shape[1])),
                             interpolation=cv2.INTER_AREA)
        ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
        if ok:
            return jpg.tobytes()
    return None


def _summary_section(s: dict) -> str:
    ev = s.get("evidence") or {}
    trained = s.get("model_trained")
    rows = [
        ("run id", f'<span class="id">{esc(s.get("run_id"))}</span>'),
        ("state", f'<span class="badge {esc(s.get("state"))}">{esc(s.get("state"))}</span>'),
        ("model", f'<span class="id">{esc(s.get("model"))}</span>'
                  + ("" if trained else ' <span class="badge">untrained</span>')),
        ("model quality", esc(quality_text(s.get("model_quality")))),
        ("threshold", fmt(s.get("threshold"))),
        ("manifest", f'<span class="id">{esc(s.get("manifest"))}</span>'),
        ("output", f'<span class="id">{esc(s.get("output"))}</span>'),
        ("started / finished", f'{esc(s.get("started_at"))}<br>{esc(s.get("finished_at"))}'),
        ("items in / out", f'{esc(s.get("rows_in"))} / {esc(s.get("rows_out"))}'
                           + (f' ({esc(s.get("lost_rows"))} lost)' if s.get("lost_rows") else "")),
        ("flagged fake", esc(s.get("fakes"))),
        ("evidence written", f'{esc(ev.get("written", 0))}'
                             + (f' (cap {esc(ev.get("max"))})' if ev.get("enabled") else " (off)")),
    ]
    if s.get("run_error"):
        rows.append(("run error", f'<span class="err">{esc(s["run_error"])}</span>'))
    body = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
    return f'<section id="summary"><h2>Run summary</h2><table class="kv">{body}</table></section>'


def _counts_section(s: dict, rows: pa.Table) -> str:
    def block(title: str, counts: dict, key: str) -> str:
        total = max(1, sum(counts.values()))
        trs = []
        for name, n in counts.items():
            width = round(160 * n / total)
            trs.append(f'<tr data-{key}="{esc(name)}"><td>{esc(name)}</td>'
                       f'<td class="num count">{esc(n)}</td>'
                       f'<td><span class="bar {esc(name)}" style="width:{width}px"></span>'
                       "</td></tr>")
        return (f"<h3>{esc(title)}</h3><table><thead><tr><th>{esc(key)}</th><th class=num>items"
                f"</th><th></th></tr></thead><tbody>{''.join(trs)}</tbody></table>")

    status = s.get("status") or _count(rows, "status")
    verdicts = s.get("verdicts") or _count(rows, "verdict")
    return (f'<section id="status-counts"><h2>Counts by status and verdict</h2>'
            f'{block("status", status, "status")}{block("verdict", verdicts, "verdict")}</section>')


def _count(rows: pa.Table, col: str) -> dict:
    out: dict[str, int] = {}
    for v in rows.column(col).to_pylist():
        out[v or "none"] = out.get(v or "none", 0) + 1
    return out


def _histogram_section(s: dict, scores: list[float], labels) -> str:
    png = histogram_figure(scores, labels, s.get("threshold"))
    if png is None:
        body = '<p class="note">No item was scored, so there is no score histogram.</p>'
    else:
        body = img_tag(png, "histogram of p_fake")
        body += '<p class="note">Dashed line: the decision threshold.</p>'
    return f'<section id="histogram"><h2>Score histogram</h2>{body}</section>'


def _metrics_sections(s: dict, scores: list[float], labels) -> str:
    from deepaudit.models.metrics import binary_metrics

    if labels is None:
        return ('<section id="metrics-note"><h2>ROC and confusion matrix</h2><p class="note">'
                "The manifest has no <code>label</code> column with real/fake values, so "
                "there is no ROC curve or confusion matrix.</p></section>")
    y, x = labelled_pairs(scores, labels)
    thr = float(s.get("threshold") or 0.5)
    m = binary_metrics(y, x, thr)
    caveat = "" if s.get("model_trained") else (
        '<p class="note">The model is untrained: these describe its raw scores; its '
        "verdicts were withheld.</p>")
    png = roc_figure(scores, labels)
    if png is None:
        roc = ('<p class="note">A ROC curve needs both real and fake labelled items; '
               f"this run has {m.n_real} real and {m.n_fake} fake.</p>")
    else:
        roc = img_tag(png, "ROC curve")
    (tn, fp), (fn, tp) = m.confusion_matrix()
    cm = (
        '<table class="cm"><thead><tr><th>true \\ predicted</th><th>real</th><th>fake</th>'
        f'</tr></thead><tbody><tr><th>real</th><td class="hit" data-cell="tn">{tn}</td>'
        f'<td class="miss" data-cell="fp">{fp}</td></tr><tr><th>fake</th>'
        f'<td class="miss" data-cell="fn">{fn}</td><td class="hit" data-cell="tp">{tp}</td>'
        "</tr></tbody></table>"
    )
    stats = [["accuracy", fmt(m.accuracy)], ["precision", fmt(m.precision)],
             ["recall (TPR)", fmt(m.recall)], ["false positive rate", fmt(m.fpr)],
             ["F1", fmt(m.f1)], ["ROC AUC", fmt(m.roc_auc)],
             ["average precision", fmt(m.average_precision)]]
    return (
        f'<div class="grid"><section id="roc"><h2>ROC curve</h2>{roc}{caveat}</section>'
        f'<section id="confusion"><h2>Confusion matrix</h2><p class="note">{m.n} labelled, '
        f"scored items at threshold {thr:.3f}.</p>{cm}"
        f'{html_table(["metric", "value"], stats, "kv")}</section></div>'
    )


def _flagged_section(data: RunData, storage: StorageConfig, top: int) -> str:
    rows = data.rows
    fakes = rows.filter(pc.equal(rows.column("verdict"), "fake"))
    total = fakes.num_rows
    flagged = fakes.sort_by([("p_fake", "descending")]).slice(0, top).to_pylist()
    if not total:
        note = "No item was flagged fake."
        if not data.summary.get("model_trained", True):
            note += " The model is untrained, so every verdict was withheld."
        return f'<section id="flagged"><h2>Flagged items</h2><p class="note">{note}</p></section>'
    items = []
    for rank, r in enumerate(flagged, 1):
        thumb = _thumbnail(r.get("evidence"), r["media_id"], data.summary["run_id"], data.out,
                           storage)
        pic = (img_tag(thumb, f"evidence for {r['media_id']}", "image/jpeg", "thumb") if thumb
               else '<p class="note">no evidence for this item (over the evidence cap, '
                    "evidence off, or its files are gone)</p>")
        label = r.get("label")
        facts = [
            ("rank", str(rank)),
            ("media id", f'<span class="id">{esc(r["media_id"])}</span>'),
            ("uri", f'<span class="id">{esc(r.get("uri"))}</span>'),
            ("p_fake", f'<b>{fmt(r.get("p_fake"))}</b> (margin {fmt(r.get("margin"))})'),
            ("frames with a face", f'{esc(r.get("n_frames_with_face"))} of '
                                   f'{esc(r.get("n_frames_sampled"))} sampled'),
        ]
        if label is not None:
            facts.append(("label", esc(label)))
        if r.get("evidence"):
            facts.append(("evidence", f'<span class="id">{esc(r["evidence"])}</span>'))
        kv = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in facts)
        items.append(f'<div class="flagged-item"><table class="kv">{kv}</table>'
                     f"<div>{pic}</div></div>")
    more = f"<p class=note>Showing the top {top} of {total}.</p>" if total > top else ""
    legend = ('<p class="note">Each evidence strip shows, per suspicious frame: the face crop, '
              "the Grad-CAM of the video score, the Grad-CAM of the frame's own score, and the "
              "suspect-region mask (the video map thresholded at half its maximum; a Grad-CAM "
              "localisation, not a trained segmentation).</p>")
    return (f'<section id="flagged"><h2>Top flagged items ({total})</h2>{legend}'
            f'{"".join(items)}{more}</section>')


def _reviews_section(data: RunData, storage: StorageConfig) -> str:
    """Precision among the reviewed flags: of the flagged items a reviewer judged fake or
    real (their latest review, OUT/_reviews/), the share judged fake. Empty without reviews."""
    from deepaudit.pipeline.reviews import latest_reviews, read_reviews

    latest = latest_reviews(read_reviews(data.out, storage))
    if latest.num_rows == 0:
        return ""
    said = dict(zip(latest["media_id"].to_pylist(), latest["review"].to_pylist()))
    rows = data.rows
    flagged = rows.filter(pc.equal(rows.column("verdict"), "fake"))["media_id"].to_pylist()
    got = [said[m] for m in flagged if m in said]
    fake, real, unsure = (got.count(k) for k in ("fake", "real", "unsure"))
    judged = fake + real
    precision = f"<b>{fake / judged:.3f}</b> ({fake} of {judged})" if judged else "–"
    kv = [("flagged fake", str(len(flagged))), ("reviewed", str(len(got))),
          ("confirmed fake", str(fake)), ("overturned (reviewed real)", str(real)),
          ("unsure", str(unsure)), ("precision among the reviewed flags", precision)]
    body = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in kv)
    return (f'<section id="reviews"><h2>Reviews</h2><p class="note">The latest review of each '
            f"flagged item (OUT/_reviews/, written by deepaudit serve); unsure reviews are left "
            f'out of the precision.</p><table class="kv">{body}</table></section>')


def _errors_section(s: dict, rows: pa.Table, limit: int) -> str:
    codes = s.get("error_codes") or {}
    code_rows = [[esc(k), f'<span class="num">{esc(v)}</span>'] for k, v in codes.items()]
    not_ok = rows.filter(pc.not_equal(rows.column("status"), "ok"))
    n_bad = not_ok.num_rows
    shown = present_columns(rows, ["media_id", "status", "error"])
    bad = not_ok.slice(0, limit).select(shown).to_pylist()
    body = html_table(["error code", "items"], code_rows) if code_rows else \
        '<p class="note">No errors.</p>'
    if bad:
        shown = [[f'<span class="id">{esc(r["media_id"])}</span>', esc(r["status"]),
                  f'<span class="err">{esc((r.get("error") or "")[:400])}</span>']
                 for r in bad]
        body += "<h3>Items not scored</h3>" + html_table(["media id", "status", "error"], shown,
                                                       "error-rows")
        if n_bad > limit:
            body += f'<p class="note">{n_bad - limit} more not shown.</p>'
    return f'<section id="errors"><h2>Errors</h2>{body}</section>'


def _cluster_text(c) -> str:
    if not isinstance(c, dict):
        return "–"
    return esc(f"{c.get('where')}: {c.get('cpus', 0):g} CPUs, {c.get('gpus', 0):g} GPUs")


def _plan_text(p) -> str:
    if not isinstance(p, dict):
        return "–"
    try:
        text = (f"{p['decode_actors']} decode actor(s) x {p['decode_cpus']:.2g} CPU; "
                f"{p['classify_actors']} classifier actor(s) x {p['classify_cpus']:.2g} CPU"
                f"{' + 1 GPU' if p.get('classify_gpus') else ''}"
                f"{' x %d threads' % p['classify_calls'] if p.get('classify_calls', 1) > 1 else ''}"
                f"; batch {p['batch_size']} "
                f"videos; torch threads {p['torch_threads']}")
    except (KeyError, TypeError, ValueError):
        text = json.dumps(p)
    return esc(text)


def _throughput_section(s: dict, rows: pa.Table) -> str:
    tput = s.get("throughput_items_per_s")
    kv = [
        ("throughput", f"{tput:.3f} items/s" if isinstance(tput, (int, float)) else "–"),
        ("wall time",
         f'{s["wall_s"]:.1f} s' if isinstance(s.get("wall_s"), (int, float)) else "–"),
        ("cluster", _cluster_text(s.get("cluster"))),
        ("actor plan", _plan_text(s.get("plan"))),
    ]
    stage = []
    for col in ("decode_ms", "detect_ms", "classify_ms"):
        if col not in rows.column_names:
            continue
        v = np.array([x for x in rows.column(col).to_pylist() if x is not None], dtype=float)
        if v.size:
            stage.append([esc(col.replace("_ms", "")), f"{np.median(v):.0f}",
                          f"{np.percentile(v, 90):.0f}", f"{v.max():.0f}"])
    body = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in kv)
    table = html_table(["stage", "median ms / item", "p90 ms", "max ms"], stage) if stage else ""
    return (f'<section id="throughput"><h2>Throughput</h2><table class="kv">{body}</table>'
            f"{table}</section>")


def render_report(data: RunData, storage: StorageConfig | None = None, top: int = 50,
                  max_errors: int = 200) -> str:
    """The report page as one HTML string."""
    storage = storage or StorageConfig()
    s = data.summary
    scores, labels = labels_scores(data.rows)
    banners = []
    if not s.get("model_trained", True):
        banners.append("The model was untrained: scores are not evidence and verdicts were "
                       "withheld.")
    elif (s.get("model_quality") or {}).get("caveat"):
        caveat = s["model_quality"]["caveat"]
        banners.append(caveat[0].upper() + caveat[1:] + ".")
    if data.note:
        banners.append(data.note[0].upper() + data.note[1:] + ".")
    if s.get("state") == "failed":
        banners.append("The run failed; rows it could not finish are error rows.")
    banner = "".join(f'<div class="banner">{esc(b)}</div>' for b in banners)
    parts = [
        _summary_section(s),
        _counts_section(s, data.rows),
        _histogram_section(s, scores, labels),
        _metrics_sections(s, scores, labels),
        _flagged_section(data, storage, top),
        _reviews_section(data, storage),
        _errors_section(s, data.rows, max_errors),
        _throughput_section(s, data.rows),
    ]
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>deepaudit report {esc(s.get('run_id'))}</title><style>{CSS}</style></head>"
        f"<body><main><h1>deepaudit report</h1><div class=sub>run "
        f"<span class=id>{esc(s.get('run_id'))}</span> &middot; {esc(s.get('output'))}</div>"
        f"{banner}{''.join(parts)}</main></body></html>\n"
    )
