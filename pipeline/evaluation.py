"""Evaluation (``deepaudit evaluate``): run the audit on a labelled manifest and score it.

The evaluation runs :func:`deepaudit.pipeline.audit.run_audit` itself (output under
``DIR/audit/``), so what is measured is exactly what users run: same decode, detector,
crops, model card, frames and threshold. It then joins the manifest's ``label`` column
(fake/real/1/0; anything else counts as unlabelled) and writes:

* ``DIR/metrics.json``: accuracy, precision, recall, F1, FPR, ROC AUC, average precision
  and the confusion matrix, overall, per media type and per group (``--group-column``,
  else a ``group`` or ``source`` column when the manifest has one); plus the items the
  audit could not score (no face, errors), counted per label and listed, never dropped;
* ``DIR/roc.png`` and ``DIR/hist.png``.

``--calibrate`` picks the threshold that keeps the false-positive rate on this
(validation) manifest at or under ``--target-fpr`` and writes it into the model card.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deepaudit.pipeline.audit import AuditConfig

STATUS_OK = "ok"  # deepaudit.pipeline.schema.STATUS_OK, without importing pyarrow for --help

log = logging.getLogger(__name__)

GROUP_CANDIDATES = ("group", "source")
MAX_LISTED = 1000


@dataclass(frozen=True)
class EvalConfig:
    """An evaluation: the audit it runs (built like any audit; its output is
    ``OUTPUT/audit``) and what to do with the scores."""

    audit: AuditConfig
    output: str
    group_column: str | None = None
    calibrate: bool = False
    record_ood: bool = False  # write the measurement into the card as out-of-domain quality
    target_fpr: float = 0.05
    perturbations: str | None = None  # e.g. "jpeg:50,resize:0.5": one more audit each

    def __post_init__(self) -> None:
        from deepaudit.models.perturb import parse_perturbations

        parse_perturbations(self.perturbations)  # validates
        if not 0.0 <= self.target_fpr < 1.0:
            raise ValueError(f"--target-fpr must be in [0, 1), got {self.target_fpr}")
        if self.calibrate and self.record_ood:
            raise ValueError("--calibrate tunes on validation data and --record-out-of-domain "
                             "records a measurement on unseen sources: use one per run")
        if self.calibrate and self.audit.threshold is not None:
            raise ValueError("--calibrate chooses the threshold itself: drop --threshold")

    @property
    def manifest(self) -> str:
        return self.audit.manifest

    @classmethod
    def build(cls, manifest: str, output: str, perturb: str | None = None,
              group_column: str | None = None, calibrate: bool = False,
              record_ood: bool = False, target_fpr: float = 0.05, **audit) -> EvalConfig:
        """An evaluation of ``manifest`` into ``output``; ``audit``: AuditConfig fields."""
        from deepaudit.infra.storage import join
        from deepaudit.pipeline.audit import AuditConfig

        return cls(AuditConfig(manifest=manifest, output=join(output, "audit"), **audit),
                   output, group_column, calibrate, record_ood, target_fpr, perturb)


def _calibration_card(model: str | None) -> Path:
    """The card --calibrate will rewrite; refuse anything but a trained checkpoint path."""
    from deepaudit.models.checkpoint import resolve_model

    if model is None or Path(model).suffix not in (".json", ".safetensors"):
        raise ValueError(
            "--calibrate and --record-out-of-domain write into a model card: pass --model "
            "PATH/TO/card.json "
            "(or its .safetensors), not a registered name. Copy a shipped model's card and "
            "weights elsewhere first if you want to calibrate them.")
    handle = resolve_model(model)
    if not handle.trained:
        raise ValueError(f"{model} is an untrained model: its scores cannot be calibrated")
    return Path(model).with_suffix(".json")


def _block(labels: list[int], scores: list[float], threshold: float) -> dict | None:
    from deepaudit.models.metrics import binary_metrics

    return binary_metrics(labels, scores, threshold).to_dict() if labels else None


def compute_metrics(rows: list[dict], threshold: float, group_column: str | None) -> dict:
    """Metrics over verdict rows that carry the manifest's ``label`` (and group) column."""
    from deepaudit.pipeline.manifest import parse_label

    labelled, unlabelled = [], 0
    for r in rows:
        y = parse_label(r.get("label"))
        if y is None:
            unlabelled += 1
        else:
            labelled.append((y, r))
    scored = [(y, r) for y, r in labelled
              if r["status"] == STATUS_OK and r["p_fake"] is not None]
    unscored = [(y, r) for y, r in labelled if not (r["status"] == STATUS_OK
                                                    and r["p_fake"] is not None)]
    by_label: dict[str, Counter] = {"real": Counter(), "fake": Counter()}
    for y, r in labelled:
        by_label["fake" if y else "real"][r["status"]] += 1
    codes = Counter((r["error"] or "error").split(":", 1)[0] for _, r in unscored)

    def metrics_for(pairs) -> dict | None:
        return _block([y for y, _ in pairs], [float(r["p_fake"]) for _, r in pairs], threshold)

    out = {
        "threshold": threshold,
        "counts": {
            "items": len(rows), "labelled": len(labelled), "unlabelled": unlabelled,
            "scored": len(scored), "unscored": len(unscored),
            "coverage": len(scored) / len(labelled) if labelled else None,
            "by_label": {k: dict(v) for k, v in by_label.items()},
            "unscored_codes": dict(codes.most_common()),
        },
        "overall": metrics_for(scored),
        "by_media_type": {},
        "by_group": {},
        "group_column": group_column,
        "unscored_items": [
            {"media_id": r["media_id"], "uri": r["uri"], "label": "fake" if y else "real",
             "status": r["status"], "error": r["error"]} for y, r in unscored[:MAX_LISTED]],
    }
    for mt in sorted({r["media_type"] or "unknown" for _, r in scored}):
        out["by_media_type"][mt] = metrics_for([(y, r) for y, r in scored
                                                if (r["media_type"] or "unknown") == mt])
    if group_column:
        for g in sorted({str(r.get(group_column)) for _, r in labelled}):
            part = [(y, r) for y, r in scored if str(r.get(group_column)) == g]
            out["by_group"][g] = {
                "labelled": sum(str(r.get(group_column)) == g for _, r in labelled),
                "scored": len(part), "metrics": metrics_for(part)}
    return out


