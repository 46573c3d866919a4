"""The OpenAI-compatible API of the real vLLM CPU server on the dev checkpoint."""

import base64
import json

import httpx
import openai
import pytest

from tests.integration.images import data_url, image, image_part
from tests.metrics_text import metric

MODEL = "medgemma-4b-it"


def chat(client, content, **kwargs):
    kwargs.setdefault("max_tokens", 8)
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **kwargs
    )


def expected_prompt_tokens(processor, messages, images):
    """Prompt length computed independently, by transformers' Gemma3Processor."""
    hf_messages = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [
                {"type": "image"} if part["type"] == "image_url" else part for part in content
            ]
        hf_messages.append({"role": message["role"], "content": content})
    text = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    encoded = processor(text=text, images=images or None, add_special_tokens=False)
    return len(encoded["input_ids"][0]), encoded["input_ids"][0]


def test_ready_flipped_from_503_to_200(server):
    assert server.ready_history[-1] == 200
    assert 503 in server.ready_history, server.ready_history
    ready = httpx.get(server.url + "/ready").json()
    assert ready == {"status": "ready", "model": MODEL}
    assert httpx.get(server.url + "/health").status_code == 200


def test_while_loading_the_port_answers(server):
    assert server.while_loading, "the engine was ready before the first probe"
    assert server.while_loading["health"].status_code == 200
    chat = server.while_loading["chat"]
    assert chat.status_code == 503
    assert chat.headers["retry-after"].isdigit()
    assert chat.json()["error"]["code"] == "model_loading"


def test_dev_checkpoint_is_announced_loudly(server):
    log = server.log()
    assert "DEV CHECKPOINT" in log and "RANDOM" in log


def test_models_lists_medgemma(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]


def test_text_chat(client):
    response = chat(client, "What are common causes of chest pain?", max_tokens=12)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 12


def test_text_completion(client):
    response = client.completions.create(model=MODEL, prompt="Findings:", max_tokens=6)
    assert response.choices[0].text.strip()
    assert response.usage.completion_tokens == 6


def test_chat_with_one_png_image_counts_its_tokens(client, processor):
    img = image(640, 480, seed=1)
    content = [image_part(data_url(img, "PNG")), {"type": "text", "text": "Describe this radiograph."}]
    messages = [{"role": "user", "content": content}]
    response = chat(client, content)
    expected, ids = expected_prompt_tokens(processor, messages, [img])
    assert response.usage.prompt_tokens == expected
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert ids.count(image_token_id) == 256  # like the real model: 256 tokens per image
    text_only = chat(client, [{"type": "text", "text": "Describe this radiograph."}])
    assert response.usage.prompt_tokens - text_only.usage.prompt_tokens >= 256
    assert response.choices[0].message.content.strip()


def test_chat_with_several_images_of_different_formats_and_sizes(client, processor):
    images = [image(896, 896, seed=2), image(300, 1200, seed=3, mode="RGB"), image(64, 48, seed=4)]
    urls = [data_url(images[0], "PNG"), data_url(images[1], "JPEG"), data_url(images[2], "JPEG")]
    content = [image_part(u) for u in urls] + [{"type": "text", "text": "Compare these images."}]
    response = chat(client, content)
    expected, ids = expected_prompt_tokens(processor, [{"role": "user", "content": content}], images)
    assert response.usage.prompt_tokens == expected
    assert ids.count(processor.tokenizer.convert_tokens_to_ids("<image_soft_token>")) == 3 * 256


def test_streaming_with_usage_carries_text_in_every_chunk(client, processor):
    img = image(512, 512, seed=5)
    content = [image_part(data_url(img)), {"type": "text", "text": "Summarise."}]
    stream = chat(client, content, max_tokens=20, stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content is not None and choice.delta.role is None:
                pieces.append(choice.delta.content)
    assert usage is not None
    assert usage.completion_tokens == 20
    expected, _ = expected_prompt_tokens(processor, [{"role": "user", "content": content}], [img])
    assert usage.prompt_tokens == expected
    text_pieces = [p for p in pieces if p]
    assert len(text_pieces) >= 15, pieces  # streamed chunk by chunk, not all at the end
    assert all(p.strip() for p in text_pieces), pieces


def test_system_prompt_is_folded_into_the_first_user_turn(client, processor):
    messages = [
        {"role": "system", "content": "You are an expert radiologist."},
        {"role": "user", "content": "Is this normal?"},
    ]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5)
    expected, _ = expected_prompt_tokens(processor, messages, [])
    assert response.usage.prompt_tokens == expected
    without = chat(client, "Is this normal?", max_tokens=5)
    assert response.usage.prompt_tokens > without.usage.prompt_tokens


