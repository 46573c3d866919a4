"""Each account's prompts share the engine's prefix cache with that account's prompts only.

vLLM's prefix cache lets a request whose prompt starts like an earlier one's reuse that
one's KV blocks: it starts answering sooner, and its time to first token shows it. Shared
across accounts, that timing tells one client whether another sent a prompt that begins
with given text (a shared system prompt, then a patient's name and finding). vLLM's answer
is the request field ``cache_salt``: requests with different salts share no cached block.
OpenAI keeps its prompt caches per organisation for the same reason.

Guarantees:
- Every admitted request reaches vLLM with a ``cache_salt`` made from its account (a
  SHA-256 digest, 64 hex characters), in place of what the client sent: no client can
  pick another account's salt, or send none and share the unsalted cache.
- A client's own salt still works, within its account: the digest covers it, so users of
  one account that send different salts share nothing either.
- A salt from the client that vLLM would refuse (not a non-empty string, too long, a
  forbidden character) is left as it is, for vLLM to refuse with its own 400.
- Within an account (and within a client's salt) the cache works as before. What is still
  shared across accounts is keyed by content alone: an image's processed pixels and its
  encoder output, reused only by a request that sends the very same image.
"""

from __future__ import annotations

import functools
import hashlib
import json

FIELD = "cache_salt"


def account_salt(account: str, asked: object = None) -> str | None:
    """The salt vLLM gets for a request of ``account`` whose body asked for ``asked`` (None:
    no salt asked for); None when ``asked`` is one vLLM refuses (the body keeps it)."""
    if asked is not None:
        validate, refused = _vllm_validation()
        try:
            validate(asked)
        except refused:
            return None
    return hashlib.sha256(json.dumps([account, asked]).encode()).hexdigest()


@functools.cache
def _vllm_validation():
    """vLLM 0.32's own check of a request's ``cache_salt``, and the error it raises."""
    from vllm.entrypoints.generate.base.protocol import validate_cache_salt
    from vllm.exceptions import VLLMValidationError

    return validate_cache_salt, VLLMValidationError
