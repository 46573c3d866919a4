"""The prompt estimate: engine requests per body, a lower bound on tokens, bounded work."""

import asyncio
import time

from serving.admission.estimate import PromptEstimator, _chunks, tokenizer_counter


def words(text: str) -> int:
    return len(text.split())


def estimate(path, body, max_model_len=100_000, counter=words, chunk_chars=8192):
    estimator = PromptEstimator(counter, image_tokens=256, max_model_len=max_model_len, chunk_chars=chunk_chars)
    return asyncio.run(estimator.shape(path, body))


def test_chat_counts_text_images_and_message_overhead():
    chat = estimate("/v1/chat/completions", {
        "model": "m", "max_completion_tokens": 7, "n": 2,
        "messages": [{"role": "system", "content": "a b"}, {"role": "user", "content": [
            {"type": "text", "text": "c d e"}, {"type": "image_url", "image_url": {"url": "u"}},
            {"image_url": "u"}]}],  # a part without a type is an image to vLLM too
    })  # fmt: skip
    assert chat.prompt_tokens == 2 + 3 + 2 * 256 + 2 * 3 and chat.max_tokens == 7
    assert (chat.prompts, chat.sequences, chat.engine_requests) == (1, 2, 2)


def test_every_prompt_of_a_batched_completion_is_an_engine_request():
    one = estimate("/v1/completions", {"prompt": [1, 2, 3, 4], "max_tokens": "x"})
    assert (one.prompts, one.prompt_tokens, one.max_tokens) == (1, 4, None)
    strings = estimate("/v1/completions", {"prompt": ["a b", "c d e", "f"], "n": 2, "max_tokens": 5})
    assert (strings.prompts, strings.engine_requests, strings.prompt_tokens, strings.total_prompt_tokens) == (3, 6, 3, 6)
    ids = estimate("/v1/completions", {"prompt": [[1, 2], [3], [4, 5, 6]]})
    assert (ids.prompts, ids.prompt_tokens, ids.max_tokens) == (3, 3, 16)  # vLLM's default max_tokens
    embeds = estimate("/v1/completions", {"prompt_embeds": ["AAAA", "BBBB"]})
    assert embeds.prompts == 2
    assert estimate("/v1/completions", {"prompt": "a b c"}).prompts == 1


def test_long_text_is_counted_in_chunks_and_counting_stops_past_the_context():
    counted = []

    def counter(text):
        counted.append(len(text))
        return len(text)  # one token per character

    shape = estimate("/v1/completions", {"prompt": "a" * 10_000_000}, max_model_len=32768, counter=counter)
    assert shape.prompt_tokens > 32768  # refused later as context_length_exceeded
    assert max(counted) <= 8192 and sum(counted) < 32768 + 2 * 8192  # not the 10 M characters


def test_a_chunked_count_is_a_lower_bound_of_the_whole():
    text = " ".join(["bilateral", "opacity", "chest", "x-ray"] * 20_000)
    whole = words(text)
    chunked = estimate("/v1/completions", {"prompt": text}, counter=words, chunk_chars=1000).prompt_tokens
    assert whole - len(text) // 500 <= chunked <= whole
    pieces = list(_chunks(text, 1000))
    assert "".join(pieces) == text and all(len(p) <= 1000 for p in pieces)


def test_counting_a_huge_body_yields_to_the_event_loop():
    async def scenario():
        estimator = PromptEstimator(len, image_tokens=256, max_model_len=10**9, chunk_chars=8192)
        gaps, last, done = [], time.perf_counter(), asyncio.Event()

        async def ticker():
            nonlocal last
            while not done.is_set():
                await asyncio.sleep(0)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        task = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        shape = await estimator.shape("/v1/completions", {"prompt": "a " * 2_000_000})
        done.set()
        await task
        return shape, gaps

    shape, gaps = asyncio.run(scenario())
    assert shape.prompt_tokens > 3_900_000
    assert len(gaps) > 400  # the loop ran between chunks, not once after the whole body


def test_token_counter_matches_the_tokenizer_with_its_own_copy():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(["chest x-ray shows bilateral opacity"] * 20,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"]))  # fmt: skip
    fast = PreTrainedTokenizerFast(tokenizer_object=raw)
    fast._tokenizer.enable_truncation(max_length=2)  # state on vLLM's object must not leak in
    count = tokenizer_counter(fast)
    texts = ["chest x-ray shows bilateral opacity", "opacity opacity"]
    fast._tokenizer.no_truncation()
    expected = sum(len(fast(t, add_special_tokens=False)["input_ids"]) for t in texts)
    fast._tokenizer.enable_truncation(max_length=2)
    assert sum(count(t) for t in texts) == expected > 4
