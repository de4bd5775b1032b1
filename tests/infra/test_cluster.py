"""Cluster mode: the actor plan per node type, Ray Job specs, and a real audit submitted
as a Ray Job to a 2-node Ray cluster on 127.0.0.1 with input and output on S3."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepaudit.infra.cluster import JobSpec, entrypoint, runtime_env
from deepaudit.infra.ray_runtime import NodeResources
from deepaudit.jobs.cli import app
from deepaudit.pipeline.plan import StagePlan, plan_for_cluster, plan_stages

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})


# -------------------------------------------------------------------------- the plan


def _fits(plan: StagePlan, nodes: list[NodeResources]) -> bool:
    """Can every actor be placed (first fit, biggest first) on the nodes?"""
    free = [[n.cpus, n.gpus] for n in nodes]
    actors = ([(plan.classify_cpus, plan.classify_gpus)] * plan.classify_actors
              + [(plan.decode_cpus, 0.0)] * plan.decode_actors)
    for cpus, gpus in sorted(actors, reverse=True):
        for f in free:
            if f[0] + 1e-9 >= cpus and f[1] + 1e-9 >= gpus:
                f[0] -= cpus
                f[1] -= gpus
                break
        else:
            return False
    return True


@pytest.mark.parametrize("nodes", [
    [NodeResources(1), NodeResources(1)],  # the local test cluster
    [NodeResources(2), NodeResources(2), NodeResources(2)],
    [NodeResources(8), NodeResources(16), NodeResources(16)],
    [NodeResources(0), NodeResources(32), NodeResources(32)],  # a CPU-0 head
])
def test_cpu_cluster_plan_fits_every_node_and_scales_with_nodes(nodes):
    plan = plan_for_cluster(nodes)
    assert plan.classify_gpus == 0 and _fits(plan, nodes)
    assert plan.reserved_cpus() <= sum(n.cpus for n in nodes)
    # A single-node plan of the same total would not fit on these nodes when it asks
    # for more than a node has: that is the deadlock the per-node plan avoids.
    bigger = plan_for_cluster(nodes + [NodeResources(nodes[-1].cpus)] * 2)
    assert bigger.decode_actors > plan.decode_actors
    assert bigger.classify_actors > plan.classify_actors


def test_two_one_cpu_nodes_would_deadlock_with_the_single_node_plan():
    nodes = [NodeResources(1), NodeResources(1)]
    assert not _fits(plan_stages(2, 0), nodes)  # a 1.4-CPU classifier fits on no node
    assert _fits(plan_for_cluster(nodes), nodes)


def test_gpu_cluster_plan():
    head, cpu, gpu = NodeResources(0), NodeResources(32), NodeResources(8, 1)
    nodes = [head, cpu, cpu, gpu, gpu, gpu]
    plan = plan_for_cluster(nodes, gpu_memory_gb=24)
    assert plan.classify_actors == 3 and plan.classify_gpus == 1.0  # one actor per GPU
    assert plan.decode_cpus == 1.0 and plan.decode_actors == 32 * 2 + 7 * 3 - 1
    assert _fits(plan, nodes)
    # Batch sizes grow with the device's memory and have sane bounds.
    small = plan_for_cluster(nodes, gpu_memory_gb=8)
    big = plan_for_cluster(nodes, gpu_memory_gb=80)
    assert 32 <= small.crop_batch < plan.crop_batch < big.crop_batch <= 1024
    assert 16 <= small.batch_size <= plan.batch_size <= big.batch_size <= 128
    assert plan_for_cluster(nodes).crop_batch == 64  # memory unknown: conservative
    assert plan_for_cluster(nodes, batch_size=7).batch_size == 7  # explicit wins
    # More GPU nodes: more classifier actors; more CPU nodes: more decode actors.
    assert plan_for_cluster(nodes + [gpu]).classify_actors == 4
    assert plan_for_cluster(nodes + [cpu]).decode_actors == plan.decode_actors + 32


def test_single_node_plan_is_unchanged():
    for cpus, gpus in ((2, 0), (16, 0), (16, 2)):
        plan = plan_for_cluster([NodeResources(cpus, gpus)])
        ref = plan_stages(cpus, gpus)
        assert (plan.decode_actors, plan.classify_actors, plan.decode_cpus) == (
            ref.decode_actors, ref.classify_actors, ref.decode_cpus)


# -------------------------------------------------------------------------- job specs


def test_job_spec_and_runtime_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DA_TEST_SECRET", "s3cr3t-value")
    spec = JobSpec(args=("audit", "s3://b/archive/", "-o", "s3://b/out"),
                   env_names=("DA_TEST_SECRET",))
    assert entrypoint(spec) == "deepaudit audit s3://b/archive/ -o s3://b/out --address auto"
    assert "--address auto" not in entrypoint(JobSpec(args=("audit", "m.csv", "--address", "x")))
    assert entrypoint(JobSpec(args=("query", "s3://b/out", "SELECT 1"))) == \
        "deepaudit query s3://b/out 'SELECT 1'"
    env = runtime_env(spec)
    assert env["env_vars"]["DA_TEST_SECRET"] == "s3cr3t-value" and "py_modules" not in env
    shipped = runtime_env(JobSpec(args=("audit", "x.csv"), ship_code=True), tmp_path)
    (pkg,) = shipped["py_modules"]
    assert (Path(pkg) / "jobs" / "cli.py").is_file()
    assert (Path(pkg) / "pipeline" / "ledger.py").is_file()
    assert (Path(pkg) / "training" / "worker.py").is_file()
    assert not list(Path(pkg).rglob("__pycache__"))
    for bad in ({"args": ()}, {"args": ("submit",)},
                {"args": ("audit", "x.csv"), "env_names": ("AWS_SECRET_ACCESS_KEY=abc",)},
                {"args": ("audit", "x.csv"), "env_names": ("DA_NOT_SET_ANYWHERE",)}):
        with pytest.raises(ValueError):
            JobSpec(**bad)
    (tmp_path / "wd" / "ray").mkdir(parents=True)
    with pytest.raises(ValueError, match="shadow"):
        JobSpec(args=("audit", "x.csv"), working_dir=str(tmp_path / "wd"))


def test_unreachable_dashboard_exits_2_and_says_what_to_check():
    port = _free_ports(1)[0]
    for argv in (["submit", "--address", f"http://127.0.0.1:{port}", "--", "audit", "x.csv"],
                 ["status", "raysubmit_x", "--address", f"http://127.0.0.1:{port}"],
                 ["logs", "raysubmit_x", "--address", f"http://127.0.0.1:{port}"]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 2, (argv, result.output)
        assert "dashboard" in result.output


# ------------------------------------------------------------------ a real 2-node cluster


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _leftovers(marker: str) -> list[int]:
    """Pids of processes whose command line mentions ``marker`` (our temp dir)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


