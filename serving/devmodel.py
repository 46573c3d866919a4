"""The dev checkpoint: a tiny, random-weight model of the real MedGemma-4b-it architecture.

Guarantees:
- Same architecture and file layout as ``google/medgemma-4b-it`` on the Hugging Face hub:
  ``Gemma3ForConditionalGeneration`` (Gemma 3 text decoder with Gemma 3's 5:1 sliding-window
  to global layer mix, SigLIP vision tower, 896x896 images that become 256 image tokens),
  ``Gemma3Processor``, MedGemma's chat template, bf16 weights in two safetensors shards
  with an index, under the tensor names of the published checkpoint.
- Deterministic: the same ``seed`` writes byte-identical weights and tokenizer.
- Small: builds in seconds, loads in vLLM's CPU build well under a minute.
- Every token the model can sample decodes to visible ASCII text. Random weights over a
  byte-fallback vocabulary would emit partial UTF-8 pieces and special tokens that
  decode to nothing, which makes streaming and time-to-first-token meaningless. The
  output layer is shaped instead: all input embeddings carry a large constant in one
  "steering" dimension (positive for visible-word tokens, negative for special, byte,
  whitespace and end-of-sequence tokens), and the final norm amplifies that dimension,
  so every non-visible token's logit sits far below every visible one. (The model
  therefore never stops on its own: clients bound the output with ``max_tokens``, and
  ``generation_config.json`` caps the default.)

Outputs are random text; the point is a real engine, real processor and real token
counts without a GPU, a hub or a token.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEV_MODEL_VERSION = 1
"""Bumped whenever the written checkpoint changes; cached builds of older versions are rebuilt."""

IMAGE_SIZE = 896
PATCH_SIZE = 56  # the real model uses 14; 56 keeps the 896x896 input and gives a 16x16 grid
MM_TOKENS_PER_IMAGE = 256  # same as the real model: one image is 256 prompt tokens
DEFAULT_MAX_NEW_TOKENS = 256
STEER_DIM = 0
STEER_EMBED = 1.0
STEER_NORM_GAIN = 40.0

SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
NEWLINE_TOKENS = ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]

# MedGemma's (= Gemma 3's) chat template: a system message is folded into the first user
# turn, roles must alternate user/assistant, images become <start_of_image>.
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

# Training text for the tokenizer's BPE merges: clinical vocabulary, so that prompts in
# tests and load tests tokenize to plausible lengths.
_CORPUS = """
The patient is a 54 year old woman with chest pain, shortness of breath and a dry cough.
Findings: the chest radiograph shows no pneumothorax, no pleural effusion and a normal
cardiac silhouette. Impression: no acute cardiopulmonary abnormality. Describe this image.
What is the most likely diagnosis? Consider pneumonia, atelectasis, edema, consolidation,
cardiomegaly, fracture, nodule, mass, opacity, infiltrate, emphysema, fibrosis.
The lesion is asymmetric with irregular borders and several colours; dermoscopy shows an
atypical pigment network. Differential diagnosis: melanoma, nevus, seborrheic keratosis,
basal cell carcinoma. Recommend biopsy and follow up in three months.
History of hypertension, diabetes mellitus type 2, hyperlipidemia and chronic kidney disease.
Medications: metformin, lisinopril, atorvastatin, aspirin. Allergies: penicillin.
Vital signs: blood pressure, heart rate, respiratory rate, temperature, oxygen saturation.
Laboratory results: hemoglobin, white blood cell count, platelets, sodium, potassium,
creatinine, glucose, troponin. The computed tomography scan of the abdomen and pelvis
demonstrates a small hypodense lesion in the liver, likely a cyst. Magnetic resonance
imaging of the brain is unremarkable. Ultrasound of the right upper quadrant shows
gallstones without signs of cholecystitis. Histopathology slide with hematoxylin and eosin
stain shows glandular structures. Fundus photograph of the retina with microaneurysms and
hemorrhages suggests diabetic retinopathy. Please summarise the report for the patient in
plain language. Answer briefly and explain your reasoning step by step.
You are a helpful medical assistant. You are an expert radiologist.
left right upper lower anterior posterior lateral medial bilateral normal abnormal mild
moderate severe acute chronic stable improved worse increased decreased present absent
"""


def _train_tokenizer():
    """A byte-fallback BPE tokenizer in Gemma's style (SentencePiece ``▁`` spaces)."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    alphabet = [chr(c) for c in range(33, 127)] + ["▁"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS + byte_tokens,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    # Train on text already in the ▁ form; words never merge across spaces.
    words = _CORPUS.split()
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.train_from_iterator(["▁" + w for w in words] * 2, trainer=trainer)

    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    for text in NEWLINE_TOKENS:
        vocab.setdefault(text, len(vocab))
    # Byte tokens are ordinary vocabulary entries in Gemma's tokenizer, not added tokens.
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in SPECIAL_TOKENS]
    for added in data["added_tokens"]:
        added["normalized"] = False
    data["pre_tokenizer"] = None
    data["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    data["decoder"] = json.loads(
        decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        ).__getstate__()
    )
    tok = Tokenizer.from_str(json.dumps(data))
    # Newline runs are literal added tokens in the real vocabulary too (vLLM's gemma3
    # processor looks up "\n".."\n\n\n\n" by value).
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in reversed(NEWLINE_TOKENS)])
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    return tok


