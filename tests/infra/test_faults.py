"""The fault injectors of the chaos bench and the S3 tests (deepaudit.infra.faults): each
proxy fault looks on the wire as it should (500, 503 SlowDown, a late answer, a TCP reset
before or halfway through a body), random rates are honoured and s3fs rides them out;
the worker killer picks only Ray Data actor processes below this one."""

from __future__ import annotations

import http.client
import subprocess
import time

import pytest

from deepaudit.infra.faults import FaultProxy, WorkerKiller
from deepaudit.infra.storage import StorageConfig, s3_filesystem

pytestmark = [pytest.mark.s3]


@pytest.fixture(scope="module")
def blob(s3fs_client) -> bytes:
    data = bytes(range(256)) * 1024  # 256 KiB
    s3fs_client.pipe_file("audit/faults/blob.bin", data)
    return data


def _get(proxy: FaultProxy, key: str = "audit/faults/blob.bin"):
    """A GET of ``key`` through ``proxy`` on a presigned URL, as ffmpeg reads media."""
    if not hasattr(proxy, "url"):
        proxy.url = s3_filesystem(StorageConfig(endpoint_url=proxy.endpoint)).url(key)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.server.server_address[1], timeout=30)
    conn.request("GET", proxy.url.split(proxy.endpoint, 1)[1])
    return conn, conn.getresponse()


@pytest.mark.parametrize("mode, status, code", [("500", 500, b"InternalError"),
                                                ("503", 503, b"SlowDown")])
def test_error_answers(s3_server, blob, mode, status, code):
    proxy = FaultProxy(s3_server, fail_every=1, modes=(mode,)).start()
    try:
        conn, resp = _get(proxy)
        assert resp.status == status and code in resp.read()
        conn.close()
        assert proxy.counts()["faults"] == {mode: 1}
    finally:
        proxy.stop()


def test_slow_answers_late_but_whole(s3_server, blob):
    proxy = FaultProxy(s3_server, fail_every=1, modes=("slow",), slow_s=0.5).start()
    try:
        t0 = time.monotonic()
        conn, resp = _get(proxy)
        assert resp.status == 200 and resp.read() == blob
        assert time.monotonic() - t0 >= 0.5
        conn.close()
    finally:
        proxy.stop()


def test_resets_are_resets_not_clean_closes(s3_server, blob):
    """A reset before the answer fails the read with ECONNRESET (not the orderly EOF of
    ``drop``); one halfway through a GET delivers headers and part of the body first."""
    proxy = FaultProxy(s3_server, fail_every=1, modes=("reset",), seed=3).start()
    seen = set()
    try:
        for _ in range(12):
            try:
                conn, resp = _get(proxy)
            except http.client.RemoteDisconnected:
                pytest.fail("a reset must not look like an orderly close")
            except ConnectionResetError:
                seen.add("before")
                continue
            assert resp.status == 200
            with pytest.raises((http.client.IncompleteRead, ConnectionResetError)):
                resp.read()
            seen.add("midway")
            conn.close()
        assert seen == {"before", "midway"}
    finally:
        proxy.stop()
    drop = FaultProxy(s3_server, fail_every=1, modes=("drop",)).start()
    try:
        with pytest.raises(http.client.RemoteDisconnected):
            _get(drop)
    finally:
        drop.stop()


def test_random_rates_and_clients_ride_them_out(s3_server, s3fs_client):
    proxy = FaultProxy(s3_server, modes=("500", "503", "slow"), fault_rate=0.25,
                       reset_rate=0.05, slow_s=0.05, seed=7).start()
    try:
        fs = s3_filesystem(StorageConfig(endpoint_url=proxy.endpoint))
        payloads = {f"audit/faults/rand/{i}.bin": bytes([i]) * (1000 + i) for i in range(12)}
        for key, data in payloads.items():
            fs.pipe_file(key, data)
        for key, data in payloads.items():
            assert fs.cat_file(key) == data
        counts = proxy.counts()
        faults = counts["faults"]
        assert counts["requests"] >= 24 and "reset" in faults
        assert set(faults) <= {"500", "503", "slow", "reset"} and len(faults) >= 3, faults
        share = (sum(faults.values()) - faults["reset"]) / counts["requests"]
        assert 0.1 < share < 0.45, counts
        proxy.set_faults(0.0, 0.0)
        proxy.reset_counts()
        assert fs.cat_file("audit/faults/rand/0.bin") == payloads["audit/faults/rand/0.bin"]
        assert proxy.counts()["faults"] == {}
    finally:
        proxy.stop()
    with pytest.raises(ValueError, match="fault modes"):
        FaultProxy(s3_server, modes=("teapot",))


