"""MedGemma engine profiles: named, per-GPU vLLM settings as pure functions.

Guarantees:
- ``engine_args(settings)`` is a pure function of the settings: the same settings give the
  same vLLM argument list, with no GPU, network or vLLM import needed (golden-tested).
- Every argument it emits exists in vLLM 0.32.0 (a test runs vLLM's own parser on every
  profile's output).
- Users' extra vLLM arguments are appended untouched, after ours, so they win.

The KV-cache arithmetic behind ``max_num_seqs`` is in ``kv_bytes_per_sequence`` and in
docs/engine-profiles.md; every constant below carries its reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

GIB = 1024**3

# --- MedGemma-4b-it architecture (google/medgemma-4b-it config.json) -----------------
TEXT_LAYERS = 34
GLOBAL_LAYERS = 5  # Gemma 3: every 6th layer attends globally (5:1 sliding:global) -> 34 // 6
SLIDING_LAYERS = TEXT_LAYERS - GLOBAL_LAYERS  # 29 layers with a 1024-token window
SLIDING_WINDOW = 1024
KV_HEADS = 4
HEAD_DIM = 256
KV_DTYPE_BYTES = 2  # bf16 KV cache
KV_BYTES_PER_TOKEN_PER_LAYER = 2 * KV_HEADS * HEAD_DIM * KV_DTYPE_BYTES  # K and V: 4 KiB
WEIGHTS_BYTES = 8.6e9  # 4.3B parameters in bf16 (text decoder + SigLIP tower + projector)
IMAGE_TOKENS = 256  # one 896x896 image -> 256 soft tokens
IMAGE_PROMPT_TOKENS = IMAGE_TOKENS + 6  # plus "\n\n<start_of_image>" ... "<end_of_image>\n\n"
MAX_CONTEXT = 131072  # the model's trained context (rope scaling factor 8 on 16K)
BLOCK_SIZE = 16  # vLLM's default KV block on CUDA; a sliding layer keeps window + 1 block

# A "typical" MedGemma request used to size concurrency: one image, a clinical prompt of
# about 1K tokens, and a 512-token answer.
TYPICAL_CONTEXT_TOKENS = IMAGE_PROMPT_TOKENS + 1024 + 512


class ProfileError(ValueError):
    """An engine setting that cannot work for MedGemma; the message says what to change."""


@dataclass(frozen=True)
class Profile:
    """One deployment target. Fields are the inputs of ``engine_args``."""

    name: str
    description: str
    device: str  # "cuda" or "cpu"
    gpu_memory_gib: float | None
    gpu_memory_utilization: float | None
    # What the CUDA runtime, activations, the vision encoder's profiling batch and CUDA
    # graphs take beside weights and KV cache (measured by vLLM at start-up; this is the
    # planning figure used to size max_num_seqs).
    runtime_reserve_gib: float
    # Cap on concurrent sequences from compute, not memory: past it, decode steps slow
    # every stream more than the extra batch is worth for a 4B model.
    max_num_seqs_cap: int
    # Tokens per engine step. Large steps raise throughput and every stream's latency;
    # never below one image's tokens, since Gemma 3's image input is not chunked.
    max_num_batched_tokens: int
    # Pinned attention backend (None: the platform's only one). Gemma 3 attends
    # bidirectionally inside each image ("mm prefix"): FlashAttention 2 and FlashInfer
    # refuse that in vLLM 0.32, so vLLM would walk its priority list; pinning makes a
    # missing kernel fail loudly at start-up instead of silently changing backend.
    attention_backend: str | None
    mm_processor_cache_gb: float
    enforce_eager: bool = False
    kv_cache_memory_bytes: int | None = None
    # API processes in front of the engine, at most (``sized_api_processes``): each one
    # decodes and preprocesses images on one core; the arithmetic is in
    # docs/engine-profiles.md (unverified on a GPU).
    api_processes_max: int = 1


PROFILES: dict[str, Profile] = {
    "h100": Profile(
        name="h100",
        description="NVIDIA H100/H200 (Hopper, sm90), 80 GB",
        device="cuda",
        gpu_memory_gib=80,
        gpu_memory_utilization=0.90,
        runtime_reserve_gib=4.0,
        max_num_seqs_cap=256,
        max_num_batched_tokens=8192,  # vLLM's own API-server default for >=70 GB Hopper
        api_processes_max=8,
        # vLLM 0.32 on sm90 with mm-prefix: TRITON_FLASH_ATTN, a composite that runs
        # sequences holding an image span through Triton and text-only ones through FA3.
        attention_backend="TRITON_FLASH_ATTN",
        mm_processor_cache_gb=4,
    ),
    "a100": Profile(
        name="a100",
        description="NVIDIA A100 (Ampere, sm80), 80 GB",
        device="cuda",
        gpu_memory_gib=80,
        gpu_memory_utilization=0.90,
        runtime_reserve_gib=4.0,
        max_num_seqs_cap=192,
        api_processes_max=6,
        # vLLM measured that large steps lower A100 throughput (vLLM PR 17885); 4096
        # still fits a prompt with four images in one step.
        max_num_batched_tokens=4096,
        # sm80: FA2 and FlashInfer lack mm-prefix; TRITON_ATTN supports it.
        attention_backend="TRITON_ATTN",
        mm_processor_cache_gb=4,
    ),
    "l4": Profile(
        name="l4",
        description="NVIDIA L4 (Ada, sm89), 24 GB",
        device="cuda",
        gpu_memory_gib=24,
        gpu_memory_utilization=0.90,
        runtime_reserve_gib=2.5,
        max_num_seqs_cap=64,
        max_num_batched_tokens=2048,
        api_processes_max=2,
        attention_backend="TRITON_ATTN",  # sm89: same reason as a100
        mm_processor_cache_gb=2,
    ),
    "cpu-dev": Profile(
        name="cpu-dev",
        description="CPU build of vLLM with the dev checkpoint (development, CI, tests)",
        device="cpu",
        gpu_memory_gib=None,
        gpu_memory_utilization=None,
        runtime_reserve_gib=0.0,
        max_num_seqs_cap=16,
        max_num_batched_tokens=4096,
        attention_backend=None,  # CPU_ATTN is the only CPU backend for this model
        mm_processor_cache_gb=1,
        # torch.compile costs ~11 s per start on two cores and buys nothing measurable
        # for a 1 MB model; eager keeps the dev loop and the test session short.
        enforce_eager=True,
        # On CPU, --gpu-memory-utilization is a fraction of a NUMA node's RAM and fails
        # when other processes hold memory; an explicit 1 GiB holds ~1.4M tokens of the
        # dev model's KV cache.
        kv_cache_memory_bytes=1 * GIB,
    ),
}


def kv_bytes_per_sequence(context_tokens: int) -> int:
    """KV-cache bytes one MedGemma sequence of ``context_tokens`` holds in vLLM.

    Global layers keep every token; sliding-window layers keep at most the window plus one
    block (vLLM's hybrid KV cache manager frees the rest).
    """
    global_bytes = GLOBAL_LAYERS * KV_BYTES_PER_TOKEN_PER_LAYER * context_tokens
    sliding_tokens = min(context_tokens, SLIDING_WINDOW + BLOCK_SIZE)
    sliding_bytes = SLIDING_LAYERS * KV_BYTES_PER_TOKEN_PER_LAYER * sliding_tokens
    return global_bytes + sliding_bytes


def kv_budget_bytes(profile: Profile, gpu_memory_gib: float | None = None) -> int:
    """Bytes left for the KV cache on one GPU after weights and the runtime reserve."""
    memory = gpu_memory_gib or profile.gpu_memory_gib
    if profile.device != "cuda" or memory is None or profile.gpu_memory_utilization is None:
        return profile.kv_cache_memory_bytes or 0
    usable = memory * GIB * profile.gpu_memory_utilization
    return int(usable - WEIGHTS_BYTES - profile.runtime_reserve_gib * GIB)


def sized_max_num_seqs(profile: Profile, gpu_memory_gib: float | None = None) -> int:
    """Concurrent sequences: as many typical requests as the KV budget holds, within the cap."""
    if profile.device != "cuda":
        return profile.max_num_seqs_cap
    budget = kv_budget_bytes(profile, gpu_memory_gib)
    if budget <= 0:
        raise ProfileError(
            f"profile {profile.name}: {gpu_memory_gib or profile.gpu_memory_gib} GiB leaves no "
            "room for a KV cache after MedGemma's 8.6 GB of weights"
        )
    fits = budget // kv_bytes_per_sequence(TYPICAL_CONTEXT_TOKENS)
    seqs = min(profile.max_num_seqs_cap, int(fits))
    return max(8, seqs - seqs % 8)  # multiples of 8 keep batch shapes kernel-friendly


# Cores the engine's own processes keep busy beside the API processes: the EngineCore's
# busy loop and the GPU worker (the CPU build's worker takes its bound cores instead).
ENGINE_PROCESS_CORES = 2


def sized_api_processes(profile: Profile, cores: int) -> int:
    """API processes for a host with ``cores`` usable cores: one per core the engine's
    processes leave, up to the profile's cap, at least one."""
    return max(1, min(profile.api_processes_max, cores - ENGINE_PROCESS_CORES))


@dataclass(frozen=True)
class EngineSettings:
    """What ``engine_args`` needs: the resolved subset of the serving settings."""

    model: str
    profile: str
    served_model_name: str = "medgemma-4b-it"
    dtype: str = "bfloat16"
    max_model_len: int = 32768
    max_images_per_prompt: int = 4
    gpu_memory_gib: float | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    host: str | None = None
    port: int | None = None
    remote_image_hosts: tuple[str, ...] = ()  # vLLM fetches image URLs only from these
    otlp_traces_endpoint: str | None = None  # vLLM's request spans go there (and admission's)
    extra_args: tuple[str, ...] = ()


REFUSED_DTYPES = {"float16", "half", "fp16"}
# An allow-list entry no URL can match (.invalid is reserved, RFC 2606): what vLLM gets
# when remote images are off, so its fetcher refuses every http(s) URL on its own too.
NO_MEDIA_DOMAIN = "remote-images-disabled.invalid"


def validate(settings: EngineSettings) -> Profile:
    """Check engine settings that are cheap to check; raise ProfileError saying what to fix."""
    if settings.profile not in PROFILES:
        raise ProfileError(
            f"unknown profile {settings.profile!r}; choose one of: {', '.join(PROFILES)}"
        )
    profile = PROFILES[settings.profile]
    dtype = settings.dtype.lower()
    passthrough_dtype = passthrough_value(settings.extra_args, "--dtype")
    if passthrough_dtype is not None and passthrough_dtype.lower() in REFUSED_DTYPES:
        dtype = passthrough_dtype.lower()
    if dtype in REFUSED_DTYPES:
        raise ProfileError(
            f"dtype {settings.dtype!r} is refused: Gemma 3 models produce empty or garbage "
            "output in float16 (activations overflow its range). Use bfloat16."
        )
    if dtype not in {"bfloat16", "bf16", "auto"}:
        raise ProfileError(f"dtype {settings.dtype!r} is not supported: MedGemma serves in bfloat16")
    if not 0 <= settings.max_images_per_prompt <= 64:
        raise ProfileError("max_images_per_prompt must be between 0 and 64")
    min_len = settings.max_images_per_prompt * IMAGE_PROMPT_TOKENS + 256
    if settings.max_model_len > MAX_CONTEXT:
        raise ProfileError(
            f"max_model_len {settings.max_model_len} exceeds MedGemma's context of {MAX_CONTEXT} tokens"
        )
    if settings.max_model_len < min_len:
        raise ProfileError(
            f"max_model_len {settings.max_model_len} is too small for "
            f"{settings.max_images_per_prompt} images of {IMAGE_PROMPT_TOKENS} tokens each plus "
            f"text; use at least {min_len}"
        )
    batched = settings.max_num_batched_tokens or profile.max_num_batched_tokens
    if batched < IMAGE_PROMPT_TOKENS:
        raise ProfileError(
            f"max_num_batched_tokens {batched} is smaller than one image ({IMAGE_PROMPT_TOKENS} "
            "tokens); vLLM does not split Gemma 3's image input across steps"
        )
    if settings.max_num_seqs is not None and settings.max_num_seqs < 1:
        raise ProfileError("max_num_seqs must be at least 1")
    return profile


def engine_args(settings: EngineSettings) -> list[str]:
    """The vLLM CLI arguments for ``settings`` (our choices first, extra arguments last)."""
    profile = validate(settings)
    max_num_seqs = settings.max_num_seqs or sized_max_num_seqs(profile, settings.gpu_memory_gib)
    batched = settings.max_num_batched_tokens or profile.max_num_batched_tokens
    args = [
        "--model", settings.model,
        "--served-model-name", settings.served_model_name,
        "--dtype", "bfloat16",
        "--max-model-len", str(settings.max_model_len),
        "--limit-mm-per-prompt",
        json.dumps({"image": settings.max_images_per_prompt, "video": 0, "audio": 0}),
        "--enable-prefix-caching",
        "--mm-processor-cache-gb", _number(profile.mm_processor_cache_gb),
        "--max-num-seqs", str(max_num_seqs),
        "--max-num-batched-tokens", str(batched),
        "--generation-config", "auto",
        # Admission passes each request's class as vLLM's priority (serving.admission.priority):
        # under KV-cache pressure the engine preempts batch before interactive before stat.
        "--scheduling-policy", "priority",
    ]  # fmt: skip
    if profile.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", _number(profile.gpu_memory_utilization)]
    if profile.kv_cache_memory_bytes is not None:
        args += ["--kv-cache-memory-bytes", str(profile.kv_cache_memory_bytes)]
    if profile.attention_backend is not None:
        args += ["--attention-backend", profile.attention_backend]
    if profile.enforce_eager:
        args.append("--enforce-eager")
    if settings.host is not None:
        args += ["--host", settings.host]
    if settings.port is not None:
        args += ["--port", str(settings.port)]
    # Defence in depth: the request guard already refuses other hosts. vLLM reads an empty
    # list as "any host", so with remote images off it gets one that can never match.
    args += ["--allowed-media-domains", *(settings.remote_image_hosts or (NO_MEDIA_DOMAIN,))]
    if settings.otlp_traces_endpoint:
        args += ["--otlp-traces-endpoint", settings.otlp_traces_endpoint]
    return args + list(settings.extra_args)


def media_env(timeout_s: int, max_mib: int) -> dict[str, str]:
    """vLLM's environment for fetching image URLs: no redirects, bounded time and size.

    One attempt only: vLLM retries a timed-out fetch with a doubled timeout, which would
    make the limit several times what was asked for."""
    return {
        "VLLM_MEDIA_URL_ALLOW_REDIRECTS": "0",
        "VLLM_MEDIA_FETCH_MAX_RETRIES": "1",
        "VLLM_IMAGE_FETCH_TIMEOUT": str(timeout_s),
        "VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB": str(max_mib),
    }


def image_env(preprocessing: str) -> dict[str, str]:
    """The environment every vLLM process reads its image preprocessing from
    (``serving.compat``): the mode, and for ``fast`` the media connector that decodes JPEGs
    at reduced scale (``serving.images.decode``)."""
    from serving.compat import PREPROCESSING_ENV
    from serving.images.decode import CONNECTOR_NAME

    return {PREPROCESSING_ENV: preprocessing, "VLLM_MEDIA_CONNECTOR": CONNECTOR_NAME if preprocessing == "fast" else "http"}


def passthrough_value(extra_args: tuple[str, ...], flag: str) -> str | None:
    """The last value given for ``flag`` in an argument list (``--f v`` or ``--f=v``): the
    one vLLM uses, since pass-through arguments come last."""
    value = None
    for i, arg in enumerate(extra_args):
        if arg == flag and i + 1 < len(extra_args):
            value = extra_args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def profile_table() -> list[dict[str, object]]:
    """One row per profile with the sized values, for the README and ``engine-args``."""
    rows = []
    for profile in PROFILES.values():
        budget = kv_budget_bytes(profile)
        on_gpu = profile.device == "cuda"
        rows.append(
            {
                "profile": profile.name,
                "target": profile.description,
                "max_num_seqs": sized_max_num_seqs(profile),
                "max_num_batched_tokens": profile.max_num_batched_tokens,
                "kv_cache_gib": round(budget / GIB, 1),
                # MedGemma-4b-it sequences at 32K context that fit at once (GPU profiles)
                "full_context_seqs": (
                    math.floor(budget / kv_bytes_per_sequence(32768)) if on_gpu else None
                ),
                "attention_backend": profile.attention_backend or "CPU_ATTN",
                "api_processes": (
                    f"min({profile.api_processes_max}, cores - {ENGINE_PROCESS_CORES})"
                    if profile.api_processes_max > 1 else "1"
                ),
                "renderer_workers": 1,  # vLLM's default: more do not parallelise image preprocessing
            }
        )
    return rows
