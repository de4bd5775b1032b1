"""What the HTML report and ``deepaudit serve`` draw alike: the stylesheet, escaping and
small HTML pieces, label reading, and the score histogram and ROC figures (PNG, from
:mod:`deepaudit.models.metrics`). No command code: both surfaces import it."""

from __future__ import annotations

import base64
import html

import pyarrow as pa

FAKE_LABELS = {"fake", "1", "true", "deepfake", "manipulated", "synthetic"}
REAL_LABELS = {"real", "0", "false", "original", "pristine", "authentic"}
def label_value(label) -> int | None:
    """1 fake, 0 real, None unlabelled/unknown."""
    if label is None:
        return None
    text = str(label).strip().lower()
    return 1 if text in FAKE_LABELS else 0 if text in REAL_LABELS else None


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def img_tag(png: bytes, alt: str, mime: str = "image/png", cls: str = "plot") -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{cls}" alt="{esc(alt)}" src="data:{mime};base64,{data}">'


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return esc(v)


def html_table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


CSS = """
:root { --fg:#1d2330; --muted:#667085; --line:#e4e7ec; --bg:#f7f8fa; --fake:#c0392b;
        --real:#1e8449; --warn:#b54708; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
       color:var(--fg); background:var(--bg); }
main { max-width:1180px; margin:0 auto; padding:24px; }
h1 { margin:0 0 4px; font-size:24px; } h2 { font-size:18px; margin:0 0 12px; }
.sub { color:var(--muted); margin-bottom:16px; }
section { background:#fff; border:1px solid var(--line); border-radius:8px; padding:16px 20px;
          margin:0 0 16px; }
.grid { display:grid; grid-template-columns:repeat(auto-fit,minmax(320px,1fr)); gap:16px; }
.grid > section { margin:0; }
table { border-collapse:collapse; width:100%; }
th, td { text-align:left; padding:5px 8px; border-bottom:1px solid var(--line);
         vertical-align:top; }
th { color:var(--muted); font-weight:600; font-size:12px; text-transform:uppercase; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
.kv td:first-child { color:var(--muted); width:34%; }
.id { font-family:ui-monospace,Menlo,Consolas,monospace; font-size:12px; word-break:break-all; }
.badge { display:inline-block; padding:1px 8px; border-radius:10px; font-size:12px;
         font-weight:600; color:#fff; background:var(--muted); }
.badge.fake { background:var(--fake); } .badge.real { background:var(--real); }
.badge.completed { background:var(--real); } .badge.failed { background:var(--fake); }
.banner { border-left:4px solid var(--warn); background:#fffaeb; padding:10px 14px;
          margin:0 0 16px; border-radius:4px; }
.bar { height:10px; background:#98a2b3; border-radius:2px; display:inline-block; }
.bar.ok, .bar.real { background:var(--real); } .bar.fake, .bar.error { background:var(--fake); }
.bar.no_face { background:var(--warn); }
img.plot { max-width:100%; height:auto; }
img.thumb { max-width:600px; width:100%; border:1px solid var(--line); border-radius:4px; }
.cm td, .cm th { text-align:center; width:33%; }
.cm td.hit { background:#ecfdf3; font-weight:700; } .cm td.miss { background:#fef3f2; }
.note { color:var(--muted); }
.flagged-item { display:grid; grid-template-columns:360px 1fr; gap:16px; padding:12px 0;
                border-bottom:1px solid var(--line); }
.flagged-item .kv td:first-child { width:96px; }
.flagged-item:last-child { border-bottom:0; }
.err { font-family:ui-monospace,Menlo,Consolas,monospace; font-size:12px; word-break:break-word; }
"""


def labels_scores(rows: pa.Table) -> tuple[list[float], list[int | None] | None]:
    """The scored rows' p_fake and, when the rows carry real/fake labels, their labels."""
    scored = [r for r in rows.select(present_columns(rows, ["p_fake", "label"])).to_pylist()
              if r.get("p_fake") is not None]
    scores = [float(r["p_fake"]) for r in scored]
    if "label" not in rows.column_names:
        return scores, None
    labels = [label_value(r.get("label")) for r in scored]
    return scores, (labels if any(v is not None for v in labels) else None)


def present_columns(rows: pa.Table, names: list[str]) -> list[str]:
    return [n for n in names if n in rows.column_names]


def histogram_figure(scores: list[float], labels, threshold: float | None) -> bytes | None:
    """The run's score histogram (PNG; split by label when there are labels), or None when
    nothing was scored. The report and ``deepaudit serve`` draw it with this function."""
    from deepaudit.models.metrics import histogram_png

    if not scores:
        return None
    return histogram_png(scores, labels, threshold, title=f"p_fake ({len(scores)} items)")


def labelled_pairs(scores: list[float], labels) -> tuple[list[int], list[float]]:
    """(labels, scores) of the items with a real/fake label."""
    pairs = [(lab, sc) for lab, sc in zip(labels or [], scores) if lab is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def roc_figure(scores: list[float], labels) -> bytes | None:
    """The ROC curve (PNG) of the labelled, scored items, or None without both classes.
    The report and ``deepaudit serve`` draw it with this function."""
    from deepaudit.models.metrics import roc_png

    y, x = labelled_pairs(scores, labels)
    if not (0 < sum(y) < len(y)):
        return None
    return roc_png(y, x, title=f"ROC ({len(y)} labelled items)")
