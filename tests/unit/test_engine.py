import json
from pathlib import Path

import pytest

from serving import engine
from serving.engine import EngineSettings, ProfileError

GOLDEN = Path(__file__).parent / "golden" / "engine_args.json"


def settings(profile: str, **overrides) -> EngineSettings:
    model = "/models/medgemma-dev" if profile == "cpu-dev" else "google/medgemma-4b-it"
    return EngineSettings(model=model, profile=profile, **overrides)


def test_every_profile_matches_its_golden_argument_list():
    golden = json.loads(GOLDEN.read_text())
    assert set(golden) == set(engine.PROFILES) >= {"h100", "a100", "l4", "cpu-dev"}
    for name in engine.PROFILES:
        assert engine.engine_args(settings(name)) == golden[name], name


def test_engine_args_is_pure():
    for name in engine.PROFILES:
        assert engine.engine_args(settings(name)) == engine.engine_args(settings(name))


@pytest.mark.parametrize("dtype", ["float16", "half", "fp16", "FLOAT16"])
def test_fp16_is_refused_with_the_reason(dtype):
    with pytest.raises(ProfileError, match="bfloat16"):
        engine.engine_args(settings("h100", dtype=dtype))


@pytest.mark.parametrize("extra", [("--dtype", "half"), ("--dtype=float16",)])
def test_fp16_through_passthrough_arguments_is_refused(extra):
    with pytest.raises(ProfileError, match="bfloat16"):
        engine.engine_args(settings("h100", extra_args=extra))


def test_host_and_port_come_before_passthrough_arguments():
    args = engine.engine_args(settings("l4", host="0.0.0.0", port=9000, extra_args=("--port", "9001")))
    assert args[-8:] == ["--host", "0.0.0.0", "--port", "9000", "--allowed-media-domains", engine.NO_MEDIA_DOMAIN,
                         "--port", "9001"]


def test_other_dtypes_are_refused_and_bf16_is_always_emitted():
    with pytest.raises(ProfileError):
        engine.engine_args(settings("l4", dtype="float32"))
    args = engine.engine_args(settings("l4", dtype="auto"))
    assert args[args.index("--dtype") + 1] == "bfloat16"


def test_context_limits():
    assert "32768" in engine.engine_args(settings("h100"))
    assert "131072" in engine.engine_args(settings("h100", max_model_len=131072))
    with pytest.raises(ProfileError, match="131072"):
        engine.engine_args(settings("h100", max_model_len=131073))
    with pytest.raises(ProfileError, match="too small"):
        engine.engine_args(settings("h100", max_model_len=512))


def test_image_limits_and_no_video_or_audio():
    args = engine.engine_args(settings("a100", max_images_per_prompt=2))
    limits = json.loads(args[args.index("--limit-mm-per-prompt") + 1])
    assert limits == {"image": 2, "video": 0, "audio": 0}
    with pytest.raises(ProfileError):
        engine.engine_args(settings("a100", max_images_per_prompt=-1))


def test_batched_tokens_never_below_one_image():
    with pytest.raises(ProfileError, match="image"):
        engine.engine_args(settings("h100", max_num_batched_tokens=200))
    for profile in engine.PROFILES.values():
        assert profile.max_num_batched_tokens >= engine.IMAGE_PROMPT_TOKENS


def test_extra_args_are_appended_untouched_and_last():
    extra = ("--seed", "7", "--max-num-seqs", "3")
    args = engine.engine_args(settings("h100", extra_args=extra))
    assert tuple(args[-4:]) == extra


def test_kv_math_for_medgemma():
    # 4 KV heads x 256 dims x (K and V) x 2 bytes = 4 KiB per token per layer.
    assert engine.KV_BYTES_PER_TOKEN_PER_LAYER == 4096
    # Short sequence: every layer holds every token.
    assert engine.kv_bytes_per_sequence(100) == 34 * 4096 * 100
    # 32K: 5 global layers hold 32768 tokens, 29 sliding layers hold window + one block.
    assert engine.kv_bytes_per_sequence(32768) == 5 * 4096 * 32768 + 29 * 4096 * 1040
    # The 5:1 mix makes a full-context sequence ~5.5x cheaper than all-global layers.
    assert 34 * 4096 * 32768 / engine.kv_bytes_per_sequence(32768) > 5


def test_max_num_seqs_is_sized_from_gpu_memory():
    l4 = engine.PROFILES["l4"]
    sized = engine.sized_max_num_seqs(l4)
    budget = engine.kv_budget_bytes(l4)
    assert sized % 8 == 0
    assert sized * engine.kv_bytes_per_sequence(engine.TYPICAL_CONTEXT_TOKENS) <= budget
    # More memory -> more sequences, until the compute cap.
    assert engine.sized_max_num_seqs(l4, gpu_memory_gib=16) < sized
    assert engine.sized_max_num_seqs(engine.PROFILES["h100"], gpu_memory_gib=141) == 256
    with pytest.raises(ProfileError, match="no room"):
        engine.sized_max_num_seqs(l4, gpu_memory_gib=8)


def test_attention_backend_pinned_per_gpu_generation():
    backends = {name: p.attention_backend for name, p in engine.PROFILES.items()}
    assert backends == {
        "h100": "TRITON_FLASH_ATTN",
        "a100": "TRITON_ATTN",
        "l4": "TRITON_ATTN",
        "cpu-dev": None,
    }


def test_profile_table_rows():
    rows = {row["profile"]: row for row in engine.profile_table()}
    assert rows["h100"]["max_num_seqs"] == 256
    assert rows["l4"]["full_context_seqs"] >= 10
    assert rows["cpu-dev"]["full_context_seqs"] is None


def test_vllm_always_gets_a_media_allow_list():
    args = engine.engine_args(settings("cpu-dev"))
    assert args[args.index("--allowed-media-domains") + 1] == engine.NO_MEDIA_DOMAIN  # matches no URL
    args = engine.engine_args(settings("cpu-dev", remote_image_hosts=("pacs.example.org",)))
    assert args[args.index("--allowed-media-domains") + 1:][:1] == ["pacs.example.org"]


def test_a_traces_endpoint_reaches_vllm_and_none_adds_nothing():
    traced = engine.engine_args(EngineSettings(model="m", profile="cpu-dev", otlp_traces_endpoint="otel:4317"))
    plain = engine.engine_args(EngineSettings(model="m", profile="cpu-dev"))
    assert traced[traced.index("--otlp-traces-endpoint") + 1] == "otel:4317"
    assert "--otlp-traces-endpoint" not in plain
