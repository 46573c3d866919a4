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
counts without a GPU, a hub or a token. This package's ``build``/``ensure`` write it; the
tokenizer, the weights and the chat template each have a module.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from serving.devmodel.chat_template import CHAT_TEMPLATE
from serving.devmodel.tokenizer import NEWLINE_TOKENS, SPECIAL_TOKENS, train_tokenizer, visible_token_ids
from serving.devmodel.weights import (
    DEFAULT_MAX_NEW_TOKENS,
    IMAGE_SIZE,
    MM_TOKENS_PER_IMAGE,
    configs,
    random_weights,
    write_shards,
)

logger = logging.getLogger(__name__)

DEV_MODEL_VERSION = 1
"""Bumped whenever the written checkpoint changes; cached builds of older versions are rebuilt."""


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def preprocessor_config() -> dict:
    """google/medgemma-4b-it's image processor configuration (the real model's values)."""
    return {
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
    }


def build(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the dev checkpoint into ``path`` (created; existing files are overwritten)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    vocab_size = len(vocab)
    config = configs(vocab_size, vocab)
    state = random_weights(config, vocab_size, visible_token_ids(vocab), seed)

    config_dict = config.to_diff_dict()
    config_dict["architectures"] = ["Gemma3ForConditionalGeneration"]
    config_dict["medgemma_dev_model"] = {"version": DEV_MODEL_VERSION, "seed": seed}
    config_dict.pop("transformers_version", None)
    _write_json(out / "config.json", config_dict)
    write_shards(state, out)
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
    _write_json(out / "preprocessor_config.json", preprocessor_config())
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
