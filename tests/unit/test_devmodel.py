import json

import pytest

from serving import devmodel

HUB_FILES = {
    "config.json",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "preprocessor_config.json",
    "processor_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.json",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return devmodel.build(tmp_path_factory.mktemp("devmodel") / "m", seed=0)


def test_file_layout_matches_the_hub_checkpoint(checkpoint):
    files = {p.name for p in checkpoint.iterdir()}
    assert HUB_FILES <= files
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }


def test_tensor_names_are_the_published_ones(checkpoint):
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    prefixes = ("language_model.model.", "vision_tower.vision_model.", "multi_modal_projector.")
    assert all(n.startswith(prefixes) for n in names)
    assert "language_model.model.embed_tokens.weight" in names
    assert "multi_modal_projector.mm_input_projection_weight" in names
    assert not any(n.startswith("vision_tower.vision_model.head") for n in names)


def test_config_is_the_medgemma_architecture(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert cfg["model_type"] == "gemma3" and cfg["mm_tokens_per_image"] == 256
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert text["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert text["max_position_embeddings"] == 131072
    assert vision["model_type"] == "siglip_vision_model" and vision["image_size"] == 896
    assert vision["vision_use_head"] is False
    patches_per_side = vision["image_size"] // vision["patch_size"]
    tokens_per_side = int(cfg["mm_tokens_per_image"] ** 0.5)
    assert tokens_per_side**2 == 256 and patches_per_side % tokens_per_side == 0
    assert cfg["dtype"] == "bfloat16"


def test_deterministic_for_a_seed(checkpoint, tmp_path):
    again = devmodel.build(tmp_path / "again", seed=0)
    for name in HUB_FILES:
        assert (again / name).read_bytes() == (checkpoint / name).read_bytes(), name
    other = devmodel.build(tmp_path / "other", seed=1)
    shard = "model-00002-of-00002.safetensors"
    assert (other / shard).read_bytes() != (checkpoint / shard).read_bytes()


def test_tokenizer_has_gemma_pieces(checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    vocab = tok.get_vocab()
    for text in ["\n", "\n\n", "\n\n\n", "\n\n\n\n", "<start_of_image>", "<image_soft_token>"]:
        assert text in vocab
    ids = tok("The chest radiograph. Ünïcode 日本")["input_ids"]
    assert ids[0] == vocab["<bos>"]
    assert tok.decode(ids, skip_special_tokens=True) == "The chest radiograph. Ünïcode 日本"


def test_chat_template_behaves_like_medgemma(checkpoint):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You are an expert radiologist."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<bos><start_of_turn>user\nYou are an expert radiologist.\n\n"
        "<start_of_image>Describe.<end_of_turn>\n<start_of_turn>model\n"
    )
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="alternate"):
        processor.apply_chat_template(bad, tokenize=False)


def test_every_sampled_token_decodes_to_visible_text(checkpoint):
    """Random weights, yet no special, byte or blank token can win: streams carry text."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = Gemma3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16)
    visible = set(devmodel.visible_token_ids(tok.get_vocab()))
    generator = torch.Generator().manual_seed(0)
    prompts = [
        "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n",
        "<bos>\n\n\n",
        "<bos><unk><pad><eos><end_of_turn>",
        "<bos>日本語",
    ]
    for prompt in prompts:
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        for _ in range(25):
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, -1].float()
            token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            assert token.item() in visible
            assert tok.decode([token.item()]).strip()
            ids = torch.cat([ids, token[None]], dim=1)


def test_ensure_builds_once_and_rebuilds_stale(tmp_path):
    target = tmp_path / "cache" / "dev"
    devmodel.ensure(target)
    assert devmodel.is_current(target)
    stamp = (target / "config.json").stat().st_mtime_ns
    devmodel.ensure(target)
    assert (target / "config.json").stat().st_mtime_ns == stamp
    cfg = json.loads((target / "config.json").read_text())
    cfg["medgemma_dev_model"]["version"] = -1
    (target / "config.json").write_text(json.dumps(cfg))
    assert not devmodel.is_current(target)
    devmodel.ensure(target)
    assert devmodel.is_current(target)
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".devmodel-")]
