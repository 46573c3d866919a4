import os
import subprocess
import sys

from prometheus_client import CollectorRegistry, generate_latest

from serving.metrics import MULTIPROCESS_MODES, ServingMetrics
from tests.metrics_text import samples


def exposition(metrics: ServingMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_metrics_live_on_their_own_registry_with_our_prefix():
    metrics = ServingMetrics(CollectorRegistry())
    metrics.set_build(profile="l4", model="google/medgemma-4b-it", served_model_name="m", vllm_version="0.32.0")
    text = exposition(metrics)
    assert (
        'medgemma_build_info{model="google/medgemma-4b-it",profile="l4",'
        'served_model_name="m",vllm_version="0.32.0"} 1.0'
    ) in text
    assert "medgemma_engine_ready 0.0" in text
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert names and all(n.startswith("medgemma_") for n in names)


def test_engine_ready_follows_the_engine():
    metrics = ServingMetrics(CollectorRegistry())
    state = {"errored": False}
    metrics.computed(metrics.engine_ready, lambda: 0.0 if state["errored"] else 1.0)
    assert "medgemma_engine_ready 1.0" in exposition(metrics)
    state["errored"] = True
    assert "medgemma_engine_ready 0.0" in exposition(metrics)


def test_two_instances_do_not_share_state():
    first, second = ServingMetrics(CollectorRegistry()), ServingMetrics(CollectorRegistry())
    first.engine_ready.set(1)
    assert "medgemma_engine_ready 0.0" in exposition(second)


def test_computed_gauges_in_multiprocess_mode_are_written_at_each_refresh():
    metrics = ServingMetrics(CollectorRegistry(), multiprocess=True)
    state = {"demand": 3}
    metrics.computed(metrics.demand_units, lambda: state["demand"])
    metrics.refresh_computed()
    assert "medgemma_demand_units 3.0" in exposition(metrics)
    state["demand"] = 5
    assert "medgemma_demand_units 3.0" in exposition(metrics)  # until the next refresh
    metrics.refresh_computed()
    assert "medgemma_demand_units 5.0" in exposition(metrics)


def test_every_gauge_says_how_api_processes_combine():
    metrics = ServingMetrics(CollectorRegistry(), multiprocess=True)
    gauges = [m for m in vars(metrics).values() if type(m).__name__ == "Gauge"]
    assert {g._name for g in gauges} >= set(MULTIPROCESS_MODES)
    for gauge in gauges:
        assert gauge._multiprocess_mode == MULTIPROCESS_MODES.get(gauge._name, "livesum"), gauge._name


API_PROCESS = """
import sys
from serving.metrics import ServingMetrics
metrics = ServingMetrics()
assert metrics.multiprocess
metrics.set_build(profile="h100", model="m", served_model_name="s", vllm_version="0.32.0")
metrics.capacity_units.set(int(sys.argv[1]))
metrics.engine_ready.set(int(sys.argv[2]))
metrics.admission_total.labels(outcome="admitted", priority="stat").inc(int(sys.argv[1]))
"""
COLLECT = """
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)
print(generate_latest(registry).decode())
"""


def test_api_processes_values_add_up_in_the_shared_directory(tmp_path):
    """What vLLM's /metrics shows with two API processes: their values combined, one build
    series, and not ready while one of them is not."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for capacity, ready in ((8, 1), (8, 0)):
        subprocess.run([sys.executable, "-c", API_PROCESS, str(capacity), str(ready)], env=env, check=True)
    text = subprocess.run([sys.executable, "-c", COLLECT], env=env, check=True, capture_output=True, text=True).stdout
    found = {(name, tuple(sorted(labels.items()))): value for name, labels, value in samples(text)}
    assert found[("medgemma_capacity_units", ())] == 16  # each process's share, added up
    assert found[("medgemma_engine_ready", ())] == 0  # one process not ready: not ready
    assert found[("medgemma_admission_total", (("outcome", "admitted"), ("priority", "stat")))] == 16
    build = [key for key in found if key[0] == "medgemma_build_info"]
    assert len(build) == 1 and found[build[0]] == 1 and ("profile", "h100") in build[0][1], build
    assert not [key for key in found if "pid" in dict(key[1])], "a series per process"
