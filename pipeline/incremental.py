"""Incremental audits: what this run audits given the ledger, and what it records there.

Kept out of :mod:`deepaudit.pipeline.audit` on purpose: the audit calls
:func:`prepare_incremental` before it starts the pipeline, hands
:meth:`Incremental.on_file_closed` to its verdict writer, and asks
:meth:`Incremental.items` for the summary's counts.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc

from deepaudit.infra.storage import StorageConfig, filesystem_for, is_s3, join
from deepaudit.pipeline.ledger import (
    GAVE_UP,
    NEW,
    PLAN_SCHEMA,
    REASONS,
    SKIPPED,
    Ledger,
    LedgerPolicy,
    change_keys,
    decide,
    ledger_rows,
)

log = logging.getLogger(__name__)

@dataclass
class Incremental:
    """The to-do part of the manifest and the bookkeeping around it."""

    todo: pa.Table  # manifest rows to audit; ``manifest_row`` keeps the original positions
    manifest_rows: int
    reasons: Counter = field(default_factory=Counter)
    recovered: int = 0
    ledger: Ledger | None = None
    plan: pa.Table | None = None
    model: str = ""
    run_id: str = ""
    parts: list[str] = field(default_factory=list)

    def on_file_closed(self, file_uri: str, rows: pa.Table) -> None:
        """Ledger the rows of a verdict file that was just durably closed."""
        if self.ledger is None:
            return
        stem = file_uri.rsplit("/", 1)[-1].removesuffix(".parquet").removeprefix("verdicts-")
        part = ledger_rows(rows, self.plan, self.model, self.run_id, file_uri)
        self.parts.append(self.ledger.append(f"{self.run_id}-{stem}", part))

    def items(self, audited: int, failed: int) -> dict:
        """The summary's item counts."""
        out = {"manifest": self.manifest_rows}
        out.update({r: self.reasons.get(r, 0) for r in REASONS})
        out.update(recovered=self.recovered, audited=audited, failed=failed,
                   ledger=self.ledger.uri if self.ledger else None)
        return out

    def finish(self, state: str) -> None:
        if self.ledger is not None:
            self.ledger.finish_run(self.run_id, state=state, parts=len(self.parts))


def prepare_incremental(
    manifest: pa.Table,
    ledger_uri: str | None,
    policy: LedgerPolicy,
    model: str,
    run_id: str,
    run_dir: str,
    storage: StorageConfig,
    started_at: datetime | None = None,
) -> Incremental:
    """Decide, per manifest row, whether this run audits it; record the run's plan."""
    n = manifest.num_rows
    if not ledger_uri:
        return Incremental(todo=manifest, manifest_rows=n, reasons=Counter({NEW: n}))
    ledger = Ledger(ledger_uri, storage)
    ledger.migrate()
    entries = ledger.read()
    crashed = ledger.unfinished_runs(exclude=run_id)
    recovered = ledger.reconcile(entries, current_run=run_id)
    for run in crashed:
        settle_evidence(run["output"], run["run_id"], storage)
    if recovered.num_rows:
        entries = pa.concat_tables([entries, recovered])
    keys = change_keys(manifest, storage)
    items = pa.table({"manifest_row": manifest["manifest_row"],
                      "media_id": manifest["media_id"], "change_key": keys})
    decision = decide(items, entries, model, policy)
    reasons = Counter(decision["reason"].to_pylist())
    mask = pc.invert(pc.is_in(decision["reason"], pa.array([SKIPPED, GAVE_UP])))
    todo = manifest.filter(mask)
    plan = pa.table({
        "manifest_row": manifest["manifest_row"],
        "media_id": manifest["media_id"],
        "uri": manifest["uri"],
        "change_key": keys,
        "attempt": decision["attempt"],
        "reason": decision["reason"],
    }, schema=PLAN_SCHEMA).filter(mask)
    ledger.start_run(run_id, run_dir, model, plan, started_at=started_at)
    log.info("ledger %s: %s; %d recovered from unfinished runs", ledger_uri,
             dict(reasons), recovered.num_rows)
    return Incremental(todo=todo, manifest_rows=n, reasons=reasons,
                       recovered=recovered.num_rows, ledger=ledger, plan=plan, model=model,
                       run_id=run_id)


def settle_evidence(run_dir: str, run_id: str, storage: StorageConfig) -> int:
    """Evidence of a run that ended without closing (SIGKILL): move what its published
    verdict rows point to out of staging, and delete the rest. Returns the items kept."""
    import pyarrow.parquet as pq

    from deepaudit.pipeline.evidence import drop_staging, promote, staging_root

    out = run_dir.rstrip("/").rsplit("/", 2)[0]  # OUT of OUT/runs/<run_id>
    out = out if is_s3(out) else filesystem_for(out)[1]  # evidence URIs are absolute
    root = join(out, "evidence")
    staging = staging_root(root, run_id)
    fs, staging_path = filesystem_for(staging, storage)
    if not fs.exists(staging_path):
        return 0
    out_fs, path = filesystem_for(run_dir, storage)
    uris: list[str] = []
    if out_fs.exists(path):
        for f in sorted(out_fs.ls(path, detail=False)):
            name = f.rsplit("/", 1)[-1]
            if name.startswith("verdicts-") and name.endswith(".parquet"):
                with out_fs.open(f, "rb") as fh:
                    uris += [u for u in pq.read_table(fh, columns=["evidence"])["evidence"]
                             .to_pylist() if u]
    kept = promote(root, staging, uris, storage)
    drop_staging(staging, storage)
    return kept
