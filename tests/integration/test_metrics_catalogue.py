"""One coherent metric set: what the dashboard and the Prometheus rules query exists on a
real server's /metrics (or is a recording rule), docs/scaling.md documents every metric we
define and every engine metric we use, and no label carries an API key."""

import json
import re
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.images import data_url, image

ROOT = Path(__file__).resolve().parents[2]
METRIC = re.compile(r"\b(medgemma_[a-z0-9_]+|vllm:[a-z0-9_]+|http_requests_total)\b")
RECORDED = re.compile(r"\bmedgemma:[a-z0-9_:]+")


def rule_groups() -> list[dict]:
    return yaml.safe_load((ROOT / "deploy" / "base" / "prometheusrule.yaml").read_text())["spec"]["groups"]


def queries() -> list[str]:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "medgemma-serving.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", ())]  # rows have none
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    exprs += [rule["expr"] for group in rule_groups() for rule in group["rules"]]
    return exprs


def exposed(server) -> tuple[set[str], list]:
    headers = {"Authorization": f"Bearer {server.keys['main']}"}
    picture = data_url(image(64, 64))
    body = {"model": "medgemma-4b-it", "max_tokens": 8,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                      {"type": "image_url", "image_url": {"url": picture}}]}]}  # fmt: skip
    for stream in (True, False):  # the client-side histograms appear once observed
        with httpx.stream("POST", server.base_url + "/chat/completions", json={**body, "stream": stream},
                          headers=headers, timeout=120) as response:  # fmt: skip
            assert response.status_code == 200
            response.read()
    text = httpx.get(server.url + "/metrics", timeout=30).text
    families = list(text_string_to_metric_families(text))
    samples = {sample.name for family in families for sample in family.samples}
    return samples, families


def test_dashboard_and_rules_query_only_metrics_that_exist(server):
    samples, _ = exposed(server)
    recorded = {rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule}
    missing = set()
    for expr in queries():
        missing |= {name for name in METRIC.findall(expr) if name not in samples}
        missing |= {name for name in RECORDED.findall(expr) if name not in recorded}
    # http_requests_total is vLLM's (prometheus-fastapi-instrumentator), present once a
    # request reached vLLM; the rule guards it with `or vector(0)` anyway.
    assert missing == set(), sorted(missing)


def test_every_metric_is_documented_and_names_do_not_collide(server):
    samples, families = exposed(server)
    doc = (ROOT / "docs" / "scaling.md").read_text()
    # (prometheus-client's *_created timestamps parse as families of their own)
    ours = {f.name for f in families if f.name.startswith("medgemma_") and not f.name.endswith("_created")}
    assert len(ours) >= 12, ours
    undocumented = {name for name in ours if f"`{name}" not in doc}
    assert undocumented == set(), sorted(undocumented)
    used_engine_metrics = {n for e in queries() for n in METRIC.findall(e) if n.startswith("vllm:")}
    for name in used_engine_metrics:
        base = re.sub(r"_(bucket|sum|count|total)$", "", name)
        assert f"`{base}" in doc, f"{name} is used by the dashboard or the rules but not documented"
    names = [f.name for f in families]
    assert len(names) == len(set(names)), "a metric family is exposed twice"
    # Every family is ours (medgemma_), vLLM's (vllm:) or the client library's process/
    # Python/HTTP families: nothing of ours hides under another prefix.
    others = {n for n in names if not n.startswith(("medgemma_", "vllm:"))}
    assert {n.split("_")[0] for n in others} <= {"http", "process", "python"}, sorted(others)
    assert any(n.startswith("vllm:") for n in names) and len(ours) >= 12


def test_no_label_carries_an_api_key(server):
    _, families = exposed(server)
    for family in families:
        for sample in family.samples:
            assert not {"key", "api_key", "authorization"} & set(sample.labels), sample
            for value in sample.labels.values():
                assert not any(key in value for key in server.keys.values()), sample
                assert not value.startswith("mgk_"), sample
