"""The served model takes images through ``serving.images`` (the default ``fast`` mode): the
shapes its fast paths handle, end to end on the real server (the pixels themselves are
checked against vLLM's in tests/unit/images/test_fidelity.py)."""

import base64

import pytest

from tests.image_corpus import sample
from tests.integration.images import image_part

MODEL = "medgemma-4b-it"
IMAGE_TOKENS = 256


def data_url(item) -> str:
    return f"data:{item.mime};base64," + base64.b64encode(item.data).decode()


def prompt_tokens(client, parts) -> int:
    content = [*parts, {"type": "text", "text": "Findings?"}]
    response = client.chat.completions.create(model=MODEL, max_tokens=2,
                                              messages=[{"role": "user", "content": content}])  # fmt: skip
    assert response.choices[0].message.content is not None
    return response.usage.prompt_tokens


@pytest.mark.parametrize("item", [
    sample("radiograph", 2048, 2048, "JPEG"),  # greyscale, decoded at 1/2 and kept one band
    sample("dermoscopy", 2400, 1900, "JPEG"),  # RGB, decoded at 1/2
    sample("radiograph", 2048, 1792, "PNG", mode="I;16"),  # 16-bit: converted as vLLM does
    sample("pathology", 3000, 2400, "PNG"),  # box-reduced before the resize
], ids=lambda item: item.name)  # fmt: skip
def test_large_medical_images_are_served_as_one_image_each(client, item):
    text_only = prompt_tokens(client, [])
    assert prompt_tokens(client, [image_part(data_url(item))]) - text_only >= IMAGE_TOKENS


def test_the_server_uses_the_fast_path(server, client):
    prompt_tokens(client, [image_part(data_url(sample("radiograph", 2000, 2000, "JPEG", seed=7)))])
    log = server.log()
    assert "image preprocessing: fast" in log
    assert "first JPEG decoded at 1/2 scale" in log
