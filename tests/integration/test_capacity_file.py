"""``--capacity-file`` on the real server: started with a measured capacity of 3 units, it
lets exactly 3 requests into the engine and queues the rest (cpu-dev's max_num_seqs is 16),
reports the capacity and its source on /metrics, and a file measured on another engine is
refused before the model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest
from vllm.version import __version__ as vllm_version

from tests.live_server import TEST_ACCOUNTS, launch, stop, wait_for, wait_ready, write_keys
from tests.metrics_text import Sampler, metric, scrape, samples

ROOT = Path(__file__).resolve().parents[2]
UNITS = 3
MODEL = "medgemma-4b-it"


def capacity_file(path: Path, units: int, profile: str = "cpu-dev", version: str = vllm_version) -> Path:
    path.write_text(json.dumps({"format": 1, "tool": "medgemma-loadtest capacity", "units_per_replica": units,
                                "engine": {"profile": profile, "vllm_version": version}}))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def sized_server(tmp_path_factory, server):
    root = tmp_path_factory.mktemp("capacity")
    keys_file = root / "keys.yaml"
    srv = launch(root, keys_file, write_keys(keys_file, TEST_ACCOUNTS), "--capacity-file",
                 str(capacity_file(root / "capacity.json", UNITS)), dev_model_dir=server.dev_model_dir)  # fmt: skip
    try:
        wait_ready(srv)
        yield srv
    finally:
        stop(srv)


def test_a_measured_capacity_gates_the_engine_at_that_number_and_queues_above_it(sized_server):
    """Of the 3 units, interactive requests may hold 2 (interactive_share 0.9, the default) and
    STAT the last one: a flood of both never has more than 3 in the engine, the rest queue."""
    text = scrape(sized_server.url)
    sources = {labels["source"]: value for name, labels, value in samples(text) if name == "medgemma_capacity_source"}
    assert sources == {"capacity_file": 1, "max_num_seqs": 0, "setting": 0}
    assert metric(sized_server.url, "medgemma_capacity_units") == UNITS
    assert "capacity: 3 units per replica (capacity_file)" in sized_server.log()
    assert "engine capacity 3 requests" in sized_server.log()
    replies, failures = [], []

    def ask(account: str, i: int) -> None:
        # non-streaming, as the openai client sends by default
        client = openai.OpenAI(base_url=sized_server.base_url, api_key=sized_server.keys[account], max_retries=0,
                               timeout=300)  # fmt: skip
        try:
            reply = client.chat.completions.create(
                model=MODEL, max_tokens=120, extra_body={"min_tokens": 120},
                extra_headers={"x-priority": "stat"} if account == "stat-clinic" else {},
                messages=[{"role": "user", "content": f"Summarise study {i}."}])  # fmt: skip
            replies.append(reply.usage.completion_tokens)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            failures.append(repr(exc))

    names = ("medgemma_inflight_requests", "medgemma_queue_depth", "vllm:num_requests_running")
    senders = [("main", i) for i in range(5)] + [("stat-clinic", i) for i in range(2)]
    with Sampler(sized_server.url, *names) as seen, \
            Sampler(sized_server.url, "medgemma_inflight_requests", labels={"priority": "interactive"}) as interactive, \
            Sampler(sized_server.url, "medgemma_inflight_requests", labels={"priority": "stat"}) as stat:  # fmt: skip
        threads = [threading.Thread(target=ask, args=sender) for sender in senders]
        for thread in threads:
            thread.start()
        assert wait_for(lambda: (seen.latest("medgemma_queue_depth") or 0) >= 3, 120), seen.readings[-3:]
        for thread in threads:
            thread.join(300)
    assert not failures and replies == [120] * len(senders), failures[:3]
    assert seen.highest("medgemma_inflight_requests") == UNITS, seen.readings[-5:]
    assert interactive.highest("medgemma_inflight_requests") == 2
    assert stat.highest("medgemma_inflight_requests") >= 1  # the unit interactive may not take
    assert 1 <= seen.highest("vllm:num_requests_running") <= UNITS
    assert seen.highest("medgemma_queue_depth") >= 3  # everything above the capacity waited its turn


@pytest.mark.parametrize(
    ("profile", "version", "message"),
    [("h100", vllm_version, "measured on engine profile h100, and this server runs cpu-dev"),
     ("cpu-dev", "0.0.1", f"measured on vLLM version 0.0.1, and this server runs {vllm_version}")],
)  # fmt: skip
def test_a_capacity_measured_on_another_engine_is_refused_before_the_model_loads(tmp_path, profile, version, message):
    path = capacity_file(tmp_path / "capacity.json", 4, profile, version)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDGEMMA_")}
    env |= {"HF_HUB_OFFLINE": "1", "MEDGEMMA_DEV_MODEL_DIR": str(tmp_path / "dev")}
    result = subprocess.run([sys.executable, "-m", "serving", "serve", "--capacity-file", str(path)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert message in result.stderr and "medgemma-loadtest capacity" in result.stderr
    assert not (tmp_path / "dev").exists()  # refused before the dev checkpoint was even built
