"""Locust users for teams that already run Locust, on the same workload generator.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 8 -r 2 -t 60s

Settings come from the same ``MEDGEMMA_LOADTEST_*`` environment variables as
``medgemma-loadtest`` (images, sizes, prompt and output lengths, keys), for example
``MEDGEMMA_LOADTEST_IMAGES=choice:0=0.5,1=0.5``. Locust reports the request (E2E) under
``chat (stream)`` and TTFT under ``ttft``; a 429 is reported under its own name
``chat 429 (budget)`` so it is not mixed with failures.
"""

from __future__ import annotations

import json
import os
import threading
import time

from locust import HttpUser, between, events, task

from loadtests.config import LoadTestSettings
from loadtests.workload import Workload

_lock = threading.RLock()
_workload: Workload | None = None


def shared_workload() -> Workload:
    global _workload
    with _lock:
        if _workload is None:
            os.environ.setdefault("MEDGEMMA_LOADTEST_CONCURRENCY", "1")  # the shape is Locust's
            settings = LoadTestSettings()
            _workload = Workload(settings.workload_spec(), seed=settings.seed)
        return _workload


def next_request():
    with _lock:
        return shared_workload().next()


class MedGemmaUser(HttpUser):
    wait_time = between(0, 0.1)

    @task
    def chat(self) -> None:
        request = next_request()
        started = time.perf_counter()
        first = None
        with self.client.post(
            "/v1/chat/completions", data=request.body, headers=request.headers, stream=True,
            catch_response=True, name="chat (stream)",
        ) as response:  # fmt: skip
            if response.status_code == 429:
                response.success()  # the account's budget: reported apart, not a failure
                events.request.fire(request_type="POST", name="chat 429 (budget)", response_time=0,
                                    response_length=0, exception=None, context={})  # fmt: skip
                return
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
                return
            for raw in response.iter_lines():
                line = raw.decode()
                if first is None and line.startswith("data: {") and '"content":"' in line:
                    delta = (json.loads(line[6:]).get("choices") or [{}])[0].get("delta") or {}
                    if delta.get("content"):
                        first = time.perf_counter()
            if first is not None:
                events.request.fire(request_type="POST", name="ttft", response_time=(first - started) * 1e3,
                                    response_length=0, exception=None, context={})  # fmt: skip
