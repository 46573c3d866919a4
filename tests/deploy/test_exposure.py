"""Who can reach what in the rendered manifests: the NetworkPolicies evaluated for the
clients that matter, the Redis password wired from one Secret to Redis and to the ledger,
and the kustomize binary pinned by hash."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from serving.config import ServeSettings
from tests.deploy.test_manifests import OVERLAYS, ROOT, by_kind, kustomize, render


@dataclass(frozen=True)
class Pod:
    name: str
    labels: dict[str, str]
    namespace: str = "app"  # replaced by the overlay's namespace for our own pods
    namespace_labels: dict[str, str] = field(default_factory=dict)


def matches(selector: dict | None, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions In/NotIn/Exists)."""
    if selector is None:
        return False
    if not (selector.get("matchLabels") or {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]  # fmt: skip
        if not ok:
            return False
    return True


def allowed(policies: list[dict], source: Pod, target: Pod, port: int) -> bool:
    """NetworkPolicy ingress semantics: a pod no policy selects takes everything; a selected
    pod takes what at least one rule of one selecting policy admits."""
    selecting = [p for p in policies if p["metadata"]["namespace"] == target.namespace
                 and matches(p["spec"]["podSelector"], target.labels)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]  # fmt: skip
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            for spec in rule.get("ports") or []:  # what this evaluator does not model fails loudly
                assert isinstance(spec["port"], int) and "endPort" not in spec, f"unmodelled port {spec}"
            ports = [p["port"] for p in rule.get("ports") or []]
            if ports and port not in ports:
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                assert set(peer) <= {"namespaceSelector", "podSelector", "ipBlock"}, f"unmodelled peer {peer}"
                if "ipBlock" in peer:
                    return True  # an address range admits pods of any namespace, ours too
                if "namespaceSelector" in peer:
                    ns_ok = matches(peer["namespaceSelector"], source.namespace_labels)
                else:
                    ns_ok = source.namespace == policy["metadata"]["namespace"]
                pod_ok = "podSelector" not in peer or matches(peer["podSelector"], source.labels)
                if ns_ok and pod_ok:
                    return True
    return False


def our_pods(objects) -> dict[str, Pod]:
    (service,) = by_kind(objects, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    (redis,) = by_kind(objects, "Deployment")
    namespace = redis["metadata"]["namespace"]
    ns_labels = {"kubernetes.io/metadata.name": namespace}
    return {
        "head": Pod("head", cluster["headGroupSpec"]["template"]["metadata"]["labels"], namespace, ns_labels),
        "engine": Pod("engine", cluster["workerGroupSpecs"][0]["template"]["metadata"]["labels"], namespace, ns_labels),
        "redis": Pod("redis", redis["spec"]["template"]["metadata"]["labels"], namespace, ns_labels),
        "neighbour": Pod("neighbour", {"app": "something-else"}, namespace, ns_labels),
    }


OUTSIDERS = {
    "gateway": Pod("gateway", {"medgemma.io/api-client": "true"}, "ingress", {"kubernetes.io/metadata.name": "ingress"}),
    "prometheus": Pod("prometheus", {"medgemma.io/monitoring": "true"}, "monitoring", {"kubernetes.io/metadata.name": "monitoring"}),
    "operator": Pod("operator", {"app.kubernetes.io/name": "kuberay-operator"}, "kuberay", {"kubernetes.io/metadata.name": "kuberay"}),
    "stranger": Pod("stranger", {"app": "web"}, "other", {"kubernetes.io/metadata.name": "other"}),
}  # fmt: skip

# (source, target, port, allowed)
REACH = [
    ("gateway", "engine", 30000, True), ("prometheus", "engine", 30000, True),
    ("stranger", "engine", 30000, False), ("neighbour", "engine", 30000, False), ("operator", "engine", 30000, False),
    ("head", "engine", 10002, True), ("engine", "engine", 10002, True), ("gateway", "engine", 10002, False),
    ("engine", "redis", 6379, True), ("head", "redis", 6379, False), ("gateway", "redis", 6379, False),
    ("neighbour", "redis", 6379, False), ("stranger", "redis", 6379, False),
    ("operator", "head", 8265, True), ("engine", "head", 8265, True), ("engine", "head", 6379, True),
    ("gateway", "head", 8265, False), ("neighbour", "head", 8265, False), ("stranger", "head", 10001, False),
    ("prometheus", "head", 8080, True), ("prometheus", "head", 8265, False),
]  # fmt: skip


@pytest.fixture(scope="module", params=OVERLAYS)
def objects(request):
    return render(request.param)


def test_every_pod_of_ours_is_selected_by_a_policy(objects):
    policies = by_kind(objects, "NetworkPolicy")
    for name in ("head", "engine", "redis"):
        pod = our_pods(objects)[name]
        assert any(matches(p["spec"]["podSelector"], pod.labels) for p in policies), name


@pytest.mark.parametrize("source, target, port, expected", REACH, ids=[f"{s}->{t}:{p}" for s, t, p, _ in REACH])
def test_who_reaches_what(objects, source, target, port, expected):
    pods = {**our_pods(objects), **OUTSIDERS}
    assert allowed(by_kind(objects, "NetworkPolicy"), pods[source], pods[target], port) is expected


def test_the_evaluator_sees_an_open_policy_as_open(objects):
    policies = by_kind(objects, "NetworkPolicy")
    pods = our_pods(objects)
    opened = [{**p, "spec": {**p["spec"], "ingress": [{}]}} for p in policies]
    assert allowed(opened, OUTSIDERS["stranger"], pods["redis"], 6379)  # the test can fail
    cidr = [{**p, "spec": {**p["spec"], "ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]}} for p in policies]
    assert allowed(cidr, OUTSIDERS["stranger"], pods["redis"], 6379)


def test_redis_requires_the_password_the_ledger_is_given(objects):
    (redis,) = by_kind(objects, "Deployment")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    (service,) = by_kind(objects, "RayService")
    (worker,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    engine_env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in worker["env"]}
    ledger_env = "MEDGEMMA_REDIS_PASSWORD"
    assert ledger_env.removeprefix("MEDGEMMA_").lower() in ServeSettings.model_fields
    assert engine_env[ledger_env] == env["REDIS_PASSWORD"] == env["REDISCLI_AUTH"]
    assert not engine_env[ledger_env].get("optional")  # no Secret, no engine: never an open Redis


def test_kustomize_is_pinned_by_hash():
    script = (ROOT / "scripts" / "install-system-deps.sh").read_text()
    pins = dict(re.findall(r"^(KUSTOMIZE_(?:TGZ|BIN)_SHA256)=([0-9a-f]{64})$", script, re.M))
    assert set(pins) == {"KUSTOMIZE_TGZ_SHA256", "KUSTOMIZE_BIN_SHA256"}
    assert script.count("sha256sum --check") >= 2
    binary = Path(kustomize())
    if binary.parent == ROOT / ".tools" / "bin":  # what the script installed is what it pins
        assert hashlib.sha256(binary.read_bytes()).hexdigest() == pins["KUSTOMIZE_BIN_SHA256"]
