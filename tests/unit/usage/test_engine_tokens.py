"""The engine's token counts reach the right request's tally: on finish, on abort (by external
or internal id, a parallel-sampling parent's children too), and when the engine died."""

import asyncio
from types import SimpleNamespace

from serving.usage.engine_tokens import TokenTally, count_engine_tokens, token_tally


class Detokenizer:
    def __init__(self, tokens):
        self.tokens = tokens

    def num_output_tokens(self):
        return self.tokens


class FakeOutputProcessor:
    """vLLM 0.32's OutputProcessor, as far as the hooks see it."""

    def __init__(self):
        self.request_states, self.external_req_ids, self.parent_requests = {}, {}, {}

    def add(self, internal, external, prompt, generated, index=0, parent=None):
        self.request_states[internal] = SimpleNamespace(request_id=internal, external_req_id=external,
                                                        prompt_len=prompt, request_index=index,
                                                        detokenizer=Detokenizer(generated))  # fmt: skip
        self.external_req_ids.setdefault(external, []).append(internal)
        if parent:
            self.parent_requests.setdefault(parent, []).append(internal)

    def _finish_request(self, state):
        self.request_states.pop(state.request_id)
        self.external_req_ids[state.external_req_id].remove(state.request_id)

    def abort_requests(self, request_ids, internal=False):
        aborted = []
        for rid in request_ids:
            if internal and rid in self.parent_requests:
                aborted += self.abort_requests(self.parent_requests.pop(rid), internal=True)
                continue
            for iid in [rid] if internal else self.external_req_ids.pop(rid, []):
                if self.request_states.pop(iid, None) is not None:
                    aborted.append(iid)
        return aborted


def engine():
    processor = FakeOutputProcessor()

    async def generate(prompt, sampling_params, request_id, **kwargs):
        yield request_id

    client = SimpleNamespace(output_processor=processor, generate=generate)
    return client, processor, count_engine_tokens(client)


async def start(client, request_id, tally):
    """What vLLM's handler does inside the request's context: call generate."""
    token_tally.set(tally)
    return [item async for item in client.generate("p", None, request_id)]


def test_finished_and_aborted_engine_requests_add_to_their_own_tally():
    client, processor, _ = engine()
    a, b = TokenTally(), TokenTally()
    asyncio.run(start(client, "chatcmpl-a", a))
    asyncio.run(start(client, "cmpl-b-0", b))
    asyncio.run(start(client, "cmpl-b-1", b))
    processor.add("i1", "chatcmpl-a", prompt=12, generated=5)
    processor.add("i2", "cmpl-b-0", prompt=3, generated=4)
    processor.add("i3", "cmpl-b-1", prompt=2, generated=1)
    processor.add("i4", "someone-else", prompt=99, generated=99)  # no tally: not ours
    processor._finish_request(processor.request_states["i1"])
    processor.abort_requests(["cmpl-b-0"])  # by external id
    processor.abort_requests(["i3"], internal=True)
    processor.abort_requests(["someone-else"])
    assert (a.prompt, a.completion) == (12, 5)
    assert (b.prompt, b.completion) == (5, 5)  # a batched completion: the sum of its prompts


def test_parallel_sampling_counts_the_prompt_once_and_every_childs_tokens():
    client, processor, _ = engine()
    tally = TokenTally()
    asyncio.run(start(client, "chatcmpl-n", tally))
    processor.add("c0", "chatcmpl-n", prompt=10, generated=6, index=0, parent="p")
    processor.add("c1", "chatcmpl-n", prompt=10, generated=4, index=1, parent="p")
    processor.abort_requests(["p"], internal=True)  # the parent's abort reaches its children
    assert (tally.prompt, tally.completion) == (10, 10)


def test_a_request_whose_engine_died_is_settled_from_what_the_api_process_saw():
    client, processor, hooks = engine()
    tally, untouched = TokenTally(), TokenTally()
    asyncio.run(start(client, "chatcmpl-dead", tally))
    processor.add("i1", "chatcmpl-dead", prompt=7, generated=3)
    assert tally.prompt is None  # neither finished nor aborted: a dead engine
    hooks.settle(tally)
    hooks.settle(untouched)
    assert (tally.prompt, tally.completion) == (7, 3) and untouched.prompt is None
    hooks.settle(tally)  # once only
    assert (tally.prompt, tally.completion) == (7, 3)


def test_outside_a_request_generate_is_untouched_and_an_unknown_vllm_is_left_alone(caplog):
    client, _, hooks = engine()
    asyncio.run(start(client, "warmup", None))
    assert "warmup" not in hooks.tallies
    assert count_engine_tokens(SimpleNamespace(generate=None)) is None
    assert "no token counts" in caplog.text