def robustness(runs: dict[str, list[dict]], threshold: float) -> dict:
    """AUC, and recall and FPR at ``threshold``, per perturbation (``runs`` maps a
    perturbation's name to its verdict rows; ``none`` is the baseline), on the labelled
    items scored in every run, with each one's AUC change against the baseline."""
    from deepaudit.models.metrics import binary_metrics
    from deepaudit.pipeline.manifest import parse_label

    def scored(rows: list[dict]) -> dict[str, tuple[int, float]]:
        return {r["media_id"]: (parse_label(r.get("label")), float(r["p_fake"])) for r in rows
                if parse_label(r.get("label")) is not None and r["status"] == STATUS_OK
                and r["p_fake"] is not None}

    per_run = {name: scored(rows) for name, rows in runs.items()}
    common = sorted(set.intersection(*(set(v) for v in per_run.values()))) if per_run else []
    out: dict = {"items": len(common), "threshold": threshold, "by_perturbation": {}}
    for name, items in per_run.items():
        labels = [items[m][0] for m in common]
        m = binary_metrics(labels, [items[m][1] for m in common], threshold)
        out["by_perturbation"][name] = {"roc_auc": m.roc_auc, "recall": m.recall,
                                        "fpr": m.fpr, "accuracy": m.accuracy}
    base = out["by_perturbation"].get("none", {}).get("roc_auc")
    for v in out["by_perturbation"].values():
        v["delta_auc"] = None if base is None or v["roc_auc"] is None else v["roc_auc"] - base
    return out


