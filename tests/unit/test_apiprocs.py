"""Several API processes per engine: how the engine and the budget are shared, what each
process is given, and how many a profile runs (the real server: tests/integration/test_api_processes.py)."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from serving import config, engine
from serving.admission.build import engine_capacity, share
from serving.assembly import context_for_api_process
from serving.hardware import available_cores


@pytest.mark.parametrize("total", [1, 7, 16, 320, 1043])
@pytest.mark.parametrize("processes", [1, 2, 3, 8])
def test_shares_add_up_and_differ_by_at_most_one(total, processes):
    parts = [share(total, i, processes) for i in range(processes)]
    assert min(parts) >= 1 and max(parts) - min(parts) <= 1
    if total >= processes:
        assert sum(parts) == total


def test_the_engine_gate_is_split_between_the_api_processes():
    vllm_config = SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_seqs=16),
        cache_config=SimpleNamespace(kv_cache_size_tokens=1_000_001, num_gpu_blocks=None, block_size=16),
    )
    whole = engine_capacity(vllm_config, 0.25)
    parts = [engine_capacity(vllm_config, 0.25, i, 2) for i in range(2)]
    assert whole.max_requests == 24  # 16 + at least 8 of headroom
    assert sum(p.max_requests for p in parts) == whole.max_requests
    assert sum(p.kv_tokens for p in parts) == whole.kv_tokens == 1_000_001


def test_each_api_process_gets_the_host_ledger_its_slot_and_its_own_usage_file(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text("plans: {p: {concurrency: 2}}\naccounts: {}\n")
    settings = config.load_settings({"keys_file": str(keys), "usage_log": str(tmp_path / "usage.jsonl")})
    resolved = config.resolve(settings, None, serving=False)
    context = context_for_api_process(settings, resolved, 1, 3, Path("/dev/shm/ledger"))
    admission = context.admission
    assert (admission.api_process, admission.api_processes, admission.host_ledger) == (1, 3, Path("/dev/shm/ledger"))
    assert admission.usage_log == str(tmp_path / "usage-api1.jsonl")


@pytest.mark.parametrize(
    ("profile", "cores", "expected"),
    [("h100", 16, 8), ("h100", 6, 4), ("h100", 2, 1), ("a100", 32, 6), ("l4", 8, 2), ("l4", 3, 1), ("cpu-dev", 2, 1),
     ("cpu-dev", 64, 1)],
)  # fmt: skip
def test_api_processes_come_from_the_profile_and_the_cores_the_engine_leaves(profile, cores, expected):
    assert engine.sized_api_processes(engine.PROFILES[profile], cores) == expected


def test_a_container_cpu_limit_caps_the_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("300000 100000\n")  # a 3-CPU limit
    assert available_cores(str(tmp_path)) == min(3, available_cores(str(tmp_path / "none")))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cores(str(tmp_path)) == available_cores(str(tmp_path / "none")) >= 1


def test_ray_replicas_refuse_several_api_processes():
    from serving.ray_app import AppSettings

    with pytest.raises(config.SettingsError, match="add replicas"):
        AppSettings.from_args({"serve": {"api_processes": 2}})
