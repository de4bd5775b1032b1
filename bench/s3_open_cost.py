"""CPU of opening an s3:// item as the decode stage does (``open_source``: a HEAD and a
presigned URL), with the process's cached S3 client against a new client per item, the
way every item was opened before 16ccc63. Both alternate in one run, against a moto
server on 127.0.0.1 in the same process (its CPU counts in both). Prints one JSON line;
``--record`` appends it to ``bench/results/s3_open_cost.jsonl``.

    python bench/s3_open_cost.py [--items 40] [--repeats 3]
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Annotated

import typer
from local_s3 import local_s3  # bench/local_s3.py, beside this script
from record import append_record, machine

from deepaudit.infra import storage
from deepaudit.infra.storage import StorageConfig
from deepaudit.pipeline.media import DecodeConfig, open_source

RESULTS = "bench/results/s3_open_cost.jsonl"
app = typer.Typer(add_completion=False)


def _cpu_ms_per_item(uris: list[str], cfg: StorageConfig, fresh: bool) -> float:
    decode = DecodeConfig(frames=4)
    t = time.process_time()
    for uri in uris:
        if fresh:  # what s3_filesystem did before: a new client for every call
            storage._S3_CLIENTS.clear()
        with open_source(uri, cfg, decode) as source:
            assert source.size_bytes > 0
    return (time.process_time() - t) * 1000 / len(uris)


@app.command()
def main(items: Annotated[int, typer.Option(help="Objects opened per measurement.")] = 40,
         repeats: Annotated[int, typer.Option(help="Alternating rounds.")] = 3,
         record: Annotated[bool, typer.Option(help="Append the line to bench/results/.")] = False,
         ) -> None:
    with local_s3() as endpoint:
        cfg = StorageConfig(endpoint_url=endpoint)
        fs = storage.s3_filesystem(cfg)
        fs.mkdir("bench")
        uris = []
        for i in range(items):
            fs.pipe(f"bench/item-{i}.jpg", b"\xff\xd8" + os.urandom(2048))
            uris.append(f"s3://bench/item-{i}.jpg")
        _cpu_ms_per_item(uris[:4], cfg, fresh=False)  # imports and first connection
        cached, fresh = [], []
        for _ in range(repeats):
            fresh.append(_cpu_ms_per_item(uris, cfg, fresh=True))
            cached.append(_cpu_ms_per_item(uris, cfg, fresh=False))
    result = {"bench": "s3_open_cost", "items": items, "repeats": repeats,
              "cpu_ms_per_item_new_client": round(statistics.median(fresh), 1),
              "cpu_ms_per_item_cached_client": round(statistics.median(cached), 1),
              "ratio": round(statistics.median(cached) / statistics.median(fresh), 3),
              "machine": machine()}
    print(json.dumps(result))
    if record:
        append_record(RESULTS, result)


if __name__ == "__main__":
    app()
