from prometheus_client import CollectorRegistry, generate_latest

from serving.metrics import ServingMetrics


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
    metrics.engine_ready.set_function(lambda: 0.0 if state["errored"] else 1.0)
    assert "medgemma_engine_ready 1.0" in exposition(metrics)
    state["errored"] = True
    assert "medgemma_engine_ready 0.0" in exposition(metrics)


def test_two_instances_do_not_share_state():
    first, second = ServingMetrics(CollectorRegistry()), ServingMetrics(CollectorRegistry())
    first.engine_ready.set(1)
    assert "medgemma_engine_ready 0.0" in exposition(second)
