"""Load-test settings: defaults -> scenario YAML (``--scenario``) -> environment
(``MEDGEMMA_LOADTEST_``) -> command-line flags.

Guarantees: every field's description is its ``--help`` text; everything is validated
(distribution specs, load shape, SLOs, streams) before a single request is sent;
``stages()``, ``workload_spec()`` and ``stream_specs()`` turn the settings into the runner's
typed objects. ``streams`` (several kinds of traffic at once: a batch flood beside a STAT
trickle) come from a scenario file or ``MEDGEMMA_LOADTEST_STREAMS`` (JSON), not flags.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from loadtests.capacity import Slo
from loadtests.distributions import SpecError, parse
from loadtests.images import FORMATS
from loadtests.profiles import Stage, Stream, parse_values, sweep
from loadtests.workload import PRIORITY_CLASSES, PRIORITY_FIELDS, ApiKey, Workload, WorkloadSpec, parse_key
from serving.layers import load_layered

ENV_PREFIX = "MEDGEMMA_LOADTEST_"
DEFAULT_DURATION_S = 60.0


def _check_distribution(value):
    """A distribution spec (a YAML number, ``images: 1``, is the constant it names)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = f"{value:g}"
    if value is not None:
        try:
            parse(value)
        except SpecError as exc:
            raise ValueError(str(exc)) from None
    return value


def _check_priority(value: str | None) -> str | None:
    if value is not None and value not in PRIORITY_CLASSES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITY_CLASSES)}")
    return value


