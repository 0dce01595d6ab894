"""The Helm chart deploy/helm/npo, checked with real tools and no cluster: `helm lint` / `helm template` (Helm v3, from
PATH or fetched by scripts/get_helm.sh) and kubernetes-validate against the Kubernetes 1.30 schemas (strict: unknown
fields fail). Without helm, the tests fetch it; when that fails they fail under CI=true and are skipped otherwise."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "npo"
GPU_VALUES = CHART / "values-gpu.yaml"
KUBE_VERSION = "1.30.0"
NAMESPACE = "npo-test"
RELEASE = "r1"
NPO_ROLES = ("guidance-cache", "rollout", "learner", "controller")


def _is_helm3(path: str) -> bool:
    try:
        out = subprocess.run([path, "version", "--short"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return False
    return out.startswith("v3.")


@pytest.fixture(scope="module")
def helm() -> str:
    """A Helm v3 binary: `helm` on PATH, else the pinned one from scripts/get_helm.sh."""
    found = shutil.which("helm")
    if found and _is_helm3(found):
        return found
    fetch = subprocess.run(["bash", str(ROOT / "scripts" / "get_helm.sh")], capture_output=True, text=True, timeout=600)
    path = fetch.stdout.strip().splitlines()[-1] if fetch.stdout.strip() else ""
    if fetch.returncode == 0 and path and _is_helm3(path):
        return path
    reason = f"no helm v3 and scripts/get_helm.sh failed (exit {fetch.returncode}): {fetch.stderr.strip()[-500:]}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def helm_template(helm: str, *args: str) -> subprocess.CompletedProcess:
    """`helm template` of the chart for Kubernetes KUBE_VERSION in NAMESPACE, with extra arguments."""
    argv = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def render(helm: str, *args: str) -> list[dict]:
    """The chart's manifests (one dict per object); AssertionError with helm's stderr when it fails."""
    result = helm_template(helm, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(manifests: list[dict], kind: str, name: str) -> dict:
    """The object of `kind` named `name` (StopIteration when absent)."""
    return next(m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name)


def container(manifests: list[dict], kind: str, name: str) -> dict:
    """The first container of the workload `kind`/`name`."""
    return find(manifests, kind, name)["spec"]["template"]["spec"]["containers"][0]


def arg_value(args: list[str], flag: str) -> str:
    """The value following `flag` in a container's args."""
    return args[args.index(flag) + 1]


WORKLOADS = {
    "guidance-cache": ("Deployment", f"{RELEASE}-npo-guidance-cache"),
    "rollout": ("StatefulSet", f"{RELEASE}-npo-rollout"),
    "learner": ("Deployment", f"{RELEASE}-npo-learner"),
    "controller": ("Deployment", f"{RELEASE}-npo-controller"),
    "redis": ("StatefulSet", f"{RELEASE}-npo-redis"),
}
VALUES = {"default": [], "gpu": ["-f", str(GPU_VALUES)]}