@pytest.fixture
def two_node_cluster():
    """``ray start --head`` and a second ``ray start --address`` worker node, each with 1
    CPU, bound to 127.0.0.1 on free ports, in their own process groups; both killed in
    teardown. No AWS credentials in their environment: a job must bring its own."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    tmp = tempfile.mkdtemp(prefix="da-ray-", dir="/tmp")  # short: Ray's socket paths
    (gcs, dash, client, *rest) = _free_ports(3 + 2 * 6)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")

    def node_ports(p: list[int]) -> list[str]:
        return ["--node-manager-port", str(p[0]), "--object-manager-port", str(p[1]),
                "--dashboard-agent-listen-port", str(p[2]), "--dashboard-agent-grpc-port",
                str(p[3]), "--runtime-env-agent-port", str(p[4]), "--metrics-export-port",
                str(p[5])]

    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0", "--block",
              "--disable-usage-stats"]
    procs = []
    try:
        head = subprocess.Popen(
            [ray_bin, "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
             "--temp-dir", tmp, *node_ports(rest[:6]), *common],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(head)
        address = f"http://127.0.0.1:{dash}"
        _wait_http(address, 300)
        worker = subprocess.Popen(
            [ray_bin, "start", "--address", f"127.0.0.1:{gcs}", *node_ports(rest[6:]), *common],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(worker)
        _wait_nodes(address, 2, 300)
        yield address
    finally:
        for p in reversed(procs):
            _kill_group(p)
        for pid in _leftovers(tmp):  # anything of ours that left the process group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_http(address: str, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the Ray head at {address} did not come up")


def _wait_nodes(address: str, n: int, timeout: float) -> None:
    from ray.util.state import list_nodes

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            alive = [x for x in list_nodes(address=address) if x.state == "ALIVE"]
            if len(alive) >= n:
                return
        except Exception:  # noqa: BLE001 - the state API is not up yet
            pass
        time.sleep(1)
    raise AssertionError(f"{n} Ray nodes did not come up")


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.timeout(900)
def test_audit_submitted_to_a_two_node_cluster(two_node_cluster, tiny_model, media, s3_server,
                                              s3fs_client, tmp_path):
    address = two_node_cluster
    names = ["face_image", "face_png", "face_video", "no_face_image", "not_media"]
    for n in names:
        s3fs_client.put(str(media[n]), f"audit/cluster-in/{media[n].name}")
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    key_id = os.environ["AWS_ACCESS_KEY_ID"]

    result = runner.invoke(app, [
        "submit", "--address", address, "--follow", "--ship-code",
        "--env", "AWS_ACCESS_KEY_ID", "--env", "AWS_SECRET_ACCESS_KEY", "--env",
        "AWS_DEFAULT_REGION", "--",
        "audit", "s3://audit/cluster-in/", "-o", "s3://audit/cluster-out",
        "--ledger", "s3://audit/cluster-ledger", "--model", str(tiny_model), "--frames", "2",
        "--s3-endpoint", s3_server, "--no-progress", "--json"])
    job_id = result.stdout.splitlines()[0].strip()
    assert result.exit_code == 0, result.output[-3000:]
    assert job_id.startswith("raysubmit_")
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith('{"run_id"')]
    summary = json.loads(lines[-1])
    assert summary["state"] == "completed" and summary["rows_out"] == len(names)
    assert summary["cluster"]["cpus"] == 2.0
    assert summary["cluster"]["where"].startswith("Ray cluster")
    assert summary["plan"]["decode_actors"] == 2 and summary["plan"]["classify_actors"] == 2

    # Verdicts landed on S3, one per object.
    runs = s3fs_client.ls("audit/cluster-out/runs")
    assert len(runs) == 1
    files = [p for p in s3fs_client.ls(runs[0]) if p.endswith(".parquet")]
    import pyarrow.parquet as pq

    rows = []
    for p in files:
        with s3fs_client.open(p, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    by = {Path(r["uri"]).name: r for r in rows}
    assert set(by) == {media[n].name for n in names}
    assert by[media["face_image"].name]["status"] == "ok"
    assert by[media["face_video"].name]["status"] == "ok"
    assert by[media["no_face_image"].name]["status"] == "no_face"
    assert by[media["not_media"].name]["error"].startswith("not_media:")

    # The pipeline's actors ran on both nodes: all of them were alive together and their
    # reservations add up to more than one 1-CPU node holds. (The state API does not keep
    # the node of every dead actor, so placement is shown this way.)
    from ray.util.state import list_actors

    actors = list_actors(address=address, detail=True, limit=1000)
    classifiers = {a.actor_id for a in actors if "ClassifyStage" in (a.class_name or "")}
    assert len(classifiers) >= 2, [(a.class_name, a.state) for a in actors]
    plan = summary["plan"]
    assert (plan["decode_actors"] * plan["decode_cpus"]
            + plan["classify_actors"] * plan["classify_cpus"]) > 1.0

    status = runner.invoke(app, ["status", job_id, "--address", address, "--json"])
    assert status.exit_code == 0 and json.loads(status.stdout)["status"] == "SUCCEEDED"
    logs = runner.invoke(app, ["logs", job_id, "--address", address])
    assert logs.exit_code == 0 and '"rows_out": 5' in logs.stdout
    # The credentials went to the job through its runtime_env, and nowhere visible.
    for text in (result.output, status.output, logs.output, json.dumps(summary)):
        assert secret not in text and key_id not in text


def test_help_lists_the_archive_and_cluster_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for word in ("manifest", "query", "submit", "status", "logs"):
        assert word in result.output
    result = runner.invoke(app, ["audit", "--help"])
    for option in ("--ledger", "--max-attempts", "--retry-errors", "--any-model", "--include",
                   "--exclude", "--roll-rows", "--roll-seconds"):
        assert option in result.output
    result = runner.invoke(app, ["submit", "--help"])
    for option in ("--address", "--follow", "--ship-code", "--working-dir", "--env"):
        assert option in result.output


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_wait_for_resources_asks_and_times_out_with_a_message(ray_local):
    from deepaudit.infra.ray_runtime import release_resource_request, wait_for_resources

    assert wait_for_resources(min_cpus=2, timeout_s=30) == (2.0, 0.0)
    with pytest.raises(TimeoutError, match="--min-gpus"):
        wait_for_resources(min_cpus=1, min_gpus=1, timeout_s=2, poll_s=0.5)
    release_resource_request()