def _visible_token_ids(vocab: dict[str, int]) -> list[int]:
    """Ids of tokens that decode on their own to at least one visible ASCII character."""
    visible = []
    for piece, idx in vocab.items():
        text = piece.replace("▁", " ")
        if piece in SPECIAL_TOKENS or piece.startswith("<0x") or not text.strip():
            continue
        if text.isascii() and text.isprintable():
            visible.append(idx)
    return sorted(visible)


def _configs(vocab_size: int, token_ids: dict[str, int]):
    from transformers import Gemma3Config

    text_config = {
        "model_type": "gemma3_text",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 6,  # 5 sliding-window layers, then 1 global: Gemma 3's pattern
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "query_pre_attn_scalar": 32,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "tie_word_embeddings": True,
        "pad_token_id": token_ids["<pad>"],
        "bos_token_id": token_ids["<bos>"],
        "eos_token_id": token_ids["<eos>"],
    }
    vision_config = {
        "model_type": "siglip_vision_model",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_channels": 3,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        "vision_use_head": False,
    }
    return Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=token_ids["<start_of_image>"],
        eoi_token_index=token_ids["<end_of_image>"],
        image_token_index=token_ids["<image_soft_token>"],
        eos_token_id=[token_ids["<eos>"], token_ids["<end_of_turn>"]],
        tie_word_embeddings=True,
        dtype="bfloat16",
    )


