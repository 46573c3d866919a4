"""What a request body asks of the engine, estimated before admission: how many engine
requests it creates, and a lower bound on each one's prompt tokens.

Guarantees:
- ``prompts`` is every engine request vLLM makes of the body: one per chat request, one
  per prompt of a batched ``/v1/completions`` (a list of strings, a list of token lists,
  or a list of ``prompt_embeds``); each runs ``n`` sequences. Admission charges all of them.
- Prompt tokens are a lower bound (text tokens + 256 per image + 3 per chat message): a
  request is never refused for a context it would fit.
- Bounded work that never holds the event loop: text is counted in chunks of at most
  ``chunk_chars`` characters with a yield between chunks, and counting stops as soon as
  the prompt is known to exceed the context (the request is refused then anyway), so a
  19 MiB body costs what a full context costs, in slices of a few milliseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from serving.admission.guard import count_images
from serving.admission.priority import PriorityClass

MESSAGE_OVERHEAD_TOKENS = 3  # <start_of_turn>role\n ... <end_of_turn>: a lower bound
CHUNK_CHARS = 8192  # ~2 ms of tokenizer time on this machine
TEXT_TYPES = ("text", "input_text", "output_text")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's CompletionRequest default when the field is absent


@dataclass
class RequestShape:
    """What admission needs to know of a request (from the body)."""

    model: str | None
    prompt_tokens: int  # the largest prompt's estimate: text tokens + image tokens
    max_tokens: int | None
    sequences: int = 1  # n: completions generated at once per prompt, each holding the model's cost
    prompts: int = 1  # engine requests the body creates (a batched /v1/completions has several)
    total_prompt_tokens: int | None = None  # all prompts together (default: prompt_tokens)
    priority: PriorityClass = PriorityClass.INTERACTIVE  # its class (serving.admission.priority)

    @property
    def engine_requests(self) -> int:
        return self.prompts * self.sequences


class PromptEstimator:
    def __init__(
        self,
        count_text_tokens: Callable[[str], int],
        image_tokens: int,
        max_model_len: int,
        chunk_chars: int = CHUNK_CHARS,
    ):
        self.count_text_tokens = count_text_tokens
        self.image_tokens = image_tokens
        self.max_model_len = max_model_len
        self.chunk_chars = chunk_chars

    async def shape(self, path: str, body: dict) -> RequestShape:
        model = body.get("model") if isinstance(body.get("model"), str) else None
        n = body.get("n")
        sequences = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1
        if path == "/v1/chat/completions":
            max_tokens = _count(body.get("max_completion_tokens", body.get("max_tokens")))
            messages = body.get("messages")
            messages = messages if isinstance(messages, list) else []
            texts = list(_chat_texts(messages))
            overhead = MESSAGE_OVERHEAD_TOKENS * len(messages) + count_images(body) * self.image_tokens
            tokens = overhead + await self._count_texts(texts, self.max_model_len - overhead)
            return RequestShape(model, tokens, max_tokens, sequences)
        max_tokens = _count(body.get("max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS))
        prompts = []
        for prompt in _completion_prompts(body):
            if isinstance(prompt, str):
                prompts.append(await self._count_texts([prompt], self.max_model_len))
            elif isinstance(prompt, list):
                prompts.append(len(prompt))  # token ids
            else:
                prompts.append(0)  # prompt_embeds: their length is only known once decoded
        prompts = prompts or [0]
        return RequestShape(model, max(prompts), max_tokens, sequences, len(prompts), sum(prompts))

    async def _count_texts(self, texts: list[str], limit: int) -> int:
        """Tokens of ``texts`` (a lower bound), or a number above ``limit`` once it passes it."""
        total = 0
        for text in texts:
            if len(text) <= self.chunk_chars:
                total += self.count_text_tokens(text)
            else:
                chunks = 0
                for chunk in _chunks(text, self.chunk_chars):
                    total += self.count_text_tokens(chunk)
                    chunks += 1
                    if total - chunks > limit:
                        break
                    await asyncio.sleep(0)
                # A cut can split what would be one token: one fewer per cut keeps a lower bound.
                total -= chunks - 1
            if total > limit:
                return total
        return total


def _count(value) -> int | None:
    """A token count as vLLM would read it, or None (vLLM validates and refuses bad values)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return None
    return value


def _chat_texts(messages: list) -> Iterator[str]:
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, str):
                    yield part
                elif isinstance(part, dict) and part.get("type") in TEXT_TYPES and isinstance(part.get("text"), str):
                    yield part["text"]


def _completion_prompts(body: dict) -> list:
    """One entry per engine request: a string, a list of token ids, or an embeds payload."""
    prompts: list = []
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts.append(prompt)
    elif isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):
            prompts.append(prompt)  # one prompt of token ids
        else:
            prompts.extend(p if isinstance(p, str | list) else "" for p in prompt)
    embeds = body.get("prompt_embeds")
    if isinstance(embeds, list):
        prompts.extend(None for _ in embeds)
    elif embeds is not None:
        prompts.append(None)
    return prompts


def _chunks(text: str, size: int) -> Iterator[str]:
    """``text`` in pieces of at most ``size`` characters, cut before a space where one is
    near (a word-initial space belongs to the next token in SentencePiece vocabularies)."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            space = text.rfind(" ", start + size // 2, end)
            if space > start:
                end = space
        yield text[start:end]
        start = end


def tokenizer_counter(tokenizer) -> Callable[[str], int]:
    """A fast text-token counter over a Hugging Face tokenizer (Rust backend when present).

    It counts with its own copy of the Rust tokenizer, so admission never shares a
    tokenizer object (its locks, its padding/truncation state) with vLLM's renderer."""
    backend = getattr(tokenizer, "_tokenizer", None) or getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode") and hasattr(backend, "to_str"):
        from tokenizers import Tokenizer

        own = Tokenizer.from_str(backend.to_str())
        own.no_truncation()
        own.no_padding()
        return lambda text: len(own.encode(text, add_special_tokens=False).ids)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