def _titled(title: str, script: str = "") -> subprocess.Popen:
    """A process (``cat`` waiting on stdin, or bash running ``script``) whose command line
    reads ``title``, as Ray's workers rename themselves."""
    cmd = f'exec -a "{title}" bash -c \'{script}\'' if script else f'exec -a "{title}" cat'
    return subprocess.Popen(["bash", "-c", cmd], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def test_killer_targets_only_actor_processes_below_this_one():
    decode = "ray::MapWorker(MapBatches(DecodeCropStage))"
    classify = "ray::MapWorker(MapBatches(ClassifyStage))"
    procs = {
        "decode": _titled(decode + ".submit"),  # busy
        # An actor whose child is between fork and exec (still wearing the title).
        "classify": _titled(classify, f'exec -a "{classify}" sleep 60 & echo $!; wait'),
        "idle": _titled("ray::IDLE"),
        "other_stage": _titled("ray::MapWorker(MapBatches(Other))"),
        # Outside this process's tree: reparented once its parent exits.
        "orphan_parent": subprocess.Popen(
            ["bash", "-c", f'(exec -a "{decode}" sleep 60 < /dev/null > /dev/null 2>&1 &'
                           ' echo $!)'], stdout=subprocess.PIPE, text=True),
    }
    fork_child = int(procs["classify"].stdout.readline())
    orphan = int(procs["orphan_parent"].stdout.readline())
    procs["orphan_parent"].wait(10)
    try:
        time.sleep(0.2)  # the exec -a renames have happened
        killer = WorkerKiller(every_s=60, seed=1)
        assert killer.targets() == sorted([(procs["decode"].pid, "DecodeCropStage", True),
                                           (procs["classify"].pid, "ClassifyStage", False)])
        first = killer.kill_one()
        second = killer.kill_one()
        assert {first.pid, second.pid} == {procs["decode"].pid, procs["classify"].pid}
        assert procs["decode"].wait(10) == -9 and procs["classify"].wait(10) == -9
        assert killer.kill_one() is None and len(killer.misses) == 1
        assert killer.by_stage() == {"DecodeCropStage": 1, "ClassifyStage": 1}
        for name in ("idle", "other_stage"):
            assert procs[name].poll() is None
    finally:
        for p in procs.values():
            p.kill()
            p.wait(10)
        for pid in (fork_child, orphan):
            subprocess.run(["kill", "-9", str(pid)], capture_output=True)


def test_killer_kills_the_first_busy_actor_at_once_and_retries_a_missed_kill():
    """The first kill does not wait a period when an actor is running a task, and a due
    kill that finds no actor is tried again every retry_s, not a period later (a short
    run in CI once saw no kill at all: every tick fell before or after the actors)."""
    decode = "ray::MapWorker(MapBatches(DecodeCropStage))"
    procs = []
    early = WorkerKiller(every_s=60, seed=1, retry_s=0.1).start()
    try:
        time.sleep(0.5)
        procs.append(_titled(decode))  # idle: the first kill waits for a busy one
        time.sleep(0.5)
        assert early.kills == [] and procs[0].poll() is None
        procs.append(_titled(decode + ".submit"))
        assert procs[1].wait(20) == -9  # within a few retries, far before 60 s
        assert [k.pid for k in early.kills] == [procs[1].pid] and early.kills[0].busy
        assert early.misses == [] and procs[0].poll() is None
    finally:
        early.stop()
    procs[0].kill()
    procs[0].wait(10)
    late = WorkerKiller(every_s=3.0, seed=1, retry_s=0.1).start()
    try:
        time.sleep(3.5)  # due at 3 s, nothing to kill: one miss, then retries
        spawned = time.monotonic() - late.t0
        procs.append(_titled(decode))
        assert procs[2].wait(20) == -9
        assert [k.pid for k in late.kills] == [procs[2].pid]
        # Retried within a second or so, not at the next period (6 s, 2.5 s on).
        assert late.kills[0].at_s - spawned < 2.0, (spawned, late.kills, late.misses)
        assert len(late.misses) == 1 and late.misses[0] < spawned
    finally:
        late.stop()
        for p in procs:
            p.kill()
            p.wait(10)


def test_killer_waits_for_the_last_victims_stage_to_be_back():
    """On a starved machine a restarted actor can take longer than the period to build
    its stage: the next kill waits until the stage has its actors up again, instead of
    killing each replacement as it comes up (which stopped a 10k-row soak at 0 rows)."""
    decode = "ray::MapWorker(MapBatches(DecodeCropStage))"
    procs = [_titled(decode + ".submit")]
    killer = WorkerKiller(every_s=0.3, seed=1, retry_s=0.1).start()
    try:
        assert procs[0].wait(20) == -9  # the first kill: the busy actor
        procs.append(_titled(decode + ".__init__"))  # its replacement, building
        time.sleep(1.5)  # five periods
        assert len(killer.kills) == 1 and procs[1].poll() is None
        assert killer.up("DecodeCropStage") == 0 and killer.waited_s > 0.5
        procs.append(_titled(decode))  # one actor up again: kills resume
        deadline = time.monotonic() + 20
        while len(killer.kills) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(killer.kills) == 2 and killer.kills[1].pid in (procs[1].pid, procs[2].pid)
    finally:
        killer.stop()
        for p in procs:
            p.kill()
            p.wait(10)


def test_killer_on_the_pipelines_clock_waits_for_work_done():
    """With cpus, the period counts the CPU-seconds of the processes below the killer's
    root over cpus: no kill while the pipeline idles (a starved shared machine), one
    once it has worked a period's worth."""
    decode = "ray::MapWorker(MapBatches(DecodeCropStage))"
    procs = [_titled(decode)]  # idle: never busy, so no early first kill
    killer = WorkerKiller(every_s=1.0, seed=1, retry_s=0.1, cpus=1).start()
    try:
        time.sleep(2.0)  # two wall periods, almost no CPU below this process
        assert killer.kills == [] and procs[0].poll() is None and killer.clock() < 0.5
        procs.append(_titled("ray::IDLE", "while :; do :; done"))  # the pipeline works
        assert procs[0].wait(30) == -9
        assert [k.pid for k in killer.kills] == [procs[0].pid] and killer.clock() >= 1.0
    finally:
        killer.stop()
        for p in procs:
            p.kill()
            p.wait(10)
