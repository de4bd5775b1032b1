"""botocore's retry modes with one kept client under random storage faults: S3 copies by
16 threads for ``--seconds`` each, through ``infra.faults.FaultProxy`` (10 % of requests
a 500, a 503 SlowDown or a late answer, 2 % reset) in front of moto on 127.0.0.1.
"adaptive" adds a client-side rate limit that every SlowDown tightens; with the client
kept for a whole run (infra/storage.py) it outlives the requests that earned it. Modes
alternate in one run. Prints one JSON line; ``--record`` appends it to
``bench/results/s3_retry_mode.jsonl``.

    python bench/s3_retry_mode.py [--seconds 40] [--rounds 2]
"""

from __future__ import annotations

import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import typer
from local_s3 import local_s3  # bench/local_s3.py, beside this script
from record import append_record, machine

RESULTS = "bench/results/s3_retry_mode.jsonl"
BUCKET = "retry-bench"
THREADS = 16
app = typer.Typer(add_completion=False)


def _client(endpoint: str, mode: str):
    import botocore.session
    from botocore.config import Config

    return botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        config=Config(retries={"max_attempts": 5, "mode": mode}, connect_timeout=10,
                      read_timeout=60, max_pool_connections=THREADS + 4))


def _copies(client, mode: str, seconds: float, sources: int) -> tuple[int, int]:
    done = failed = 0

    def copy(i: int) -> bool:
        try:
            client.copy_object(Bucket=BUCKET, Key=f"dst/{mode}/{i}",
                               CopySource={"Bucket": BUCKET, "Key": f"src/{i % sources}"})
            return True
        except Exception:  # noqa: BLE001 - a request that failed after its retries
            return False

    t, i = time.monotonic(), 0
    with ThreadPoolExecutor(THREADS) as pool:
        while time.monotonic() - t < seconds:
            for ok in pool.map(copy, range(i, i + THREADS)):
                done, failed = done + ok, failed + (not ok)
            i += THREADS
    return done, failed


@app.command()
def main(seconds: Annotated[float, typer.Option(help="Seconds per mode and round.")] = 40.0,
         rounds: Annotated[int, typer.Option(help="Rounds; the modes alternate.")] = 2,
         record: Annotated[bool, typer.Option(help="Append the line to bench/results/.")] = False,
         ) -> None:
    from deepaudit.infra.faults import FaultProxy

    copies: dict[str, list[int]] = {"standard": [], "adaptive": []}
    failures = {"standard": 0, "adaptive": 0}
    with local_s3() as endpoint:
        proxy = FaultProxy(endpoint, fault_rate=0.10, reset_rate=0.02, slow_s=1.0,
                           seed=1).start()
        try:
            direct = _client(endpoint, "standard")
            direct.create_bucket(Bucket=BUCKET)
            sources = 400
            for i in range(sources):
                direct.put_object(Bucket=BUCKET, Key=f"src/{i}", Body=os.urandom(20_000))
            for r in range(rounds):
                for mode in (("adaptive", "standard") if r % 2 == 0
                             else ("standard", "adaptive")):
                    done, failed = _copies(_client(proxy.endpoint, mode), mode, seconds,
                                           sources)
                    copies[mode].append(done)
                    failures[mode] += failed
        finally:
            proxy.stop()
    result = {"bench": "s3_retry_mode", "threads": THREADS, "seconds": seconds,
              "rounds": rounds, "fault_rate": 0.10, "reset_rate": 0.02,
              "copies": copies, "failed": failures,
              "adaptive_over_standard": round(statistics.median(copies["adaptive"])
                                              / statistics.median(copies["standard"]), 3),
              "machine": machine()}
    print(json.dumps(result))
    if record:
        append_record(RESULTS, result)


if __name__ == "__main__":
    app()
