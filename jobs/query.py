"""``deepaudit query OUT_OR_LEDGER "SQL"``: options in,
:func:`deepaudit.pipeline.query.run_query` out (SQL over the verdicts with DuckDB; the
views are listed there), printed as a table, CSV or JSON lines."""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape


class OutputFormat(str, Enum):
    table = "table"
    csv = "csv"
    jsonl = "jsonl"


def query_command(
    target: Annotated[
        str, typer.Argument(metavar="TARGET",
                            help="An audit output folder (OUT, all its runs) or a ledger, "
                            "local or s3://.")
    ],
    sql: Annotated[
        str, typer.Argument(metavar="SQL",
                            help="SQL over the views verdicts, latest, runs, last_run, "
                            "reviews, ledger, ledger_latest. Example: \"SELECT status, "
                            "count(*) FROM latest GROUP BY ALL\"")
    ],
    fmt: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="table (at most --limit rows "
                                   "shown), csv or jsonl (every row, on stdout).")
    ] = OutputFormat.table,
    limit: Annotated[int, typer.Option(min=1, help="Rows shown by --format table.")] = 50,
    s3_endpoint: Annotated[
        Optional[str], typer.Option(help="S3 endpoint URL (overrides AWS_ENDPOINT_URL).")
    ] = None,
) -> None:
    """Run SQL (DuckDB) over the verdicts of an audit output or a ledger."""
    from deepaudit.infra.storage import StorageConfig
    from deepaudit.pipeline.query import QueryError, run_query
    from deepaudit.pipeline.terminal import print_query_table

    err = Console(stderr=True)
    try:
        result = run_query(target, sql, StorageConfig(endpoint_url=s3_endpoint))
    except QueryError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    if fmt is OutputFormat.csv:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        sink = pa.BufferOutputStream()
        pacsv.write_csv(result, sink)
        sys.stdout.write(sink.getvalue().to_pybytes().decode())
    elif fmt is OutputFormat.jsonl:
        for row in result.to_pylist():
            sys.stdout.write(json.dumps(row, default=str) + "\n")
    else:
        print_query_table(result, limit, err)