def test_a_short_text_prompt_renders_on_the_event_loop_into_the_same_tokens(server, processor):
    """A short text body renders on the event loop (serving/admission/inline_render.py), the
    same messages in a body padded past 4 KiB on vLLM's renderer thread: the same prompt
    tokens either way, transformers' count."""
    assert "text requests with bodies up to 4096 bytes render on the event loop" in server.log()
    messages = [{"role": "system", "content": "You are a radiologist."}, {"role": "user", "content": "Is this normal?"}]
    short = json.dumps({"model": MODEL, "messages": messages, "max_tokens": 8}).encode()
    padded = short[:-1] + b" " * 5000 + b"}"  # the same JSON document, over the bound
    headers = {"Authorization": f"Bearer {server.keys['main']}", "content-type": "application/json"}
    answers, inline_jobs = [], []
    for body in (short, padded):
        before = metric(server.url, "medgemma_renderer_inline_jobs_total")
        answers.append(httpx.post(server.base_url + "/chat/completions", content=body, headers=headers, timeout=120))
        inline_jobs.append(metric(server.url, "medgemma_renderer_inline_jobs_total") - before)
    assert [a.status_code for a in answers] == [200, 200], [a.text[:300] for a in answers]
    assert inline_jobs == [2, 0]  # the chat template and the tokenisation, on the loop; then on vLLM's thread
    inline, threaded = (a.json() for a in answers)
    expected, _ = expected_prompt_tokens(processor, messages, [])
    assert inline["usage"]["prompt_tokens"] == threaded["usage"]["prompt_tokens"] == expected
    assert inline["choices"][0]["message"]["content"] and threaded["choices"][0]["message"]["content"]


def test_multi_turn_conversation(client):
    messages = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "Explain atelectasis."},
    ]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5)
    assert response.choices[0].message.content.strip()


# --- errors: a 4xx OpenAI-style error, and the server keeps serving ---------------------


def assert_openai_error(exc: openai.APIStatusError, status: int, fragment: str):
    assert exc.status_code == status
    body = exc.response.json()
    assert set(body) == {"error"}
    assert {"message", "type", "code"} <= set(body["error"])
    assert fragment.lower() in body["error"]["message"].lower()


@pytest.fixture
def still_serving(server, client):
    yield
    server.assert_alive()
    assert chat(client, "Still there?", max_tokens=3).usage.completion_tokens == 3


def test_more_images_than_allowed(client, still_serving):
    url = data_url(image(64, 64))
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, [image_part(url)] * 5 + [{"type": "text", "text": "x"}])
    assert_openai_error(info.value, 400, "at most 4 image")


def test_corrupt_image(client, still_serving):
    corrupt = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64).decode()
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, [image_part(corrupt), {"type": "text", "text": "x"}])
    assert_openai_error(info.value, 400, "image")


def test_truncated_image(client, still_serving):
    url = data_url(image(256, 256), "JPEG")
    header, payload = url.split(",", 1)
    raw = base64.b64decode(payload)
    truncated = header + "," + base64.b64encode(raw[: len(raw) // 3]).decode()
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, [image_part(truncated), {"type": "text", "text": "x"}])
    assert_openai_error(info.value, 400, "image")


def test_non_image_data_url(client, still_serving):
    text_url = "data:text/plain;base64," + base64.b64encode(b"patient notes").decode()
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, [image_part(text_url), {"type": "text", "text": "x"}])
    assert_openai_error(info.value, 400, "image")


def test_max_tokens_beyond_the_context(client, still_serving):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, "hi", max_tokens=40000)
    assert_openai_error(info.value, 400, "max_tokens")
    # vLLM 0.32 clamps max_tokens to the room left after the prompt instead of refusing
    # prompt + max_tokens > context; the admission layer refuses that case (issue 3).


def test_prompt_longer_than_the_context(client, still_serving):
    long_prompt = "pneumonia " * 40000
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, long_prompt, max_tokens=1)
    assert_openai_error(info.value, 400, "context length")


def test_roles_must_alternate(client, still_serving):
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert_openai_error(info.value, 400, "alternate")


def test_unknown_model(client, still_serving):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "a"}], max_tokens=3
        )
    assert_openai_error(info.value, 404, "does not exist")


def test_prompt_and_image_content_is_not_logged(server, client):
    canary = "CANARY-7f3a91 patient Jane Roe, MRN 0042"
    url = data_url(image(128, 128, seed=9))
    chat(client, [image_part(url), {"type": "text", "text": canary}], max_tokens=4)
    log = server.log()
    assert "CANARY-7f3a91" not in log and "Jane Roe" not in log
    assert url.split(",", 1)[1][:64] not in log


def test_metrics_expose_ours_beside_vllms(server):
    text = httpx.get(server.url + "/metrics").text
    assert "# TYPE medgemma_build_info gauge" in text
    assert 'medgemma_build_info{model=' in text and 'profile="cpu-dev"' in text
    assert "medgemma_engine_ready 1.0" in text
    assert 'vllm:num_requests_running{engine="0",model_name="medgemma-4b-it"}' in text
    assert "vllm:prompt_tokens_total" in text
