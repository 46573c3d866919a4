"""Every argument a profile emits exists in vLLM 0.32.0: vLLM's own parser accepts them."""

import json

import pytest
import vllm  # a broken vLLM install fails here, loudly: it is never a skip

from serving import engine
from serving.vllm_app import parse_vllm_args
from tests.unit.test_engine import settings


def test_vllm_is_the_pinned_release():
    assert vllm.__version__.startswith("0.32.0")


@pytest.mark.parametrize("profile", sorted(engine.PROFILES))
def test_vllm_parser_accepts_every_profile(profile):
    from vllm.engine.arg_utils import AsyncEngineArgs

    argv = engine.engine_args(settings(profile)) + ["--host", "127.0.0.1", "--port", "8000"]
    args = parse_vllm_args(argv)
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.dtype == "bfloat16"
    assert engine_args.max_model_len == 32768
    assert engine_args.enable_prefix_caching is True
    assert engine_args.limit_mm_per_prompt == {"image": 4, "video": 0, "audio": 0}
    expected = engine.PROFILES[profile]
    assert engine_args.max_num_batched_tokens == expected.max_num_batched_tokens
    assert engine_args.mm_processor_cache_gb == expected.mm_processor_cache_gb
    backend = engine_args.attention_backend
    if expected.attention_backend is None:
        assert backend is None
    else:
        assert getattr(backend, "name", backend) == expected.attention_backend


def test_pinned_backends_exist_in_vllm():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    for profile in engine.PROFILES.values():
        if profile.attention_backend:
            assert profile.attention_backend in AttentionBackendEnum.__members__


def test_passthrough_arguments_reach_vllm_untouched():
    argv = engine.engine_args(settings("h100", extra_args=("--seed", "11", "--max-num-seqs", "5")))
    args = parse_vllm_args(argv)
    assert args.seed == 11
    assert args.max_num_seqs == 5  # the user's value wins over the profile's


def test_an_argument_vllm_does_not_know_is_rejected():
    argv = engine.engine_args(settings("cpu-dev", extra_args=("--no-such-vllm-flag", "1")))
    with pytest.raises(SystemExit):
        parse_vllm_args(argv)


def test_limit_mm_json_is_valid():
    argv = engine.engine_args(settings("l4"))
    assert json.loads(argv[argv.index("--limit-mm-per-prompt") + 1])["image"] == 4
