import logging

import pytest

from serving import config, hardware
from serving.config import SettingsError, load_settings, resolve

H100 = hardware.Gpu(name="NVIDIA H100 80GB HBM3", memory_gib=79.6)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("MEDGEMMA_") or key in {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"}:
            monkeypatch.delenv(key)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")


def test_defaults():
    s = load_settings()
    assert (s.host, s.port, s.served_model_name, s.max_model_len) == (
        "127.0.0.1", 8000, "medgemma-4b-it", 32768,
    )
    assert s.model is None and s.profile is None and s.dtype == "bfloat16"


def test_layers_defaults_yaml_env_flags(tmp_path, monkeypatch):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("port: 9000\nmax-model-len: 16384\nserved_model_name: from-yaml\nmax_images_per_prompt: 2\n")
    s = load_settings(config_file=cfg)
    assert (s.port, s.max_model_len, s.served_model_name) == (9000, 16384, "from-yaml")

    monkeypatch.setenv("MEDGEMMA_PORT", "9100")
    monkeypatch.setenv("MEDGEMMA_SERVED_MODEL_NAME", "from-env")
    s = load_settings(config_file=cfg)
    assert (s.port, s.served_model_name, s.max_model_len) == (9100, "from-env", 16384)

    s = load_settings({"port": 9200, "served_model_name": None}, config_file=cfg)
    assert (s.port, s.served_model_name, s.max_images_per_prompt) == (9200, "from-env", 2)


def test_env_list_of_vllm_args(monkeypatch):
    monkeypatch.setenv("MEDGEMMA_VLLM_ARGS", '["--seed", "3"]')
    assert load_settings().vllm_args == ["--seed", "3"]


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"port": 0}, "port"),
        ({"port": 70000}, "port"),
        ({"profile": "v100"}, "unknown profile"),
        ({"log_level": "loud"}, "log_level"),
        ({"gpu_memory_gib": -1}, "gpu_memory_gib"),
    ],
)
def test_invalid_settings_say_what_to_fix(flags, message):
    with pytest.raises(SettingsError, match=message) as info:
        load_settings(flags)
    assert "--" in str(info.value) and "MEDGEMMA_" in str(info.value)


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("port: [unclosed\n")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(config_file=bad)
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(config_file=tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(SettingsError, match="mapping"):
        load_settings(config_file=listy)


def test_unknown_setting_in_yaml_is_an_error(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("prot: 9000\n")
    with pytest.raises(SettingsError, match="prot"):
        load_settings(config_file=cfg)


def test_unknown_env_setting_warns(monkeypatch, caplog):
    monkeypatch.setenv("MEDGEMMA_SERVICE_HOST", "10.0.0.1")
    with caplog.at_level(logging.WARNING):
        load_settings()
    assert "MEDGEMMA_SERVICE_HOST" in caplog.text


def test_resolve_without_gpu_is_the_dev_model_on_cpu_dev():
    settings = load_settings({"dev_model_dir": "/tmp/dev"})
    resolved = resolve(settings, None)
    assert resolved.profile == "cpu-dev" and resolved.model == "/tmp/dev"
    assert config.uses_dev_model(settings, resolved)


def test_resolve_with_gpu_is_the_hub_model_on_the_matching_profile():
    settings = load_settings()
    resolved = resolve(settings, H100)
    assert resolved.profile == "h100" and resolved.model == config.PRODUCTION_MODEL
    assert not config.uses_dev_model(settings, resolved)
    assert resolved.gpu_memory_gib == 79.6


def test_resolve_refuses_what_the_engine_would_refuse():
    with pytest.raises(SettingsError, match="float16"):
        resolve(load_settings({"dtype": "float16"}), None)
    with pytest.raises(SettingsError, match="131072"):
        resolve(load_settings({"max_model_len": 262144}), None)
    with pytest.raises(SettingsError, match="needs a CUDA GPU"):
        resolve(load_settings({"profile": "h100"}), None)
    with pytest.raises(SettingsError, match="no engine profile"):
        resolve(load_settings(), hardware.Gpu(name="Tesla T4", memory_gib=15))
    # Printing arguments for a GPU profile works anywhere.
    assert resolve(load_settings({"profile": "l4"}), None, serving=False).profile == "l4"


def test_gated_model_without_token_fails_fast():
    with pytest.raises(SettingsError, match="HF_TOKEN") as info:
        config.check_model_access("google/medgemma-4b-it", environ={})
    assert "huggingface.co/google/medgemma-4b-it" in str(info.value)
    config.check_model_access("google/medgemma-4b-it", environ={"HF_TOKEN": "hf_x"})
    with pytest.raises(SettingsError, match="HF_HUB_OFFLINE"):
        config.check_model_access("google/medgemma-4b-it", environ={"HF_HUB_OFFLINE": "1"})


def test_local_model_path_must_be_a_checkpoint(tmp_path):
    with pytest.raises(SettingsError, match="config.json"):
        config.check_model_access(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    config.check_model_access(str(tmp_path))
    with pytest.raises(SettingsError, match="config.json"):
        config.check_model_access(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "name, profile",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h100"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA L40S", None),
        ("Tesla T4", None),
    ],
)
def test_profile_for_gpu_names(name, profile):
    assert hardware.profile_for(hardware.Gpu(name=name, memory_gib=80)) == profile


def test_nvidia_smi_parsing():
    gpu = hardware.parse_nvidia_smi("NVIDIA L4, 23034\nNVIDIA L4, 23034\n")
    assert gpu == hardware.Gpu(name="NVIDIA L4", memory_gib=22.5, count=2)
    assert hardware.parse_nvidia_smi("") is None
    assert hardware.parse_nvidia_smi("garbage") is None


def test_describe_never_shows_a_secret(monkeypatch):
    monkeypatch.setenv("MEDGEMMA_REDIS_PASSWORD", "env-secret")
    s = load_settings({"redis_url": "redis://user:url-secret@redis:6379/0",
                       "vllm_args": ["--seed", "1", "--api-key", "k1", "k2", "--hf-token=hf-secret"]})  # fmt: skip
    assert s.redis_password.get_secret_value() == "env-secret"
    text = config.describe(s)
    for secret in ("env-secret", "url-secret", "k1", "k2", "hf-secret"):
        assert secret not in text
    assert "redis://user:***@redis:6379/0" in text and '"--seed", "1"' in text


def test_redis_password_is_no_flag_and_tls_ca_needs_rediss(tmp_path):
    from serving.cli import _build_parser

    assert _build_parser().parse_args(["serve", "--redis-url", "redis://r:6379/0"]).redis_url
    with pytest.raises(SystemExit):  # a password on the command line would show in ps
        _build_parser().parse_args(["serve", "--redis-password", "x"])
    with pytest.raises(SettingsError, match="rediss://"):
        load_settings({"redis_url": "redis://r:6379/0", "redis_tls_ca_file": str(tmp_path / "ca.pem")})
    assert load_settings({"redis_url": "rediss://r:6380/0", "redis_tls_ca_file": "/ca.pem"}).redis_tls_ca_file


def test_vllm_api_key_beside_a_keys_file_is_refused_without_echoing_it(tmp_path):
    with pytest.raises(SettingsError, match="--api-key cannot be combined") as info:
        load_settings({"keys_file": str(tmp_path / "keys.yaml"), "vllm_args": ["--api-key=top-secret"]})
    assert "top-secret" not in str(info.value)
    assert load_settings({"vllm_args": ["--api-key", "x"]}).vllm_args == ["--api-key", "x"]  # open mode


def test_usage_records_are_off_in_open_mode_and_on_with_a_keys_file(tmp_path, monkeypatch):
    import os
    import socket

    from serving.config import ServeSettings
    from serving.usage.destination import REPLICA_USAGE_FILE, usage_log_target

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    keys = tmp_path / "keys.yaml"
    assert usage_log_target(ServeSettings()) is None
    assert usage_log_target(ServeSettings(keys_file=keys)) == str(tmp_path / "cache/medgemma-serving/usage/usage.jsonl")
    replica = usage_log_target(ServeSettings(keys_file=keys), REPLICA_USAGE_FILE)
    assert replica.endswith(f"usage-{socket.gethostname()}-{os.getpid()}.jsonl")  # replicas sharing a host
    assert usage_log_target(ServeSettings(keys_file=keys, usage_log="off")) is None
    assert usage_log_target(ServeSettings(usage_log="-")) == "-"
    assert usage_log_target(ServeSettings(usage_log=str(tmp_path / "u" / "{pid}.jsonl"))) == str(tmp_path / f"u/{os.getpid()}.jsonl")
    (tmp_path / "file").write_text("")
    for bad, why in ((str(tmp_path / "file" / "usage.jsonl"), "cannot create"), (str(tmp_path), "cannot write"),
                     (str(tmp_path / "{user}.jsonl"), "placeholders")):  # fmt: skip
        with pytest.raises(SettingsError, match=why):
            usage_log_target(ServeSettings(usage_log=bad))
