"""``tiny-qwen2.5-vl``: a tiny random Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``) built offline.

The language side, tokens, chat template, processor and M-RoPE are Qwen2-VL's (:mod:`.tiny_qwen2_vl` has the
facts). What differs is the vision tower ``model.model.visual``: RMSNorm + SwiGLU blocks, windowed attention
in every block except ``fullatt_block_indexes`` (the tiny tower: block 0 windowed, block 1 full), and
patches reordered by window before the blocks and restored after the 2x2 merger, so features still map 1:1,
in raster order, onto the ``<|image_pad|>`` tokens. No CLS token.

Unlike Qwen2-VL, 3-VL and 3.5 (which raise), a forward without ``mm_token_type_ids`` silently falls back to
1-D positions: always pass them.
"""

from __future__ import annotations

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
)

from .tiny_qwen2_vl import (
    CHAT_TEMPLATE,
    MERGE,
    PATCH_SIZE,
    build_tokenizer,
    qwen_builders,
    special_ids,
    text_kwargs,
)

NAME = "builtin:tiny-qwen2.5-vl"


def build_config(*, num_layers: int = 4, hidden_size: int = 64) -> Qwen2_5_VLConfig:
    tokenizer = build_tokenizer()
    text = Qwen2_5_VLTextConfig(**text_kwargs(tokenizer, num_layers=num_layers, hidden_size=hidden_size))
    vision = Qwen2_5_VLVisionConfig(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE,
        temporal_patch_size=2,
        out_hidden_size=hidden_size,
        window_size=2 * PATCH_SIZE * MERGE,  # 16 pixels: a 2x2 window of merged tokens, as 112 px at 14 px
        fullatt_block_indexes=[1],
    )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special_ids(tokenizer))


build_model, build_processor, load = qwen_builders(
    Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, build_config, NAME, CHAT_TEMPLATE
)
