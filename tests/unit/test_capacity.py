"""``--capacity-file``: a measured capacity (or a number) replaces max_num_seqs in the gate
and the autoscaling signal, and one measured elsewhere is refused (the real server:
tests/integration/test_capacity_file.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from vllm.version import __version__ as vllm_version

from serving import config
from serving.admission.build import AdmissionSettings, engine_gate
from serving.admission.keys import KeyStore
from serving.assembly import sold_capacity
from serving.capacity import CAPACITY_FILE, ENGINE_LIMIT, SETTING, SoldCapacity, read_capacity
from serving.layers import SettingsError
from serving.metrics import ServingMetrics
from tests.metrics_text import samples

ENGINE = {"profile": "h100", "vllm_version": "0.32.0"}


def capacity_file(tmp_path, units=40, **engine) -> str:
    path = tmp_path / "capacity.json"
    path.write_text(json.dumps({"format": 1, "units_per_replica": units, "engine": ENGINE | engine}))
    return str(path)


def read(value, **overrides):
    return read_capacity(value, **({"profile": "h100", "vllm_version": "0.32.0", "max_num_seqs": 256} | overrides))


def test_without_a_setting_the_engine_limit_is_the_capacity():
    assert read(None) == read("") == SoldCapacity(None, ENGINE_LIMIT)


def test_a_number_or_a_file_measured_on_this_engine_gives_the_units(tmp_path):
    assert read("48") == SoldCapacity(48, SETTING)
    assert read(capacity_file(tmp_path, 40)) == SoldCapacity(40, CAPACITY_FILE)


@pytest.mark.parametrize(
    ("engine", "message"),
    [({"profile": "l4"}, "measured on engine profile l4, and this server runs h100"),
     ({"vllm_version": "0.31.1"}, "measured on vLLM version 0.31.1, and this server runs 0.32.0"),
     ({"profile": None}, "does not say which engine profile")],
)  # fmt: skip
def test_a_file_measured_on_another_engine_is_refused_naming_both(tmp_path, engine, message):
    with pytest.raises(SettingsError, match=message) as refused:
        read(capacity_file(tmp_path, 40, **engine))
    assert "medgemma-loadtest capacity" in str(refused.value)


@pytest.mark.parametrize(
    ("contents", "message"),
    [("{not json", "not a readable capacity file"), ('{"format": 2}', "not a capacity file of format 1"),
     ('[1, 2]', "not a capacity file"),
     (json.dumps({"format": 1, "units_per_replica": 0, "engine": ENGINE}), "holds no capacity"),
     (json.dumps({"format": 1, "units_per_replica": "40", "engine": ENGINE}), "holds no capacity")],
)  # fmt: skip
def test_a_broken_or_empty_file_is_refused(tmp_path, contents, message):
    path = tmp_path / "capacity.json"
    path.write_text(contents)
    with pytest.raises(SettingsError, match=message):
        read(str(path))
    with pytest.raises(SettingsError, match="does not exist"):
        read(str(tmp_path / "missing.json"))


def test_units_must_fit_the_engine_and_every_api_process():
    with pytest.raises(SettingsError, match="outside 1..256"):
        read("300")
    with pytest.raises(SettingsError, match="outside 1..256"):
        read("0")
    with pytest.raises(SettingsError, match="cannot be shared by 4 API processes"):
        read("3", api_processes=4)


def test_the_server_checks_the_file_against_its_own_profile_and_vllm(tmp_path):
    """What ``medgemma-serve serve`` runs before the model loads: cpu-dev's max_num_seqs is 16."""
    settings = config.load_settings({"capacity_file": capacity_file(tmp_path, 6, profile="cpu-dev",
                                                                    vllm_version=vllm_version)})  # fmt: skip
    resolved = config.resolve(settings, None, serving=False)
    assert sold_capacity(settings, resolved) == SoldCapacity(6, CAPACITY_FILE)
    with pytest.raises(SettingsError, match="outside 1..16"):
        sold_capacity(config.load_settings({"capacity_file": "17"}), resolved)
    elsewhere = config.load_settings({"capacity_file": capacity_file(tmp_path, 6, profile="h100", vllm_version=vllm_version)})
    with pytest.raises(SettingsError, match="engine profile h100, and this server runs cpu-dev"):
        sold_capacity(elsewhere, resolved)


VLLM_CONFIG = SimpleNamespace(
    scheduler_config=SimpleNamespace(max_num_seqs=16),
    cache_config=SimpleNamespace(kv_cache_size_tokens=100_000, num_gpu_blocks=None, block_size=16),
)


def test_the_gate_holds_exactly_the_sold_units_and_reports_them_as_capacity():
    settings = AdmissionSettings(keys=KeyStore.open(1))
    assert engine_gate(VLLM_CONFIG, settings)[0].max_requests == 24  # 16 + headroom
    assert engine_gate(VLLM_CONFIG, settings)[1] == 16
    sold = AdmissionSettings(keys=KeyStore.open(1), capacity=SoldCapacity(6, CAPACITY_FILE))
    capacity, units = engine_gate(VLLM_CONFIG, sold)
    assert (capacity.max_requests, units, capacity.kv_tokens) == (6, 6, 100_000)
    parts = [engine_gate(VLLM_CONFIG, AdmissionSettings(keys=KeyStore.open(1), capacity=SoldCapacity(7, SETTING),
                                                        api_process=i, api_processes=2)) for i in range(2)]  # fmt: skip
    assert [p[0].max_requests for p in parts] == [p[1] for p in parts] == [4, 3]


def test_metrics_say_which_source_is_in_force():
    metrics = ServingMetrics()
    metrics.set_capacity_source(CAPACITY_FILE)
    text = generate_latest(metrics.registry).decode()
    assert "# HELP medgemma_capacity_source Where medgemma_capacity_units comes from" in text
    sources = {labels["source"]: value for name, labels, value in samples(text) if name == "medgemma_capacity_source"}
    assert sources == {"capacity_file": 1, "max_num_seqs": 0, "setting": 0}
