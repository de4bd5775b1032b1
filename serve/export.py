"""The exports of ``deepaudit serve``: the items a filter selects as CSV (text cells a
spreadsheet would run as formulas neutralised) or Parquet (exact)."""

from __future__ import annotations

import io
import time

import pyarrow as pa
import pyarrow.compute as pc
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from deepaudit.serve.common import NotFound
from deepaudit.serve.item_query import ItemQuery
from deepaudit.serve.site import Site

# A CSV cell starting with one of these is a formula to a spreadsheet (OWASP, "CSV
# injection"): the export prefixes a single quote, which shows the text as it is.
FORMULA_START = "^[=+\\-@\t\r]"


def neutralise(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` with every text cell (and column name) that a spreadsheet would run as a
    formula prefixed with ``'``; numbers, times and nulls unchanged."""
    def safe(name: str) -> str:
        return "'" + name if name[:1] in ("=", "+", "-", "@", "\t", "\r") else name

    cols = []
    for col, f in zip(batch.columns, batch.schema):
        if pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
            risky = pc.fill_null(pc.match_substring_regex(col, FORMULA_START), False)
            col = pc.if_else(risky, pc.binary_join_element_wise("'", col, ""), col)
        cols.append(col)
    return pa.RecordBatch.from_arrays(cols, names=[safe(n) for n in batch.schema.names])


def routes(site: Site) -> list[Route]:
    def items_export(request: Request):
        fmt = request.path_params["fmt"]
        if fmt not in ("csv", "parquet"):
            raise NotFound(f"no export as {fmt!r}: there are items.csv and items.parquet")
        q = ItemQuery.parse(request.query_params)  # validated whole; the page is ignored
        reader = site.archive.export(q)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        headers = {"Content-Disposition": f'attachment; filename="deepaudit-items-{stamp}.{fmt}"'}
        if fmt == "csv":
            import pyarrow.csv as pacsv

            def rows():
                first = True
                for batch in reader:  # cells a spreadsheet would run are neutralised
                    buf = io.BytesIO()
                    pacsv.write_csv(neutralise(batch), buf,
                                    pacsv.WriteOptions(include_header=first))
                    first = False
                    yield buf.getvalue()
            return StreamingResponse(rows(), media_type="text/csv", headers=headers)
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        with pq.ParquetWriter(buf, reader.schema) as w:
            for batch in reader:
                w.write_batch(batch)
        return Response(buf.getvalue(), media_type="application/vnd.apache.parquet",
                        headers=headers)

    return [
        Route("/items.{fmt:str}", items_export),
    ]