class StreamSettings(BaseModel):
    """One stream of a mixed-traffic run: its own account, class, load shape and sizes (each
    size unset: the run's). The run's duration, warm-up and cool-down bound every stream."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    key: str | None = Field(None, description="LABEL=KEY ($NAME reads the key from the environment).")
    priority: str | None = None
    concurrency: int | None = Field(None, ge=1)
    rate: float | None = Field(None, gt=0)
    arrival: str = "poisson"
    burstiness: float = Field(1.0, gt=0)
    max_concurrency: int | None = Field(None, ge=1)
    requests: int | None = Field(None, ge=1)
    images: str | None = None
    image_size: str | None = None
    prompt_tokens: str | None = None
    output_tokens: str | None = None

    @field_validator("images", "image_size", "prompt_tokens", "output_tokens", mode="before")
    @classmethod
    def _distribution(cls, value):
        return _check_distribution(value)

    @field_validator("priority")
    @classmethod
    def _priority(cls, value: str | None) -> str | None:
        return _check_priority(value)

    @field_validator("key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        if value is not None:
            parse_key(value)
        return value

    @model_validator(mode="after")
    def _one_shape(self):
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError(f"stream {self.name!r}: give exactly one of concurrency, rate")
        return self

    def shape(self, duration_s: float | None, warmup_s: float, cooldown_s: float) -> Stage:
        common: dict[str, Any] = dict(duration_s=duration_s, requests=self.requests, warmup_s=warmup_s,
                                      cooldown_s=cooldown_s)  # fmt: skip
        if self.concurrency is not None:
            return Stage("concurrency", concurrency=self.concurrency, **common)
        return Stage("rate", rate=self.rate, arrival=self.arrival, burstiness=self.burstiness,
                     max_concurrency=self.max_concurrency, **common)  # fmt: skip


class LoadTestSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    url: str = Field("http://127.0.0.1:8000", description="Base URL of the endpoint (without /v1).")
    model: str = Field("medgemma-4b-it", description="Model name sent in each request.")
    concurrency: int | None = Field(None, ge=1, description="Closed loop: this many clients, each sending its next request when the last ends.")
    rate: float | None = Field(None, gt=0, description="Open loop: requests per second (arrivals do not wait for responses).")
    ramp_to: float | None = Field(None, gt=0, description="With --rate: ramp the rate linearly to this value over the duration.")
    sweep_concurrency: str | None = Field(None, description="A sweep over concurrencies, e.g. 1,4,8,16 (one stage of --duration each).")
    sweep_rate: str | None = Field(None, description="A sweep over request rates, e.g. 0.5,1,2,4.")
    arrival: str = Field("poisson", description="Open-loop arrivals: poisson or gamma.")
    burstiness: float = Field(1.0, gt=0, description="Gamma shape for --arrival gamma: 1 = Poisson, <1 burstier, >1 more regular.")
    max_concurrency: int | None = Field(None, ge=1, description="Open loop: cap on requests in flight (arrivals wait beyond it).")
    duration: float | None = Field(None, gt=0, description=f"Seconds per stage (default {DEFAULT_DURATION_S:g} unless --requests is given).")
    requests: int | None = Field(None, ge=1, description="Requests per stage (with or instead of --duration).")
    warmup: float = Field(0.0, ge=0, description="Seconds at the start of each stage excluded from the figures.")
    cooldown: float = Field(0.0, ge=0, description="Seconds at the end of each stage excluded from the figures.")
    images: str = Field("1", description="Images per request: a number or a distribution, e.g. choice:0=0.3,1=0.6,2=0.1.")
    image_size: str = Field("choice:512=0.3,896=0.5,1024=0.2", description="Image width in pixels (distribution).")
    image_mode: str = Field("unique", description="unique: every image differs (misses any cache); repeated: a fixed pool (hits vLLM's multimodal cache).")
    image_pool: int = Field(8, ge=1, description="Base images generated (the whole pool in repeated mode).")
    image_format: str = Field("jpeg", description="jpeg, png or jpeg,png (drawn per image).")
    prompt_tokens: str = Field("lognormal:64,0.5,8,1024", description="Approximate text tokens per prompt (distribution).")
    output_tokens: str = Field("64", description="max_tokens per request (distribution).")
    fixed_output: bool = Field(True, description="Also send min_tokens = max_tokens (vLLM), so output lengths follow --output-tokens.")
    system_prompt: str | None = Field(None, description="A system message to send with each request.")
    key: list[str] = Field(default_factory=list, description="API key as LABEL=KEY or LABEL=KEY@WEIGHT; repeat for several accounts. Reports show labels only.")
    priority: str | None = Field(None, description="Priority class for every request: stat, interactive or batch (default: each key's own default).")
    priority_field: str = Field("header", description="How the class is sent: header (x-priority, this project's server) or body (vLLM's integer priority field, for vLLM run with --scheduling-policy priority).")
    streams: list[StreamSettings] = Field(default_factory=list, description="Several kinds of traffic at once (scenario file): each a name, key, priority, concurrency or rate, and sizes.")
    slo_ttft_ms: float | None = Field(2000.0, gt=0, description="Goodput SLO on TTFT (ms).")
    slo_tpot_ms: float | None = Field(200.0, gt=0, description="Goodput SLO on TPOT (ms).")
    slo_e2e_ms: float | None = Field(None, gt=0, description="Goodput SLO on end-to-end latency (ms).")
    slo_percentile: float = Field(95.0, gt=0, lt=100, description="capacity: the percentile of TTFT and TPOT the SLO limits apply to.")
    slo_min_ok: float = Field(0.99, gt=0, le=1, description="capacity: the share of requests that must be answered (errors, 429s and 503s count against it).")
    search_start: int = Field(1, ge=1, description="capacity: the first concurrency tried; the search doubles it until the SLO misses.")
    search_max: int = Field(256, ge=1, description="capacity: the highest concurrency tried.")
    search_resolution: float = Field(0.05, ge=0, lt=1, description="capacity: bisect until the bracket is this fraction of its lower end (at least 1) wide.")
    search_repeats: int = Field(2, ge=0, description="capacity: extra runs at a point whose verdict is within its confidence interval.")
    search_min_gain: float = Field(0.05, ge=-1, description="capacity: the server saturates when doubling the concurrency adds less than this share of throughput (-1: never stop for that).")
    seed: int = Field(0, description="Random seed: the same seed sends the same workload.")
    honor_retry_after: bool = Field(True, description="Closed loop: a client refused with Retry-After (429/503) waits that long before its next request.")
    timeout: float = Field(600.0, gt=0, description="Per-request timeout in seconds.")
    out: str = Field("results", description="Folder for requests.jsonl, summary.json and report.html.")
    progress: bool | None = Field(None, description="Show a progress line (default: when stderr is a terminal).")
    url_b: str | None = Field(None, description="A/B mode: the second endpoint.")
    key_b: list[str] | None = Field(None, description="A/B mode: keys for the second endpoint (default: the same keys).")
    rounds: int = Field(4, ge=1, description="A/B mode: rounds; each runs the workload against both endpoints, in alternating order.")

    @field_validator("images", "image_size", "prompt_tokens", "output_tokens", mode="before")
    @classmethod
    def _distribution(cls, value):
        return _check_distribution(value)

    @field_validator("priority")
    @classmethod
    def _priority(cls, value: str | None) -> str | None:
        return _check_priority(value)

    @field_validator("priority_field")
    @classmethod
    def _priority_field(cls, value: str) -> str:
        if value not in PRIORITY_FIELDS:
            raise ValueError(f"priority_field must be one of {', '.join(PRIORITY_FIELDS)}")
        return value

    @field_validator("image_format")
    @classmethod
    def _formats(cls, value: str) -> str:
        formats = [f.strip().lower() for f in value.split(",")]
        if not formats or any(f not in FORMATS for f in formats):
            raise ValueError(f"image formats must be from {', '.join(FORMATS)}")
        return ",".join(formats)

    @field_validator("image_mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        if value not in ("unique", "repeated"):
            raise ValueError("image_mode must be unique or repeated")
        return value

    @field_validator("key", "key_b")
    @classmethod
    def _keys(cls, value):
        for text in value or []:
            parse_key(text)
        return value

    @model_validator(mode="after")
    def _one_shape(self):
        shapes = [self.concurrency, self.rate, self.sweep_concurrency, self.sweep_rate]
        if self.streams:
            if any(x is not None for x in shapes) or self.ramp_to is not None:
                raise ValueError("streams carry their own load shapes: leave out --concurrency, --rate and sweeps")
            names = [stream.name for stream in self.streams]
            if len(set(names)) != len(names):
                raise ValueError("stream names must differ")
        elif sum(x is not None for x in shapes) != 1:
            raise ValueError("give exactly one of --concurrency, --rate, --sweep-concurrency, --sweep-rate")
        if self.ramp_to is not None and self.rate is None:
            raise ValueError("--ramp-to needs --rate")
        try:
            self.stages()
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _search(self):
        if self.search_start > self.search_max:
            raise ValueError("search_start must not exceed search_max")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings: PydanticBaseSettingsSource,
                                   env_settings, dotenv_settings, file_secret_settings):  # fmt: skip
        return (init_settings, env_settings)

    # --- typed objects for the runner -------------------------------------------------------
    def stages(self) -> list[Stage]:
        duration = self.duration
        if duration is None and self.requests is None:
            duration = DEFAULT_DURATION_S
        common: dict[str, Any] = dict(
            duration_s=duration, requests=self.requests, warmup_s=self.warmup, cooldown_s=self.cooldown
        )
        open_loop = dict(arrival=self.arrival, burstiness=self.burstiness, max_concurrency=self.max_concurrency)
        if self.arrival not in ("poisson", "gamma"):
            raise ValueError("arrival must be poisson or gamma")
        if self.streams:
            streams = tuple(
                Stream(s.name, s.shape(duration, self.warmup, self.cooldown), workload=i)
                for i, s in enumerate(self.streams)
            )
            return [Stage("streams", streams=streams, **common)]
        if self.concurrency is not None:
            return [Stage("concurrency", concurrency=self.concurrency, **common)]
        if self.rate is not None:
            kind = "ramp" if self.ramp_to is not None else "rate"
            return [Stage(kind, rate=self.rate, rate_end=self.ramp_to, **common, **open_loop)]
        if self.sweep_concurrency is not None:
            return sweep("concurrency", parse_values(self.sweep_concurrency), **common)
        return sweep("rate", parse_values(self.sweep_rate), **common, **open_loop)

    def workload_spec(self, keys: list[str] | None = None) -> WorkloadSpec:
        parsed = [parse_key(k) for k in (keys if keys is not None else self.key)]
        spec = WorkloadSpec(
            model=self.model, prompt_tokens=parse(self.prompt_tokens), output_tokens=parse(self.output_tokens),
            images=parse(self.images), image_size=parse(self.image_size), image_mode=self.image_mode,
            image_pool=self.image_pool, image_formats=tuple(self.image_format.split(",")),
            fixed_output=self.fixed_output, system_prompt=self.system_prompt,
            priority=self.priority, priority_field=self.priority_field,
        )  # fmt: skip
        if parsed:
            spec.keys = parsed
        return spec

    def stream_specs(self) -> list[WorkloadSpec]:
        """One workload per stream: the run's, with the stream's key, class and sizes."""
        specs = []
        for stream in self.streams:
            spec = self.workload_spec([stream.key] if stream.key else None)
            if stream.key and not spec.keys[0].label:
                spec.keys[0] = ApiKey(stream.name, spec.keys[0].key)
            spec.priority = stream.priority or self.priority
            for name in ("images", "image_size", "prompt_tokens", "output_tokens"):
                if getattr(stream, name) is not None:
                    setattr(spec, name, parse(getattr(stream, name)))
            specs.append(spec)
        return specs

    def stream_workloads(self, seed: int | None = None) -> list[Workload]:
        """One workload per stream, each seeded apart from the run's (``seed``, default the
        settings'), so the same seed sends the same mixed traffic."""
        seed = self.seed if seed is None else seed
        return [Workload(spec, seed=seed + 1000 * (i + 1)) for i, spec in enumerate(self.stream_specs())]

    def public_config(self) -> dict[str, Any]:
        """The settings as reports show them: key labels, never keys."""
        data = self.model_dump(exclude={"key", "key_b", "streams"})
        data["keys"] = [key.label or f"key{i + 1}" for i, key in enumerate(map(parse_key, self.key))]
        data["streams"] = [
            s.model_dump(exclude={"key"}) | {"key": parse_key(s.key).label if s.key else None} for s in self.streams
        ]
        return data

    def slo(self) -> Slo:
        """The capacity search's SLO (``slo_e2e_ms`` is a goodput figure of runs, not a limit here)."""
        to_s = lambda ms: None if ms is None else ms / 1e3  # noqa: E731
        return Slo(to_s(self.slo_ttft_ms), to_s(self.slo_tpot_ms), self.slo_percentile, self.slo_min_ok)

    def slo_s(self) -> dict[str, float]:
        slo = {"ttft": self.slo_ttft_ms, "tpot": self.slo_tpot_ms, "e2e": self.slo_e2e_ms}
        return {k: v / 1e3 for k, v in slo.items() if v is not None}


def load_settings(flags: dict[str, Any], scenario: str | os.PathLike | None = None) -> LoadTestSettings:
    return load_layered(LoadTestSettings, ENV_PREFIX, flags, scenario, what="load-test settings")
