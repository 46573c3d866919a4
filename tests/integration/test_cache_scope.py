"""The engine's prefix cache is kept per account, on the real server (serving/admission/cache_scope.py).

Measured with vLLM's own counter of prompt tokens served from the prefix cache: a prompt
sent again by the same account reuses its blocks, the very same prompt from another
account (or under another client salt) reuses none."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.live_server import wait_for
from tests.metrics_text import metric

HITS, QUERIES = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"


def cached_tokens(server, key: str, route: str, text: str, **extra) -> float:
    """The prompt tokens the engine found in its prefix cache for one request."""
    hits, queries = metric(server.url, HITS), metric(server.url, QUERIES)
    body = {"model": "medgemma-4b-it", "max_tokens": 1, **extra}
    if route == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    response = httpx.post(f"{server.base_url}/{'chat/completions' if route == 'chat' else 'completions'}",
                          json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)  # fmt: skip
    assert response.status_code == 200, response.text
    prompt = response.json()["usage"]["prompt_tokens"]
    # the engine's stats reach /metrics a moment after the response; then no other request
    # may have been counted, or the hits would not all be this one's
    assert wait_for(lambda: metric(server.url, QUERIES) - queries >= prompt, 15), "the engine never counted the prompt"
    assert metric(server.url, QUERIES) - queries == prompt, "another request ran alongside"
    return metric(server.url, HITS) - hits


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_a_prompt_is_reused_within_its_account_and_never_across(server, route):
    # a fresh text (the nonce first: no earlier test's prompt shares its first block)
    text = f"{uuid.uuid4().hex} " + "Chest radiograph, frontal view, no prior for comparison. " * 20
    main, other = server.keys["main"], server.keys["loadtest"]
    assert cached_tokens(server, main, route, text) == 0
    assert cached_tokens(server, main, route, text) >= 100  # the control: the same account reuses it
    assert cached_tokens(server, other, route, text) == 0  # the same prompt, another account: nothing
    assert cached_tokens(server, other, route, text) >= 100  # its own cache from now on
    # a client's own salt keeps it apart within its account, and the salt cannot be
    # used to reach another account's cache: no salt names the main account's
    assert cached_tokens(server, main, route, text, cache_salt="ward-3") == 0
    assert cached_tokens(server, main, route, text, cache_salt="ward-3") >= 100
    assert cached_tokens(server, other, route, text, cache_salt="ward-3") == 0


def test_a_cache_salt_vllm_refuses_is_refused(server):
    """A salt vLLM refuses still reaches vLLM as sent (not replaced by the account's), so the
    client learns it is wrong. vLLM alone gives the same 400."""
    body = {"model": "medgemma-4b-it", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            "cache_salt": "a/b"}  # fmt: skip
    response = httpx.post(server.base_url + "/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {server.keys['main']}"}, timeout=60)  # fmt: skip
    assert response.status_code == 400 and "cache_salt" in response.text, response.text
