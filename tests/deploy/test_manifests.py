"""Every kustomize overlay renders, and every object validates offline: core objects and the
pod templates inside the RayService against Kubernetes' schemas (kubernetes-validate), the
custom resources against their fields (crd_fields), the Serve config against our settings;
the numbers that must agree with ServeSettings (drain, ports, probes) do."""

import copy
import os
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from serving.config import ServeSettings
from tests.deploy.crd_fields import SCHEMAS

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ("gpu", "cpu-dev")
K8S_VERSION = "1.32"
DIRECT_INGRESS_PORT = 30000


def kustomize() -> str:
    local = ROOT / ".tools" / "bin" / "kustomize"
    if local.exists():
        return str(local)
    found = shutil.which("kustomize")
    if found is None:
        pytest.fail("kustomize not found: scripts/install-system-deps.sh puts it in .tools/bin")
    return found


def render(overlay: str) -> list[dict]:
    out = subprocess.run([kustomize(), "build", str(ROOT / "deploy" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120, env={**os.environ})  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def worker_group(objects) -> dict:
    (service,) = by_kind(objects, "RayService")
    (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return group


def pod_templates(service: dict) -> list[dict]:
    cluster = service["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]


def validate(obj: dict) -> None:
    if obj["kind"] in SCHEMAS:
        jsonschema.validate(obj, SCHEMAS[obj["kind"]])
        if obj["kind"] == "RayService":
            for template in pod_templates(obj):
                kubernetes_validate.validate(
                    {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template},
                    K8S_VERSION, strict=True,
                )  # fmt: skip
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_every_object_validates(rendered):
    overlay, objects = rendered
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["Deployment", "Namespace", "NetworkPolicy", "NetworkPolicy", "NetworkPolicy", "PodMonitor",
                     "PrometheusRule", "RayService", "Service", "Service"], kinds
    for obj in objects:
        validate(obj)
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == {"gpu": "medgemma", "cpu-dev": "medgemma-dev"}[overlay]


def test_validation_catches_wrong_fields(rendered):
    _, objects = rendered
    (service,) = by_kind(objects, "RayService")
    broken = copy.deepcopy(service)
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"] = {"num-gpus": 1}  # not a string
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    broken = copy.deepcopy(service)
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["readinessProbe"] = {
        "httpGet": {"path": "/ready"}}  # fmt: skip
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
    broken = copy.deepcopy(service)
    broken["spec"]["rayClusterConfig"]["enableAutoscaling"] = True  # no such field
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_gpu_workers_ask_for_one_gpu_each_and_cpu_dev_for_none(rendered):
    overlay, objects = rendered
    (container,) = worker_group(objects)["template"]["spec"]["containers"]
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == (1 if overlay == "gpu" else None)
    (service,) = by_kind(objects, "RayService")
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no engine replica on the head


def test_drain_probes_and_ports_agree_with_the_server(rendered):
    _, objects = rendered
    group = worker_group(objects)
    spec = group["template"]["spec"]
    (container,) = spec["containers"]
    drain_s = ServeSettings.model_fields["drain_timeout_s"].default
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[:2] == ["medgemma-serve", "wait-idle"]
    assert float(pre_stop[pre_stop.index("--timeout-s") + 1]) == drain_s
    assert f"127.0.0.1:{DIRECT_INGRESS_PORT}" in pre_stop[pre_stop.index("--url") + 1]
    # the pod outlives the drain, with time left for Ray to stop
    assert spec["terminationGracePeriodSeconds"] >= drain_s + 20
    ready_probe = " ".join(container["readinessProbe"]["exec"]["command"])
    for path in ("/-/healthz", "/ready"):  # Ray's replica state and ours
        assert f"'{path}'" in ready_probe
    assert f"http://127.0.0.1:{DIRECT_INGRESS_PORT}" in ready_probe
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": DIRECT_INGRESS_PORT}
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == str(DIRECT_INGRESS_PORT)
    # Ray allocates from range(min, max): one port per pod, so a replacement takes 30000 too.
    from ray.serve._private.node_port_manager import PortAllocator

    allocator = PortAllocator(int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]),
                              int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]), "HTTP", "node")  # fmt: skip
    assert allocator.allocate("replica-1") == DIRECT_INGRESS_PORT
    with pytest.raises(Exception, match="(?i)port"):  # no second port on a pod, ever
        allocator.allocate("replica-2")
    assert env["RAY_SERVE_PORT_QUARANTINE_S"] == "0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == DIRECT_INGRESS_PORT
    # The API Service and the PodMonitor select exactly the engine pods, by that port's name.
    labels = group["template"]["metadata"]["labels"]
    api = next(s for s in by_kind(objects, "Service") if s["metadata"]["name"] == "medgemma-api")
    assert api["spec"]["selector"].items() <= labels.items()
    assert api["spec"]["ports"][0]["targetPort"] == "http"
    (monitor,) = by_kind(objects, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    redis = next(s for s in by_kind(objects, "Service") if s["metadata"]["name"] == "medgemma-redis")
    assert redis["spec"]["ports"][0]["port"] == 6379


def test_the_serve_config_builds_valid_app_settings(rendered):
    from serving.ray_app import AppSettings

    overlay, objects = rendered
    (service,) = by_kind(objects, "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config["proxy_location"] == "Disabled"  # replicas answer HTTP themselves
    (app,) = serve_config["applications"]
    assert app["import_path"] == "serving.ray_app:build_app"
    settings = AppSettings.from_args(app["args"])
    group = worker_group(objects)
    # Ray Serve may want as many replicas as the worker group may have pods (one per pod).
    assert settings.scaling.max_replicas == group["maxReplicas"]
    assert settings.scaling.min_replicas <= group["minReplicas"]
    assert settings.serve.redis_url == "redis://medgemma-redis:6379/0"  # budgets shared by all replicas
    if overlay == "gpu":
        assert settings.serve.keys_file is not None and settings.serve.profile is None  # profile from the GPU
    else:
        assert settings.serve.profile == "cpu-dev"
