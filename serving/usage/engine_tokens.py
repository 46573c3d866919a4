"""Each request's prompt and completion tokens, as the engine itself counted them.

A usage record needs the engine's counts for every request, including streams that did not
ask for ``usage`` and requests that ended early (client gone, drain, stall). The response
body is no source: it is never parsed here (it holds patient data), and most bodies carry
no usage. So the counts are read where vLLM keeps them, once per engine request, as the
request leaves vLLM 0.32's output processor:

- ``count_engine_tokens(engine_client)`` wraps ``engine_client.generate`` to tie each engine
  request (by its external id) to the ``TokenTally`` of the HTTP request being served (the
  ``token_tally`` context variable, which the admission middleware sets before it hands a
  request to vLLM), and the output processor's two exits, ``_finish_request`` (it finished)
  and ``abort_requests`` (it was aborted), to add that request's ``prompt_len`` and its
  generated tokens to the tally.

Guarantees:
- Per HTTP request the tally holds the sum over its engine requests (a batched completion
  has one per prompt): prompt tokens once per engine request (a parallel-sampling parent's
  children share one prompt: only the first child counts it, as vLLM's usage does), and
  every token generated, also those of a request aborted midway.
- Cost: nothing per generated token; one weak-dictionary entry per engine request, one
  lookup when it leaves. Work outside a request (no tally) costs one context-variable read.
- A request whose engine died or hung under it still gets the counts vLLM's API process
  saw (``settle``, when its record is written).
- A vLLM whose engine client lacks these attributes is left alone with a warning; records
  then carry null token counts.
"""

from __future__ import annotations

import contextvars
import logging
import weakref

logger = logging.getLogger(__name__)


class TokenTally:
    """One HTTP request's token counts; None until the engine has seen it."""

    __slots__ = ("prompt", "completion", "__weakref__")

    def __init__(self) -> None:
        self.prompt: int | None = None
        self.completion: int | None = None

    def add(self, prompt: int, completion: int) -> None:
        self.prompt = (self.prompt or 0) + prompt
        self.completion = (self.completion or 0) + completion


token_tally: contextvars.ContextVar[TokenTally | None] = contextvars.ContextVar("token_tally", default=None)


def _generated(state) -> int:
    detokenizer = getattr(state, "detokenizer", None)
    if detokenizer is not None:
        return detokenizer.num_output_tokens()
    stats = getattr(state, "stats", None)
    return getattr(stats, "num_generation_tokens", 0) if stats is not None else 0


class EngineTokens:
    """The hooks on one engine client; ``tallies`` maps live external ids to their tally."""

    def __init__(self, output_processor):
        self.tallies: weakref.WeakValueDictionary[str, TokenTally] = weakref.WeakValueDictionary()
        self.output_processor = output_processor

    def left(self, state) -> None:
        """An engine request left the output processor: add its counts to its tally."""
        tally = self.tallies.get(state.external_req_id)
        if tally is not None:
            prompt = state.prompt_len if getattr(state, "request_index", 0) == 0 else 0
            tally.add(prompt or 0, _generated(state))

    def settle(self, tally: TokenTally) -> None:
        """Count what the engine requests of ``tally`` that never left hold so far: the
        engine died or hung (it neither finished nor aborted them). Called once, when the
        request's record is written; a walk of the live ids, so only on that rare path."""
        processor = self.output_processor
        for external_id, owner in list(self.tallies.items()):
            if owner is tally:
                for internal_id in processor.external_req_ids.get(external_id, ()):
                    state = processor.request_states.get(internal_id)
                    if state is not None:
                        self.left(state)
                        self.tallies.pop(external_id, None)

    def states_of(self, request_ids, internal: bool) -> list:
        """The request states ``abort_requests(request_ids, internal)`` is about to drop."""
        processor = self.output_processor
        states = processor.request_states
        found = []
        for request_id in request_ids:
            ids = (request_id,) if internal else processor.external_req_ids.get(request_id, ())
            for internal_id in ids:
                state = states.get(internal_id)
                if state is not None:
                    found.append(state)
        return found


def count_engine_tokens(engine_client) -> EngineTokens | None:
    """Install the hooks (see the module docstring); None when this vLLM is not the shape we know."""
    processor = getattr(engine_client, "output_processor", None)
    names = ("_finish_request", "abort_requests", "request_states", "external_req_ids")
    if processor is None or not all(hasattr(processor, name) for name in names):
        logger.warning("usage records carry no token counts: this vLLM's output processor has no %s",
                       "/".join(names))  # fmt: skip
        return None
    hooks = EngineTokens(processor)
    generate, finish, abort = engine_client.generate, processor._finish_request, processor.abort_requests

    def generate_counted(prompt, sampling_params, request_id, *args, **kwargs):
        tally = token_tally.get()
        if tally is not None:
            hooks.tallies[request_id] = tally
        return generate(prompt, sampling_params, request_id, *args, **kwargs)

    def finish_counted(state) -> None:
        finish(state)
        hooks.left(state)

    def abort_counted(request_ids, internal: bool = False):
        request_ids = list(request_ids)
        states = hooks.states_of(request_ids, internal) if hooks.tallies else []
        aborted = abort(request_ids, internal)
        live = processor.request_states
        for state in states:
            if state.request_id not in live:  # it did leave
                hooks.left(state)
        return aborted

    engine_client.generate = generate_counted
    processor._finish_request = finish_counted
    processor.abort_requests = abort_counted
    return hooks