@pytest.mark.parametrize("values", VALUES.values(), ids=VALUES.keys())
def test_helm_lint_passes(helm, values):
    result = subprocess.run([helm, "lint", str(CHART), "--strict", *values], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", VALUES.values(), ids=VALUES.keys())
def test_every_rendered_manifest_passes_kubernetes_validate(helm, values):
    manifests = render(helm, *values)
    kinds = {(m["kind"], m["metadata"]["name"]) for m in manifests}
    assert set(WORKLOADS.values()) <= kinds
    assert ("PodDisruptionBudget", f"{RELEASE}-npo-rollout") in kinds
    assert ("PersistentVolumeClaim", f"{RELEASE}-npo-data") in kinds
    for manifest in manifests:
        if manifest["kind"] == "ServiceMonitor":  # a CRD: no schema in kubernetes-validate
            assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
            assert manifest["spec"]["endpoints"][0]["port"] == "metrics"
            continue
        try:
            kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{manifest['kind']}/{manifest['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_learner_and_controller_list_each_rollout_replica(helm):
    manifests = render(helm, "--set", "rollout.replicaCount=3")
    name = f"{RELEASE}-npo-rollout"
    expected = [f"{name}-{i}.{name}.{NAMESPACE}.svc.cluster.local:50052" for i in range(3)]
    learner = container(manifests, *WORKLOADS["learner"])
    assert learner["command"] == ["python", "-m", "services.learner"]
    assert arg_value(learner["args"], "--rollout").split(",") == expected
    assert arg_value(learner["args"], "--cache") == f"{RELEASE}-npo-guidance-cache.{NAMESPACE}.svc.cluster.local:50051"
    assert arg_value(learner["args"], "--config") == "/etc/npo/run.yaml"
    assert arg_value(learner["args"], "--metrics-port") == "9400"
    controller = container(manifests, *WORKLOADS["controller"])
    assert arg_value(controller["args"], "--rollout").split(",") == expected
    assert arg_value(controller["args"], "--token-file") == "/etc/npo-token/token"
    # The addresses resolve: a StatefulSet of 3 pods named <name>-<i>, governed by a headless Service <name>.
    rollout = find(manifests, "StatefulSet", name)
    assert rollout["spec"]["replicas"] == 3 and rollout["spec"]["serviceName"] == name
    assert find(manifests, "Service", name)["spec"]["clusterIP"] == "None"


def test_learner_trains_the_main_line_when_the_controller_runs_autonpo(helm):
    with_controller = container(render(helm), *WORKLOADS["learner"])["args"]
    assert arg_value(with_controller, "--set") == "method=grpo"
    without = render(helm, "--set", "controller.enabled=false")
    assert "--set" not in container(without, *WORKLOADS["learner"])["args"]
    assert not [m for m in without if m["metadata"]["name"] == f"{RELEASE}-npo-controller"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ("rollout:\n  replicaCount: three\n", "rollout.replicaCount: Invalid type. Expected: integer, given: string"),
        ("replicas: 3\n", "Additional property replicas is not allowed"),
        ("rollout:\n  engine: sglang\n", "rollout.engine"),
        ("learner:\n  gpus: -1\n", "learner.gpus"),
        ("redis:\n  enabled: false\n", "redis.external.url"),
    ],
    ids=["replicas-not-integer", "unknown-top-level-key", "unknown-engine", "negative-gpus", "redis-off-no-url"],
)
def test_bad_values_are_rejected_by_the_schema(helm, tmp_path, values, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(values)
    result = helm_template(helm, "-f", str(bad))
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr


def test_gpu_values_request_gpus_for_rollout_and_learner(helm):
    gpu = render(helm, "-f", str(GPU_VALUES))
    for role in ("rollout", "learner"):
        resources = container(gpu, *WORKLOADS[role])["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == 1 and resources["requests"]["nvidia.com/gpu"] == 1
        pod = find(gpu, *WORKLOADS[role])["spec"]["template"]["spec"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    for role in ("guidance-cache", "controller"):
        assert "nvidia.com/gpu" not in container(gpu, *WORKLOADS[role])["resources"].get("limits", {})
    rollout = container(gpu, *WORKLOADS["rollout"])
    assert arg_value(rollout["args"], "--engine") == "vllm"
    for manifest in render(helm):  # the default values ask for no GPU
        for c in manifest.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})


@pytest.mark.parametrize("values", VALUES.values(), ids=VALUES.keys())
def test_rendered_run_config_is_a_valid_run_config(helm, tmp_path, values):
    from npo.runtime.run_config import load_run_config

    config_map = find(render(helm, *values), "ConfigMap", f"{RELEASE}-npo-config")
    path = tmp_path / "run.yaml"
    path.write_text(config_map["data"]["run.yaml"])
    cfg = load_run_config(path)
    assert cfg.model.cache_dir.startswith("/data/")  # on the shared volume, kept across restarts


def test_pods_run_non_root_with_health_probes_and_the_shared_volume(helm):
    manifests = render(helm)
    claim = f"{RELEASE}-npo-data"
    assert find(manifests, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    for role in NPO_ROLES:
        pod = find(manifests, *WORKLOADS[role])["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if role == "controller":
                assert c[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
            else:
                assert c[probe]["grpc"]["port"] == c["ports"][0]["containerPort"]
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims == ([] if role == "guidance-cache" else [claim])
    learner_pod = find(manifests, *WORKLOADS["learner"])["spec"]["template"]["metadata"]["annotations"]
    assert learner_pod["prometheus.io/scrape"] == "true" and learner_pod["prometheus.io/port"] == "9400"


def test_redis_persists_and_its_password_reaches_the_cache(helm):
    manifests = render(helm)
    redis = find(manifests, *WORKLOADS["redis"])
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert arg_value(args, "--appendonly") == "yes" and arg_value(args, "--requirepass") == "$(REDIS_PASSWORD)"
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    cache = container(manifests, *WORKLOADS["guidance-cache"])
    assert arg_value(cache["args"], "--redis-url") == f"redis://{RELEASE}-npo-redis:6379/0"
    password = next(e for e in cache["env"] if e["name"] == "NPO_REDIS_PASSWORD")["valueFrom"]["secretKeyRef"]
    assert find(manifests, "Secret", password["name"])["data"][password["key"]]

    external = render(helm, "--set", "redis.enabled=false", "--set", "redis.external.url=rediss://cache.example:6380/2")
    assert not [m for m in external if m["metadata"]["name"] == f"{RELEASE}-npo-redis"]
    cache = container(external, *WORKLOADS["guidance-cache"])
    assert arg_value(cache["args"], "--redis-url") == "rediss://cache.example:6380/2"
    assert "NPO_REDIS_PASSWORD" not in [e["name"] for e in cache["env"]]


def test_api_token_from_an_existing_secret(helm):
    manifests = render(helm, "--set", "apiToken.existingSecret=my-token", "--set", "apiToken.existingSecretKey=tok")
    assert not [m for m in manifests if m["kind"] == "Secret" and m["metadata"]["name"].endswith("-api-token")]
    pod = find(manifests, *WORKLOADS["controller"])["spec"]["template"]["spec"]
    token = next(v for v in pod["volumes"] if v["name"] == "api-token")["secret"]
    assert token == {"secretName": "my-token", "items": [{"key": "tok", "path": "token"}]}
