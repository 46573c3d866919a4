import base64
import io
import json

import numpy as np
from PIL import Image

from loadtests.distributions import parse
from loadtests.images import ImageSource, generate
from loadtests.workload import ApiKey, Workload, WorkloadSpec, parse_key


def spec(**kwargs) -> WorkloadSpec:
    base = dict(images=parse("choice:0=0.3,1=0.5,2=0.2"), image_size=parse("uniform:96,160"), image_pool=3)
    return WorkloadSpec(**(base | kwargs))


def images_of(body: bytes) -> list[bytes]:
    content = json.loads(body)["messages"][-1]["content"]
    urls = [part["image_url"]["url"] for part in content if part["type"] == "image_url"]
    return [base64.b64decode(url.split(",", 1)[1]) for url in urls]


def test_same_seed_same_requests_and_counts_match_the_body():
    a, b = Workload(spec(), seed=5), Workload(spec(), seed=5)
    for _ in range(20):
        x, y = a.next(), b.next()
        assert x.body == y.body
        body = json.loads(x.body)
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["max_tokens"] == body["min_tokens"] == x.max_tokens
        found = images_of(x.body)
        assert len(found) == x.images and sum(map(len, found)) == x.image_bytes


def test_unique_mode_never_repeats_an_image_and_repeated_mode_does():
    unique = Workload(spec(images=parse("2"), image_mode="unique"), seed=1)
    seen = [img for _ in range(15) for img in images_of(unique.next().body)]
    assert len(set(seen)) == len(seen) == 30
    repeated = Workload(spec(images=parse("2"), image_mode="repeated"), seed=1)
    seen = [img for _ in range(15) for img in images_of(repeated.next().body)]
    assert len(set(seen)) <= 3


def test_images_look_like_images_not_noise_or_blank():
    xray = np.asarray(generate("radiograph", 0, 256, 256), dtype=np.float32)
    skin = np.asarray(generate("dermoscopy", 0, 256, 192), dtype=np.float32)
    assert xray.ndim == 2 and skin.shape == (192, 256, 3)
    for pixels in (xray, skin):
        assert pixels.std() > 20  # not blank
        # Neighbouring pixels are alike (structure), unlike white noise.
        flat = pixels if pixels.ndim == 2 else pixels.mean(axis=2)
        assert np.corrcoef(flat[:, :-1].ravel(), flat[:, 1:].ravel())[0, 1] > 0.9
    assert skin[96, 128].sum() < skin[100, 10].sum() or skin[96, 128, 0] < 150  # a darker lesion in the middle


def test_formats_decode_and_keys_are_weighted_by_label():
    source = ImageSource(size=parse("64"), formats=("png", "jpeg"), pool_size=2, seed=0)
    kinds = set()
    for _ in range(10):
        image = source.next()
        kinds.add(Image.open(io.BytesIO(image.data)).format)
    assert kinds == {"PNG", "JPEG"}
    keys = [parse_key("gold=sk-a@3"), parse_key("free=sk-b@1")]
    assert keys[0] == ApiKey("gold", "sk-a", 3.0)
    work = Workload(spec(images=parse("0"), keys=keys), seed=0)
    labels = [work.next().key_label for _ in range(400)]
    assert 0.65 < labels.count("gold") / 400 < 0.85
    request = work.next()
    assert request.headers["authorization"] in ("Bearer sk-a", "Bearer sk-b")
    assert "sk-" not in request.key_label
