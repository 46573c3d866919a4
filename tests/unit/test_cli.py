"""The console script: settings are refused before any engine starts."""

import json
import os
import subprocess
import sys
import time

import pytest

from serving import cli, engine


def run_cli(*args: str, env: dict | None = None, timeout: float = 120):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MEDGEMMA_", "HF_"))}
    base["HF_HOME"] = "/nonexistent-hf-home"
    base.update(env or {})
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "serving", *args], check=False, capture_output=True, text=True, env=base, timeout=timeout
    )
    return result, time.monotonic() - started


def test_engine_args_prints_the_resolved_vllm_arguments(capsys):
    assert cli.main(["engine-args", "--profile", "l4", "--json", "--", "--seed", "5"]) == 0
    argv = json.loads(capsys.readouterr().out)
    assert argv[argv.index("--attention-backend") + 1] == "TRITON_ATTN"
    assert argv[-8:-2] == ["--host", "127.0.0.1", "--port", "8000", "--allowed-media-domains", engine.NO_MEDIA_DOMAIN]
    assert argv[-2:] == ["--seed", "5"]


def test_profiles_table(capsys):
    assert cli.main(["profiles"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["profile"] for r in rows] == list(engine.PROFILES)


def test_devmodel_command_writes_a_checkpoint(tmp_path, capsys):
    assert cli.main(["devmodel", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dtype", "float16"], "float16"),
        (["--max-model-len", "200000"], "131072"),
        (["--profile", "h100"], "needs a CUDA GPU"),
        (["--model", "google/medgemma-4b-it"], "HF_TOKEN"),
        (["--api-processes", "17"], "exceeds the engine's max_num_seqs (16)"),
    ],
)
def test_serve_refuses_bad_settings_before_loading(args, message):
    result, elapsed = run_cli("serve", "--profile", "cpu-dev", *args)
    if args[:2] == ["--profile", "h100"]:
        result, elapsed = run_cli("serve", *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert elapsed < 60  # refused up front, not after a model load


def test_passthrough_fp16_is_refused_before_anything_is_built(tmp_path):
    dev_dir = tmp_path / "dev"
    for extra in (["--dtype", "half"], ["--dtype=float16"]):
        result, _ = run_cli(
            "serve", "--profile", "cpu-dev", "--", *extra,
            env={"MEDGEMMA_DEV_MODEL_DIR": str(dev_dir)},
        )
        assert result.returncode == 2, result.stderr[-2000:]
        assert "bfloat16" in result.stderr
        assert not dev_dir.exists()
