"""Secrets in the settings never reach a log line: a Redis URL's password, the Redis password
setting and vLLM's ``--api-key``, on a real server at debug level, with a real Redis that
requires the password (so the password is really used, not just hidden)."""

from __future__ import annotations

import signal

import httpx
import pytest
import redis as redis_sync

from tests.live_server import launch, stop, wait_ready
from tests.redis_server import RedisServer

REDIS_PASSWORD = "CANARY-redis-pw-7f3a"
ENV_PASSWORD = "CANARY-env-pw-91bc"
API_KEY = "CANARY-api-key-5d2e"
CHAT = {"model": "medgemma-4b-it", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def secret_server(tmp_path_factory, server):
    root = tmp_path_factory.mktemp("secrets")
    redis = RedisServer(root / "redis", password=REDIS_PASSWORD).start()
    # Open mode: vLLM's --api-key is refused beside a keys file (both read Authorization).
    # MEDGEMMA_REDIS_PASSWORD is set too: the URL's own password wins, and neither is logged.
    srv = launch(
        root, None, {},
        "--redis-url", f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis.port}/0", "--redis-timeout-s", "5",
        "--log-level", "debug", "--", "--api-key", API_KEY,
        dev_model_dir=server.dev_model_dir, env_extra={"MEDGEMMA_REDIS_PASSWORD": ENV_PASSWORD},
    )  # fmt: skip
    try:
        wait_ready(srv)
        yield srv, redis
    finally:
        stop(srv, signal.SIGTERM)
        redis.stop()


def test_no_secret_reaches_any_log_line(secret_server):
    srv, redis = secret_server
    ok = httpx.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=60,
                    headers={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip
    assert ok.status_code == 200, ok.text
    refused = httpx.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=60,
                         headers={"Authorization": "Bearer wrong"})  # fmt: skip
    assert refused.status_code == 401  # vLLM's --api-key is in force
    metrics = httpx.get(srv.url + "/metrics", timeout=10).text
    assert "medgemma_ledger_fallback 0.0" in metrics  # the password reached Redis: it works
    probe = redis_sync.Redis(port=redis.port, password=REDIS_PASSWORD)
    assert probe.exists("medgemma:replicas")  # the heartbeat wrote there, authenticated
    log = srv.log()
    assert "settings {" in log and "redis://:***@127.0.0.1" in log and '"--api-key", "***"' in log
    for secret in (REDIS_PASSWORD, ENV_PASSWORD, API_KEY):
        assert secret not in log, [line for line in log.splitlines() if secret in line][:3]