def validate_eval_manifest(uri: str, storage=None):
    """The manifest as audit reads it (same reader, same column rules), plus a ``label``
    column; raises ManifestError/ValueError with what to fix."""
    from deepaudit.pipeline.manifest import read_manifest
    from deepaudit.pipeline.schema import RESERVED_COLUMNS

    manifest = read_manifest(uri, RESERVED_COLUMNS, storage)
    if "label" not in manifest.column_names:
        raise ValueError(f"{uri} has no 'label' column (fake/real or 1/0) to evaluate against")
    return manifest


def out_of_domain_record(result: dict, manifest: str) -> dict:
    """What a card keeps of an evaluation on unseen sources: AUC overall and per media
    type, FPR and recall at the card's threshold, counts, robustness, when and on what."""
    overall = result["overall"] or {}
    by_type = result["by_media_type"]
    record = {
        "data": manifest, "roc_auc": overall.get("roc_auc"),
        "fpr": overall.get("fpr"), "recall": overall.get("recall"),
        "threshold": result["threshold"], "n_real": overall.get("n_real"),
        "n_fake": overall.get("n_fake"), "coverage": result["counts"]["coverage"],
        "evaluated_at": result["evaluated_at"],
    }
    for kind, m in by_type.items():
        record[f"{kind}_roc_auc"] = (m or {}).get("roc_auc")
        record[f"{kind}_fpr"] = (m or {}).get("fpr")
    if "robustness" in result:
        record["robustness"] = {k: {"roc_auc": v["roc_auc"], "delta_auc": v["delta_auc"]}
                                for k, v in result["robustness"]["by_perturbation"].items()}
    return record


