"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis): no 5xx, no crash, no leak.

Generated requests keep their shape, but the test caps how many tokens a fuzzed request
may generate (16), so the engine's time goes to many cases instead of a few long ones;
extreme max_tokens values are in the hostile-input catalogue."""

from __future__ import annotations


import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.metrics_text import samples, scrape

MAX_GENERATED_TOKENS = 16
EXAMPLES = 40  # per operation

def cap_generation(body) -> None:
    if not isinstance(body, dict):
        return
    for name in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(name), int) and not isinstance(body.get(name), bool):
            body[name] = max(-1, min(body[name], MAX_GENERATED_TOKENS))
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_GENERATED_TOKENS
    if isinstance(body.get("min_tokens"), int):
        body["min_tokens"] = min(body["min_tokens"], MAX_GENERATED_TOKENS)


def operations(server):
    raw = httpx.get(server.url + "/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(raw)
    return [result.ok() for result in schema.get_all_operations()]


def test_fuzzed_requests_never_get_a_5xx(server):
    # schemathesis' pytest plugin (from_fixture) does not run under pytest 9: drive its
    # strategies with hypothesis directly, one operation at a time.
    headers = {"Authorization": f"Bearer {server.keys['main']}"}
    ops = operations(server)
    assert {"POST /v1/chat/completions", "POST /v1/completions"} <= {op.label for op in ops}
    for op in ops:

        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  derandomize=True, database=None)  # fmt: skip
        def fuzz(case):
            cap_generation(case.body)
            case.call_and_validate(base_url=server.url, headers=headers, checks=[not_a_server_error], timeout=120)

        fuzz()


def test_after_fuzzing_the_server_is_healthy_and_holds_no_units(server):
    server.assert_alive()
    held = [value for name, _, value in samples(scrape(server.url)) if name == "medgemma_inflight_units"]
    assert held and all(value == 0 for value in held), held
