"""``tiny-qwen3-vl``: a tiny random Qwen3-VL (``Qwen3VLForConditionalGeneration``) built offline.

Tokens and processor as Qwen2-VL (:mod:`.tiny_qwen2_vl`), but the chat template has no default system turn.
Differences that matter for attention edits:

- Text attention ``Qwen3VLTextAttention`` has q/k RMSNorm, explicit ``head_dim``, ``is_causal=True``, no
  sliding window. M-RoPE is *interleaved* (``mrope_section`` picks every third frequency for h and w).
- DeepStack: the vision tower returns extra features from ``deepstack_visual_indexes`` (tiny: block 0),
  and the language model *adds* them to the hidden states at the image positions after decoder layers
  0..len-1. Layer-input hidden states of those early layers therefore differ from the previous layer's
  output at image tokens.
- Vision tower ``model.model.visual``: learned position embeddings (``num_position_embeddings``, a square
  grid, bilinearly resized) plus 2-D rotary, 2x2 merger; no CLS token. Features map 1:1 onto image tokens.
"""

from __future__ import annotations

from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig, Qwen3VLVisionConfig

from .tiny_common import token_id
from .tiny_qwen2_vl import MERGE, PAD, PATCH_SIZE, build_tokenizer, qwen_builders, special_ids

NAME = "builtin:tiny-qwen3-vl"

# Qwen3-VL's template: no default system turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_config(*, num_layers: int = 4, hidden_size: int = 64) -> Qwen3VLConfig:
    tokenizer = build_tokenizer()
    text = Qwen3VLTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        # 8 frequency pairs: t keeps the rest, h and w every third from 1 and 2 (Qwen3-VL: 24, 20, 20 of 64)
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        },
        pad_token_id=token_id(tokenizer, PAD),
    )
    vision = Qwen3VLVisionConfig(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE,
        temporal_patch_size=2,
        out_hidden_size=hidden_size,
        num_position_embeddings=64,  # an 8x8 grid of learned positions
        deepstack_visual_indexes=[0],
    )
    return Qwen3VLConfig(text_config=text, vision_config=vision, **special_ids(tokenizer))


build_model, build_processor, load = qwen_builders(
    Qwen3VLForConditionalGeneration, Qwen3VLProcessor, build_config, NAME, CHAT_TEMPLATE
)
