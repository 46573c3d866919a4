"""The request generator: chat requests with 0..N images, prompt and output lengths from
distributions, spread over several API keys, optionally in a priority class.

Guarantees: the same seed gives the same sequence of requests (so an A/B run sends the
same workload to both endpoints); a request records which key *label* it used, never the
key; prompts are clinical-sounding text, sized in approximate tokens (exact counts come
from the server's ``usage``). A priority class goes out as this project's ``x-priority``
header, or as vLLM's own body field ``priority`` (stat -1, interactive 0, batch 1) for a
plain vLLM server run with ``--scheduling-policy priority``.
"""

from __future__ import annotations

import base64
import json
import os
import random
from dataclasses import dataclass, field

from loadtests.distributions import Distribution, parse
from loadtests.images import ImageSource

WORDS_PER_TOKEN = 0.75  # English clinical prose: about 4 tokens per 3 words
VOCABULARY = (
    "patient presents with mild moderate severe acute chronic pain fever cough dyspnea chest "
    "abdominal bilateral left right upper lower lobe opacity consolidation effusion nodule "
    "lesion margin border pigment asymmetric symmetric diameter history of hypertension "
    "diabetes smoking allergy medication dose daily review findings impression compare prior "
    "study recommend follow up imaging biopsy differential diagnosis include infection "
    "inflammation neoplasm benign malignant stable interval change noted within normal limits"
).split()
PRIORITY_CLASSES = ("stat", "interactive", "batch")
PRIORITY_FIELDS = ("header", "body")
VLLM_PRIORITY = {"stat": -1, "interactive": 0, "batch": 1}  # vLLM's field: lower runs first
QUESTIONS = (
    "Describe the findings in this image.",
    "What is the most likely diagnosis?",
    "List the differential diagnosis and the next steps.",
    "Write a short radiology-style impression.",
    "Is there anything urgent in this image?",
)


@dataclass(frozen=True)
class ApiKey:
    label: str  # what reports show
    key: str | None  # what is sent; None: no Authorization header
    weight: float = 1.0


def parse_key(text: str) -> ApiKey:
    """``LABEL=KEY`` or ``LABEL=KEY@WEIGHT`` (a bare ``KEY`` gets its position as label).
    ``KEY`` written ``$NAME`` is read from the environment variable ``NAME``, so a scenario
    file can name its accounts without holding their keys."""
    label, sep, rest = text.partition("=")
    if not sep:
        label, rest = "", text
    key, sep, weight = rest.rpartition("@")
    if not sep:
        key, weight = rest, "1"
    if key.startswith("$"):
        if key[1:] not in os.environ:
            raise ValueError(f"key {label or key!r}: the environment variable {key[1:]} is not set")
        key = os.environ[key[1:]]
    return ApiKey(label, key or None, float(weight))


@dataclass
class WorkloadSpec:
    model: str = "medgemma-4b-it"
    prompt_tokens: Distribution = field(default_factory=lambda: parse("lognormal:64,0.5,8,1024"))
    output_tokens: Distribution = field(default_factory=lambda: parse("const:64"))
    images: Distribution = field(default_factory=lambda: parse("const:1"))
    image_size: Distribution = field(default_factory=lambda: parse("choice:512=0.3,896=0.5,1024=0.2"))
    image_mode: str = "unique"
    image_pool: int = 8
    image_formats: tuple[str, ...] = ("jpeg",)
    fixed_output: bool = True  # vLLM's min_tokens = max_tokens: output lengths follow the spec
    system_prompt: str | None = None
    keys: list[ApiKey] = field(default_factory=lambda: [ApiKey("default", None)])
    priority: str | None = None  # a class from PRIORITY_CLASSES; None: the key's default
    priority_field: str = "header"  # or "body": vLLM's own integer field

    def __post_init__(self):
        if self.priority is not None and self.priority not in PRIORITY_CLASSES:
            raise ValueError(f"priority must be one of {', '.join(PRIORITY_CLASSES)}")
        if self.priority_field not in PRIORITY_FIELDS:
            raise ValueError(f"priority_field must be one of {', '.join(PRIORITY_FIELDS)}")


@dataclass(frozen=True)
class PreparedRequest:
    index: int
    body: bytes
    headers: dict[str, str]
    key_label: str
    images: int
    image_bytes: int
    max_tokens: int
    approx_prompt_tokens: int
    priority: str | None = None  # the class asked for


class Workload:
    def __init__(self, spec: WorkloadSpec, seed: int = 0):
        self.spec = spec
        self.seed = seed
        self.rng = random.Random(seed)
        self._index = 0
        self.image_source = (
            ImageSource(
                mode=spec.image_mode, pool_size=spec.image_pool, size=spec.image_size,
                formats=spec.image_formats, seed=seed,
            )
            if spec.images.maximum() > 0 else None
        )  # fmt: skip
        for i, key in enumerate(spec.keys):
            if not key.label:
                spec.keys[i] = ApiKey(f"key{i + 1}", key.key, key.weight)

    def next(self) -> PreparedRequest:
        spec, rng = self.spec, self.rng
        key = rng.choices(spec.keys, [k.weight for k in spec.keys])[0]
        images = spec.images.sample(rng)
        tokens = max(1, spec.prompt_tokens.sample(rng))
        max_tokens = max(1, spec.output_tokens.sample(rng))
        question = rng.choice(QUESTIONS)
        words = max(0, round(tokens * WORDS_PER_TOKEN) - len(question.split()))
        text = " ".join(rng.choice(VOCABULARY) for _ in range(words))
        content: list[dict] = []
        image_bytes = 0
        for _ in range(images):
            image = self.image_source.next()
            image_bytes += len(image.data)
            url = f"data:{image.mime};base64,{base64.b64encode(image.data).decode()}"
            content.append({"type": "image_url", "image_url": {"url": url}})
        content.append({"type": "text", "text": f"{text}. {question}" if text else question})
        messages = [{"role": "user", "content": content}]
        if spec.system_prompt:
            messages.insert(0, {"role": "system", "content": spec.system_prompt})
        body = {
            "model": spec.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if spec.fixed_output:
            body["min_tokens"] = max_tokens
        headers = {"content-type": "application/json"}
        if key.key:
            headers["authorization"] = f"Bearer {key.key}"
        if spec.priority and spec.priority_field == "body":
            body["priority"] = VLLM_PRIORITY[spec.priority]
        elif spec.priority:
            headers["x-priority"] = spec.priority
        self._index += 1
        return PreparedRequest(
            self._index - 1, json.dumps(body).encode(), headers, key.label, images, image_bytes,
            max_tokens, tokens, spec.priority,
        )  # fmt: skip
