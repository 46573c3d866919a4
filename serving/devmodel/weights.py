"""The dev checkpoint's configuration and weights: Gemma 3 at a tiny size, random but steered.

Guarantees: the configuration is the real model's architecture (SigLIP tower, 896x896 images
of 256 tokens, 5:1 sliding-window layers) at a tiny width; weights are deterministic for a
seed, bf16, under the published checkpoint's tensor names, in two safetensors shards with an
index; the output layer is steered so that only visible tokens are sampled (see the package).
"""

from __future__ import annotations

import json
from pathlib import Path


IMAGE_SIZE = 896
PATCH_SIZE = 56  # the real model uses 14; 56 keeps the 896x896 input and gives a 16x16 grid
MM_TOKENS_PER_IMAGE = 256  # same as the real model: one image is 256 prompt tokens
DEFAULT_MAX_NEW_TOKENS = 256
STEER_DIM = 0
STEER_EMBED = 1.0
STEER_NORM_GAIN = 40.0


def configs(vocab_size: int, token_ids: dict[str, int]):
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


def random_weights(config, vocab_size: int, visible_ids: list[int], seed: int) -> dict:
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


def write_shards(state: dict, out: Path, shards: int = 2) -> None:
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

