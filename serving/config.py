"""Serving settings: defaults -> YAML file -> environment (``MEDGEMMA_``) -> command-line flags.

Guarantees:
- Every field's description is its ``--help`` text (see ``serving.cli``).
- ``load_settings`` validates everything that can be checked without loading the model
  (ranges, the dtype, the profile, context limits, the model's location and access) and
  raises ``SettingsError`` with a message that says what to change, before any engine
  process starts.
- The resolved ``EngineSettings`` (model and profile decided, GPU detected) is what the
  launcher hands to ``serving.engine``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from serving import engine, hardware
from serving.layers import SettingsError, load_layered

logger = logging.getLogger(__name__)

PRODUCTION_MODEL = "google/medgemma-4b-it"
GATED_MODEL_PREFIXES = ("google/medgemma", "google/gemma")
ENV_PREFIX = "MEDGEMMA_"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medgemma-serving"


class ServeSettings(BaseSettings):
    """Settings of ``medgemma-serve serve``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    model: str | None = Field(
        None,
        description="Hugging Face hub id or local checkpoint path. Default: "
        f"{PRODUCTION_MODEL} when a CUDA GPU is present, else the dev checkpoint "
        "(tiny random weights, built on first use).",
    )
    profile: str | None = Field(
        None,
        description=f"Engine profile: one of {', '.join(engine.PROFILES)}. "
        "Default: detected from the GPU (cpu-dev without one).",
    )
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 in containers).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on.")
    served_model_name: str = Field(
        "medgemma-4b-it", min_length=1, description="Model name clients put in requests."
    )
    dtype: str = Field(
        "bfloat16", description="Weights and activations dtype; bfloat16 only (fp16 is refused)."
    )
    max_model_len: int = Field(
        32768, ge=1, description=f"Context length in tokens (at most {engine.MAX_CONTEXT})."
    )
    max_images_per_prompt: int = Field(4, description="Images allowed in one request.")
    max_num_seqs: int | None = Field(
        None, description="Concurrent sequences per engine; default sized from GPU memory."
    )
    max_num_batched_tokens: int | None = Field(
        None, description="Tokens per engine step; default from the profile."
    )
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="GPU memory used for sizing; default detected with nvidia-smi."
    )
    dev_model_dir: Path = Field(
        default_factory=lambda: default_cache_dir() / f"devmodel-v{_dev_model_version()}",
        description="Where the dev checkpoint is built and cached.",
    )
    log_level: str = Field("info", description="Log level: debug, info, warning, error.")
    keys_file: Path | None = Field(
        None,
        description="YAML file of plans, accounts and hashed API keys (medgemma-serve keys add). "
        "Without one the server runs in open mode: one anonymous account.",
    )
    keys_reload_interval_s: float = Field(
        2.0,
        gt=0,
        description="How often the keys file is checked for changes (SIGHUP reloads it at once).",
    )
    usage_log: str | None = Field(
        None,
        description="Where usage records go (one JSON line per request, no content): a file "
        "path (size-rotated; {host} and {pid} are replaced), '-' for stdout, or 'off'. Default: "
        "off in open mode; with a keys file, usage/usage.jsonl under the cache folder "
        "(usage-{host}-{pid}.jsonl for Ray replicas). One file per server process.",
    )
    usage_log_max_mib: float = Field(
        100.0, gt=0, description="Size at which the usage file is rotated (usage.jsonl -> usage.jsonl.1)."
    )
    usage_log_backups: int = Field(
        10, ge=0, description="Rotated usage files kept; the oldest is deleted (retention on disk)."
    )
    otlp_traces_endpoint: str | None = Field(
        None,
        description="OpenTelemetry collector (OTLP; gRPC host:port, or http/protobuf with "
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL) for request traces: admission's spans and vLLM's "
        "request span in one trace, ids and timings only. Off when unset.",
    )
    account_metrics: bool = Field(
        False,
        description="Label the per-account metrics (unit-seconds, tokens, requests, units held) "
        "by account, at most account_metrics_max accounts; the rest count as 'other'.",
    )
    account_metrics_max: int = Field(
        50, ge=1, description="Accounts labelled by name in the per-account metrics (cardinality cap)."
    )
    open_budget: int = Field(
        4, ge=1, description="Concurrency units of the anonymous account in open mode."
    )
    queue_size: int = Field(
        256, ge=0, description="Admitted requests of one priority class that may wait for a free engine slot."
    )
    queue_timeout_s: float = Field(
        30.0, gt=0, description="How long a stat or interactive request may wait for an engine slot before a 503."
    )
    batch_queue_timeout_s: float = Field(
        300.0, gt=0, description="How long a batch request may wait for an engine slot before a 503."
    )
    batch_share: float = Field(
        0.5, gt=0, le=1,
        description="Share of the engine's slots (max_num_seqs) and KV cache batch requests may "
        "hold; the rest stays free for interactive and stat requests.",
    )  # fmt: skip
    interactive_share: float = Field(
        0.9, gt=0, le=1,
        description="Share of the engine's slots and KV cache interactive and batch requests may "
        "hold together; the rest stays free for stat requests.",
    )  # fmt: skip
    scale_on_batch: bool = Field(
        False,
        description="Count batch requests as autoscaling demand (by default batch only uses idle "
        "capacity and never adds a replica).",
    )
    drain_timeout_s: float = Field(
        120.0,
        ge=0,
        description="On SIGTERM: how long admitted requests may run to their end before they "
        "are ended with an error and the process exits (match terminationGracePeriodSeconds).",
    )
    engine_headroom: float = Field(
        0.25,
        ge=0,
        le=4,
        description="Requests admitted to the engine beyond max_num_seqs, as a fraction of it "
        "(at least 8), so its batch never waits for the next request's preprocessing.",
    )
    capacity_file: str | None = Field(
        None,
        description="The units this replica is sold at, instead of the engine's max_num_seqs: a "
        "capacity.json from `medgemma-loadtest capacity` (the concurrency at which the SLO held; "
        "refused if measured on another engine profile or vLLM version) or a number. The admission "
        "gate and the autoscaling signal both use it.",
    )
    redis_url: str | None = Field(
        None,
        description="Redis URL for budgets shared by several replicas (redis://host:6379/0); "
        "unset: budgets are per process.",
    )
    redis_password: SecretStr | None = Field(
        None,
        description="Redis password (AUTH), from the environment (MEDGEMMA_REDIS_PASSWORD, e.g. a "
        "Kubernetes Secret) or the YAML file; never a flag, so it does not show in ps.",
    )
    redis_tls_ca_file: Path | None = Field(
        None,
        description="CA bundle that verifies the Redis server's certificate (rediss:// URLs only); "
        "default: the system's CAs.",
    )
    lease_ttl_s: float = Field(
        15.0, gt=0, description="Seconds a dead replica's leases outlive it in Redis."
    )
    redis_timeout_s: float = Field(
        1.0, gt=0, description="How long one Redis call may take before the fallback applies."
    )
    ledger_fallback: str = Field(
        "share",
        description="While Redis is unreachable: 'share' (each replica enforces its share "
        "of each budget; the shares sum to it) or 'refuse' (503).",
    )
    model_costs: dict[str, int] = Field(
        default_factory=lambda: {"medgemma-4b-it": 1},
        description="Concurrency units one in-flight request of each model costs (YAML/env).",
    )
    max_body_mib: float = Field(
        20.0, gt=0, description="Largest request body accepted, in MiB (larger: 413)."
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="How long a client may take to send its request body (then 408)."
    )
    engine_hang_timeout_s: float = Field(
        120.0,
        gt=0,
        description="If requests are running and none produces output for this long, the "
        "engine is taken as hung: requests end with 503 engine_unavailable, the process exits 1.",
    )
    stream_stall_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A client that takes no response data for this long (it stopped reading) "
        "has its request ended and its units released.",
    )
    max_image_pixels: int = Field(
        50_000_000,
        ge=1,
        description="Largest image accepted, in declared width x height pixels (larger: 400); "
        "checked from the image header, so decompression bombs are never decoded.",
    )
    remote_image_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts images may be fetched from by http(s) URL (YAML/env list). Empty "
        "(default): only inline base64 data URLs are accepted.",
    )
    remote_image_private_networks: bool = Field(
        False,
        description="Allow remote image hosts that resolve to private addresses (an in-hospital "
        "PACS); loopback and link-local stay refused only while this is off.",
    )
    remote_image_timeout_s: int = Field(
        10, ge=1, description="Time limit for fetching one remote image."
    )
    remote_image_max_mib: int = Field(
        16, ge=1, description="Size limit of one remote image, in MiB."
    )
    image_preprocessing: Literal["fast", "exact", "reference"] = Field(
        "fast",
        description="Image decoding and preprocessing in the API process: 'fast' (reduced "
        "JPEG decoding and two-step resizing, never below 896 px; bounded in docs/images.md), "
        "'exact' (transformers' PIL result, bit for bit, at less cost) or 'reference' (vLLM's own).",
    )
    inline_render_max_kib: float = Field(4.0, ge=0, le=64, description="A request with no image "
        "and a body up to this size renders its chat template and prompt on the event loop, not on "
        "vLLM's renderer thread (about 1 ms of API CPU per text request here; docs/images.md). 0: off.")  # fmt: skip
    api_processes: int | None = Field(
        None,
        ge=1,
        le=64,
        description="API server processes in front of the one engine (vLLM's multi-server mode): "
        "image decoding and preprocessing run in them, one core each. Budgets stay exact "
        "across them (a shared ledger in /dev/shm, or Redis); the engine's capacity is split "
        "between them. Default: from the profile and the host's cores (docs/engine-profiles.md).",
    )
    vllm_args: list[str] = Field(
        default_factory=list,
        description="Extra vLLM arguments passed through untouched (after '--' on the "
        "command line; a JSON list in MEDGEMMA_VLLM_ARGS).",
    )

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str | None) -> str | None:
        if value is not None and value not in engine.PROFILES:
            raise ValueError(f"unknown profile {value!r}; choose one of {list(engine.PROFILES)}")
        return value

    @field_validator("ledger_fallback")
    @classmethod
    def _known_fallback(cls, value: str) -> str:
        if value not in ("share", "refuse"):
            raise ValueError("ledger_fallback must be 'share' or 'refuse'")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ServeSettings:
        if self.redis_tls_ca_file is not None and not (self.redis_url or "").startswith("rediss://"):
            raise ValueError("redis_tls_ca_file needs a TLS Redis URL (rediss://...)")
        if self.keys_file is not None and any(a.split("=")[0] == "--api-key" for a in self.vllm_args):
            raise ValueError(
                "vLLM's --api-key cannot be combined with a keys file: both read the "
                "Authorization header; keep the per-account keys (or use --api-key in open mode)"
            )
        return self

    @field_validator("model_costs")
    @classmethod
    def _positive_costs(cls, value: dict[str, int]) -> dict[str, int]:
        if not value or any(cost < 1 for cost in value.values()):
            raise ValueError("model_costs needs at least one model, each costing 1 or more units")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.lower() not in {"debug", "info", "warning", "error", "critical"}:
            raise ValueError("log_level must be debug, info, warning, error or critical")
        return value.lower()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest first: flags (init kwargs), environment, then the YAML file (injected by
        # load_settings as the lowest init layer), then defaults.
        return (init_settings, env_settings)


def _dev_model_version() -> int:
    from serving import devmodel

    return devmodel.DEV_MODEL_VERSION


def load_settings(
    flags: dict[str, Any] | None = None, config_file: str | os.PathLike | None = None
) -> ServeSettings:
    """Merge the four layers and validate field by field."""
    env_names = {f"{ENV_PREFIX}{name}".upper() for name in ServeSettings.model_fields}
    unknown_env = sorted(
        k for k in os.environ if k.startswith(ENV_PREFIX) and k.upper() not in env_names
    )
    if unknown_env:
        # A warning, not an error: Kubernetes injects MEDGEMMA_SERVICE_HOST and friends for
        # a Service named "medgemma" (the manifests set enableServiceLinks: false).
        logger.warning(
            "ignoring unknown environment setting(s) %s; known: %s",
            ", ".join(unknown_env),
            ", ".join(sorted(env_names)),
        )
    return load_layered(ServeSettings, ENV_PREFIX, flags, config_file)


def resolve(
    settings: ServeSettings, gpu: hardware.Gpu | None, *, serving: bool = True
) -> engine.EngineSettings:
    """Decide model and profile from the detected GPU; check what the engine would refuse.

    ``serving=False`` (printing arguments) allows a GPU profile on a machine without a GPU.
    """
    profile = settings.profile
    if profile is None:
        profile = hardware.profile_for(gpu)
        if profile is None:
            raise SettingsError(
                f"no engine profile for GPU {gpu.name!r}; pass --profile "
                f"({', '.join(n for n in engine.PROFILES if n != 'cpu-dev')}) "
                "with the closest GPU, and --gpu-memory-gib"
            )
    if serving and engine.PROFILES[profile].device == "cuda" and gpu is None:
        raise SettingsError(
            f"profile {profile} needs a CUDA GPU and none was found (nvidia-smi); "
            "use --profile cpu-dev on a machine without one"
        )
    model = settings.model
    if model is None:
        on_gpu = engine.PROFILES[profile].device == "cuda"
        model = PRODUCTION_MODEL if on_gpu else str(settings.dev_model_dir)
    gpu_memory = settings.gpu_memory_gib or (gpu.memory_gib if gpu else None)
    resolved = engine.EngineSettings(
        model=model,
        profile=profile,
        served_model_name=settings.served_model_name,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        max_images_per_prompt=settings.max_images_per_prompt,
        gpu_memory_gib=gpu_memory,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        host=settings.host,
        port=settings.port,
        remote_image_hosts=tuple(settings.remote_image_hosts),
        otlp_traces_endpoint=settings.otlp_traces_endpoint,
        extra_args=tuple(settings.vllm_args),
    )
    try:
        engine.validate(resolved)
    except engine.ProfileError as exc:
        raise SettingsError(str(exc)) from None
    return resolved


def uses_dev_model(settings: ServeSettings, resolved: engine.EngineSettings) -> bool:
    """True when the resolved model is the dev checkpoint (built on first use)."""
    return resolved.model == str(settings.dev_model_dir)


def check_model_access(model: str, environ: dict[str, str] | None = None) -> None:
    """Fail fast when a model cannot be loaded: missing path, or a gated hub model without a token."""
    environ = dict(os.environ if environ is None else environ)
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise SettingsError(f"model path {model} has no config.json: not a checkpoint folder")
        return
    if _in_hub_cache(model):
        return
    token = environ.get("HF_TOKEN") or environ.get("HUGGING_FACE_HUB_TOKEN") or _stored_token()
    if environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}:
        raise SettingsError(
            f"model {model} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            "download it first or pass --model /path/to/checkpoint"
        )
    if token is None and model.lower().startswith(GATED_MODEL_PREFIXES):
        raise SettingsError(
            f"model {model} is gated on the Hugging Face hub and no token is set: accept its "
            f"terms at https://huggingface.co/{model}, then export HF_TOKEN=<your token> "
            "(or mount a downloaded checkpoint and pass --model /path/to/it)"
        )


def _in_hub_cache(model: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    found = try_to_load_from_cache(model, "config.json")
    return isinstance(found, str)


def _stored_token() -> str | None:
    try:
        from huggingface_hub import get_token
    except ImportError:
        return None
    return get_token()


def describe(settings: ServeSettings) -> str:
    """The settings as JSON, for logs: URL passwords, secret vLLM flags and the Redis
    password are ``***`` (``serving.logs``)."""
    from serving.logs import REDACTED, redact_args, redact_url

    data = settings.model_dump(mode="json")
    data["redis_url"] = redact_url(data["redis_url"])
    data["vllm_args"] = redact_args(data["vllm_args"])
    if data["redis_password"] is not None:
        data["redis_password"] = REDACTED
    return json.dumps(data, sort_keys=True)
