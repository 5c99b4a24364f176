"""``tiny-qwen3.5``: a tiny random Qwen3.5 (``Qwen3_5ForConditionalGeneration``), hybrid linear/full layers.

Tokens, processor and M-RoPE as Qwen3-VL (:mod:`.tiny_qwen3_vl`, interleaved sections); the chat template
closes an empty think block after the assistant marker, as Qwen3.5 does with thinking off.

- ``config.text_config.layer_types`` says which decoder layers are ``"full_attention"`` (module
  ``layers[i].self_attn``, ``Qwen3_5Attention``: gated output ``o_proj(attn * sigmoid(gate))``, q/k RMSNorm,
  partial rotary 0.25, ``is_causal=True``) and which are ``"linear_attention"`` (``layers[i].linear_attn``,
  ``Qwen3_5GatedDeltaNet``: a causal conv + gated delta rule; it never calls the attention interface, and its
  cache slot holds a conv state and a recurrent state, not keys). Real checkpoints: 3 linear then 1 full
  (``full_attention_interval`` 4). The tiny model: linear, full, linear, full.
- Left padding reaches the linear layers as a 2-D mask that zeroes padded hidden states
  (``create_recurrent_attention_mask``; ``None`` when unpadded or at decode).
- Vision tower ``model.model.visual`` as Qwen3-VL's without DeepStack; no CLS; 2x2 merge, 1:1 onto tokens.
"""

from __future__ import annotations

from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3VLProcessor
from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig, Qwen3_5VisionConfig

from .tiny_common import token_id
from .tiny_qwen2_vl import (
    IM_END,
    MERGE,
    PAD,
    PATCH_SIZE,
    SPECIALS,
    build_tokenizer,
    qwen_builders,
    special_ids,
)

NAME = "builtin:tiny-qwen3.5"
THINK, END_THINK = "<think>", "</think>"
LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "full_attention"]

# Qwen3.5's turn format with thinking off: the generation prompt carries an empty think block.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}"
)


def tokenizer():
    return build_tokenizer([*SPECIALS, THINK, END_THINK])


def build_config(*, layer_types: list[str] | None = None, hidden_size: int = 64) -> Qwen3_5Config:
    tok = tokenizer()
    layer_types = layer_types or LAYER_TYPES
    text = Qwen3_5TextConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=len(layer_types),
        layer_types=layer_types,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        # rotary on a quarter of head_dim: 4 frequency pairs, interleaved t/h/w (Qwen3.5: 11, 11, 10 of 32)
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        pad_token_id=token_id(tok, PAD),
        eos_token_id=token_id(tok, IM_END),
    )
    vision = Qwen3_5VisionConfig(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE,
        temporal_patch_size=2,
        out_hidden_size=hidden_size,
        num_position_embeddings=64,
    )
    return Qwen3_5Config(text_config=text, vision_config=vision, **special_ids(tok))


build_model, build_processor, load = qwen_builders(
    Qwen3_5ForConditionalGeneration, Qwen3VLProcessor, build_config, NAME, CHAT_TEMPLATE, tokenizer=tokenizer
)