def run_evaluate(cfg: EvalConfig, on_rows: Callable[[int, int], None] | None = None) -> dict:
    """Audit ``cfg.manifest`` with the model and write the metrics; return them."""
    from deepaudit.infra.storage import check_writable, filesystem_for, join
    from deepaudit.models.checkpoint import set_card_out_of_domain, set_card_threshold
    from deepaudit.models.metrics import histogram_png, roc_png
    from deepaudit.models.perturb import parse_perturbations
    from deepaudit.pipeline.audit import run_audit
    from deepaudit.pipeline.manifest import parse_label
    from deepaudit.pipeline.writer import read_verdicts

    audit = cfg.audit
    storage = audit.storage
    manifest = validate_eval_manifest(cfg.manifest, storage)  # before anything heavy
    check_writable(cfg.output, storage, what="--output")
    card_path = _calibration_card(audit.model) if cfg.calibrate or cfg.record_ood else None
    group_column = cfg.group_column
    if group_column is not None and group_column not in manifest.column_names:
        raise ValueError(f"--group-column {group_column!r} is not a column of {cfg.manifest} "
                         f"(columns: {', '.join(manifest.column_names)})")
    if group_column is None:
        group_column = next((c for c in GROUP_CANDIDATES if c in manifest.column_names), None)
    if any(p.kind == "pgd" for p in parse_perturbations(cfg.perturbations)):
        from deepaudit.models.checkpoint import resolve_model
        from deepaudit.models.registry import get_config

        arch = resolve_model(audit.model).config.arch
        if "blocks" not in get_config(arch).arch_kwargs:  # no CLIP branch: no attack
            raise ValueError(f"--perturb pgd needs a detector with a CLIP branch (e.g. "
                             f"clip_effnet_fused); {arch} has no white-box attack")

    summary = run_audit(audit, on_rows=on_rows)
    rows = read_verdicts(summary["output"], storage).to_pylist()
    threshold = float(summary["threshold"])
    perturbed, perturbed_runs = {"none": rows}, {"none": summary["output"]}
    for spec in parse_perturbations(cfg.perturbations)[1:]:
        tag = spec.name.replace(":", "-")
        # The same audit with every crop perturbed, at the baseline run's threshold.
        run = run_audit(replace(audit, output=join(cfg.output, f"audit-{tag}"),
                                threshold=threshold, perturb=spec.name, evidence=False),
                        on_rows=on_rows)
        perturbed[spec.name] = read_verdicts(run["output"], storage).to_pylist()
        perturbed_runs[spec.name] = run["output"]
    result = {
        "manifest": cfg.manifest,
        "model": summary["model"],
        "model_trained": summary["model_trained"],
        "audit_run": summary["output"],
        "audit_state": summary["state"],
        "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **compute_metrics(rows, threshold, group_column),
    }
    if len(perturbed) > 1:
        result["robustness"] = {**robustness(perturbed, threshold), "runs": perturbed_runs}
    scored = [r for r in rows if parse_label(r.get("label")) is not None
              and r["status"] == STATUS_OK and r["p_fake"] is not None]
    labels = [parse_label(r["label"]) for r in scored]
    scores = [float(r["p_fake"]) for r in scored]
    if cfg.calibrate:
        result["calibration"] = _calibrate(card_path, labels, scores, cfg, summary)
        set_card_threshold(card_path, result["calibration"]["threshold"],
                           {k: v for k, v in result["calibration"].items() if k != "metrics"})
    if cfg.record_ood:
        result["out_of_domain"] = out_of_domain_record(result, cfg.manifest)
        set_card_out_of_domain(card_path, result["out_of_domain"])
    fs, base = filesystem_for(cfg.output, storage)
    fs.makedirs(base, exist_ok=True)
    plots = []
    if scored:
        title = f"{summary['model']} on {Path(cfg.manifest).name}"
        for name, png in (("roc.png", roc_png(labels, scores, title=title)),
                          ("hist.png", histogram_png(scores, labels, threshold, title=title))):
            with fs.open(f"{base}/{name}", "wb") as f:
                f.write(png)
            plots.append(join(cfg.output, name))
    result["plots"] = plots
    with fs.open(f"{base}/metrics.json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    result["metrics_file"] = join(cfg.output, "metrics.json")
    return result


def _calibrate(card_path: Path, labels: list[int], scores: list[float], cfg: EvalConfig,
               summary: dict) -> dict:
    from deepaudit.models.metrics import binary_metrics, threshold_at_fpr

    if 0 not in labels:
        raise ValueError("calibration needs scored real items (label real/0) in the manifest")
    t = threshold_at_fpr(labels, scores, cfg.target_fpr)
    if not t < 1.0:  # a real scored 1.0: no threshold in (0, 1) keeps it out
        t = math.nextafter(1.0, 0.0)
    t = max(t, 1e-6)
    m = binary_metrics(labels, scores, t)
    return {
        "threshold": t, "target_fpr": cfg.target_fpr, "achieved_fpr": m.fpr,
        "recall_at_threshold": m.recall, "n_real": m.n_real, "n_fake": m.n_fake,
        "manifest": cfg.manifest, "previous_threshold": summary["threshold"],
        "card": str(card_path), "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "metrics": m.to_dict(),
    }


def reviewed_manifest(reviews: str, output: str, storage=None) -> str:
    """Write ``OUTPUT/reviewed_manifest.csv``: the latest review of each item reviewed in
    ``reviews`` (an audit output or ledger) as ``uri,label,media_id``, fake or real
    (unsure left out); return its path."""
    import csv
    import io

    from deepaudit.infra.storage import filesystem_for, join
    from deepaudit.pipeline.reviews import latest_reviews, read_reviews

    latest = [r for r in latest_reviews(read_reviews(reviews, storage)).to_pylist()
              if r["review"] in ("fake", "real") and r.get("uri")]
    if not latest:
        raise ValueError(f"--reviews {reviews}: no item there is reviewed fake or real yet "
                         "(review items in deepaudit serve first)")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["uri", "label", "media_id"])
    for r in latest:
        w.writerow([r["uri"], r["review"], r["media_id"]])
    path = join(output, "reviewed_manifest.csv")
    fs, where = filesystem_for(path, storage)
    fs.makedirs(where.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(where, "w") as f:
        f.write(buf.getvalue())
    return path