def _published_name(name: str) -> str | None:
    """Map a transformers-5 parameter name to the published checkpoint's name (None: tied, skip)."""
    if name == "lm_head.weight":
        return None
    for new, old in (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if name.startswith(new):
            return old + name[len(new) :]
    raise ValueError(f"unexpected parameter name {name!r}")


def _random_weights(config, vocab_size: int, visible_ids: list[int], seed: int) -> dict:
    import torch
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = Gemma3ForConditionalGeneration(config)
    model.eval()
    state = {}
    for name, tensor in model.state_dict().items():
        published = _published_name(name)
        if published is not None:
            state[published] = tensor.detach().clone().contiguous()

    # Steering (see the module docstring). Embeddings are tied, so a token's steering value
    # is both what it writes into the residual stream as input and how its logit reads the
    # output. The last layer's MLP therefore writes |x|^2 of the steering dimension back
    # into it (two gelu units, one per sign), which makes the final steering value large
    # and positive whatever the input token was.
    embed = state["language_model.model.embed_tokens.weight"]
    steer = torch.full((vocab_size,), -STEER_EMBED)
    steer[torch.tensor(visible_ids)] = STEER_EMBED
    embed[:, STEER_DIM] = steer
    last = f"language_model.model.layers.{config.text_config.num_hidden_layers - 1}."
    gate = state[last + "mlp.gate_proj.weight"]
    up = state[last + "mlp.up_proj.weight"]
    down = state[last + "mlp.down_proj.weight"]
    for unit, sign in ((0, 1.0), (1, -1.0)):
        gate[unit].zero_()
        up[unit].zero_()
        gate[unit, STEER_DIM] = sign
        up[unit, STEER_DIM] = sign
        down[:, unit] = 0.0
        down[STEER_DIM, unit] = 1.0
    # GemmaRMSNorm scales by (1 + weight): amplify the steering dimension.
    state[last + "post_feedforward_layernorm.weight"][STEER_DIM] = STEER_NORM_GAIN - 1.0
    final_norm = state["language_model.model.norm.weight"]
    final_norm.zero_()
    final_norm[STEER_DIM] = STEER_NORM_GAIN - 1.0
    return {k: v.to(torch.bfloat16) for k, v in state.items()}


def _write_shards(state: dict, out: Path, shards: int = 2) -> None:
    """Write weights as ``model-0000i-of-0000n.safetensors`` plus the index, like the hub."""
    from safetensors.torch import save_file

    names = sorted(state)
    per_shard = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(shards):
        chunk = names[i * per_shard : (i + 1) * per_shard]
        filename = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in chunk}, str(out / filename), metadata={"format": "pt"})
        for n in chunk:
            weight_map[n] = filename
            total += state[n].numel() * state[n].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the dev checkpoint into ``path`` (created; existing files are overwritten)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    vocab_size = len(vocab)
    config = _configs(vocab_size, vocab)
    state = _random_weights(config, vocab_size, _visible_token_ids(vocab), seed)

    config_dict = config.to_diff_dict()
    config_dict["architectures"] = ["Gemma3ForConditionalGeneration"]
    config_dict["medgemma_dev_model"] = {"version": DEV_MODEL_VERSION, "seed": seed}
    config_dict.pop("transformers_version", None)
    _write_json(out / "config.json", config_dict)
    _write_shards(state, out)
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": vocab["<bos>"],
            "eos_token_id": [vocab["<eos>"], vocab["<end_of_turn>"]],
            "pad_token_id": vocab["<pad>"],
            "do_sample": True,
            "top_k": 64,
            "top_p": 0.95,
            "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
        },
    )
    tokenizer.save(str(out / "tokenizer.json"))
    added = {
        str(vocab[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in SPECIAL_TOKENS,
        }
        for t in SPECIAL_TOKENS + NEWLINE_TOKENS
    }
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "GemmaTokenizer",
            "added_tokens_decoder": added,
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
            "mask_token": "<mask>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
            "extra_special_tokens": {
                "boi_token": "<start_of_image>",
                "eoi_token": "<end_of_image>",
                "image_token": "<image_soft_token>",
            },
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1000000000000000019884624838656,
            "padding_side": "left",
            "processor_class": "Gemma3Processor",
            "spaces_between_special_tokens": False,
        },
    )
    _write_json(
        out / "special_tokens_map.json",
        {
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    _write_json(
        out / "preprocessor_config.json",
        {
            "do_convert_rgb": None,
            "do_normalize": True,
            "do_pan_and_scan": None,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "Gemma3ImageProcessor",
            "image_seq_length": MM_TOKENS_PER_IMAGE,
            "image_std": [0.5, 0.5, 0.5],
            "pan_and_scan_max_num_crops": None,
            "pan_and_scan_min_crop_size": None,
            "pan_and_scan_min_ratio_to_activate": None,
            "processor_class": "Gemma3Processor",
            "resample": 2,
            "rescale_factor": 1 / 255,
            "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        },
    )
    _write_json(
        out / "processor_config.json",
        {"image_seq_length": MM_TOKENS_PER_IMAGE, "processor_class": "Gemma3Processor"},
    )
    _write_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    (out / "README.md").write_text(
        "# medgemma-dev (random weights)\n\n"
        "Built by `medgemma-serve devmodel`: the MedGemma-4b-it architecture with tiny random\n"
        "weights, for development and tests. Its outputs are random text.\n"
    )
    return out


def is_current(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a complete dev checkpoint of the current version."""
    config = Path(path) / "config.json"
    if not config.is_file() or not (Path(path) / "model.safetensors.index.json").is_file():
        return False
    try:
        meta = json.loads(config.read_text()).get("medgemma_dev_model") or {}
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("version") == DEV_MODEL_VERSION


def ensure(path: str | os.PathLike, seed: int = 0) -> Path:
    """Return ``path`` holding the current dev checkpoint, building it atomically if needed."""
    target = Path(path)
    if is_current(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building the MedGemma dev checkpoint in %s", target)
    staging = Path(tempfile.mkdtemp(prefix=".devmodel-", dir=target.parent))
    build(staging, seed=seed)
    if target.exists() and not is_current(target):
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:
        # Another process built it first (replicas starting together): keep theirs.
        shutil.rmtree(staging, ignore_errors=True)
        if not is_current(target):
            raise
    return target
