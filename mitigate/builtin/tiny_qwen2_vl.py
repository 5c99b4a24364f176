"""``tiny-qwen2-vl``: a tiny random Qwen2-VL (``Qwen2VLForConditionalGeneration``) built from configs offline.

Family facts (transformers 5.24; details in the project's family notes):

- Paths: ``model.model`` (``Qwen2VLModel``), ``.language_model`` (``Qwen2VLTextModel``),
  ``.layers[i].self_attn`` (``Qwen2VLAttention``: ``layer_idx``, ``is_causal=True``, ``scaling``,
  ``sliding_window`` None unless ``use_sliding_window``); vision tower ``model.model.visual``
  (``.blocks[i].attn``, ``.merger``).
- Image span: ``<|vision_start|>`` + N x ``<|image_pad|>`` (``config.image_token_id``) + ``<|vision_end|>``;
  N = t*h*w / merge**2 of ``image_grid_thw`` (one row per image). The markers come from the chat template,
  the processor only expands ``<|image_pad|>``. ``pixel_values`` is ``[sum of patches, 3*2*P*P]`` (flattened
  patches, not images); ``mm_token_type_ids`` (1 on image tokens) must reach the model, or M-RoPE fails.
- Positions: 3-D M-RoPE ``[3, B, T]`` (temporal, height, width): text tokens share one increasing index,
  image tokens get (t, row, col) offsets from the span start; after an image the index jumps to
  start + max(h, w)/merge. ``generate`` passes ``[4, B, T]`` (row 0 = plain text positions for the mask) at
  prefill and extends it by +1 per step; a bare forward derives decode positions from ``rope_deltas``
  (stored on ``model.model``, overwritten by any prefill). The attention function's ``position_ids`` kwarg is
  the 2-D text positions, never the M-RoPE ones (None in a bare forward). No CLS token; 2x2 patch merge,
  features map 1:1 in raster order onto image tokens. Twin: drop the whole span and set its
  ``mm_token_type_ids`` to 0; positions become plain ``arange``.
"""

from __future__ import annotations

from transformers import (
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .tiny_common import loader, model_builder, token_id, without_missing_parts, word_tokenizer

NAME = "builtin:tiny-qwen2-vl"
PAD, UNK, IM_START, IM_END = "<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>"
IMAGE, VIDEO, VISION_START, VISION_END = (
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
)
SPECIALS = [PAD, UNK, IM_START, IM_END, VISION_START, VISION_END, IMAGE, VIDEO]
EXTRA_WORDS = ["helpful", "model"]
PATCH_SIZE = 4
MERGE = 2
# smart_resize keeps images between these pixel counts, on a grid of PATCH_SIZE * MERGE = 8 pixels
MIN_PIXELS, MAX_PIXELS = 16 * 16, 48 * 48

# Qwen2-VL's template: a default system turn, images as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(specials: list[str] = SPECIALS, words: list[str] = EXTRA_WORDS):
    """Qwen's tokenizer adds no BOS; pad is <|endoftext|>, the chat turn ends with <|im_end|>."""
    return word_tokenizer(
        specials,
        pad=PAD,
        eos=IM_END,
        unk=UNK,
        named={
            "image_token": IMAGE,
            "video_token": VIDEO,
            "vision_start_token": VISION_START,
            "vision_end_token": VISION_END,
        },
        words=words,
    )


def build_image_processor(patch_size: int = PATCH_SIZE, merge: int = MERGE) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=merge,
    )


def special_ids(tokenizer=None) -> dict[str, int]:
    tokenizer = tokenizer or build_tokenizer()
    return {
        "image_token_id": token_id(tokenizer, IMAGE),
        "video_token_id": token_id(tokenizer, VIDEO),
        "vision_start_token_id": token_id(tokenizer, VISION_START),
        "vision_end_token_id": token_id(tokenizer, VISION_END),
    }


def text_kwargs(tokenizer, *, num_layers: int = 4, hidden_size: int = 64) -> dict:
    """The Qwen text settings the tiny Qwen-VL models share: 4 heads over 2 KV heads (GQA), head_dim 16, and
    M-RoPE sections (t, h, w) = (2, 3, 3) frequency pairs, as Qwen's (16, 24, 24) for head_dim 128."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "pad_token_id": token_id(tokenizer, PAD),
        "bos_token_id": None,
        "eos_token_id": token_id(tokenizer, IM_END),
    }


def build_config(*, num_layers: int = 4, hidden_size: int = 64) -> Qwen2VLConfig:
    tokenizer = build_tokenizer()
    text = Qwen2VLTextConfig(**text_kwargs(tokenizer, num_layers=num_layers, hidden_size=hidden_size))
    vision = Qwen2VLVisionConfig(
        depth=2,
        embed_dim=32,
        hidden_size=hidden_size,  # the merger's output: the language model's width
        mlp_ratio=2,
        num_heads=2,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE,
        temporal_patch_size=2,
    )
    return Qwen2VLConfig(text_config=text, vision_config=vision, **special_ids(tokenizer))


def qwen_builders(
    model_cls, processor_cls, build_config, name: str, chat_template: str, tokenizer=build_tokenizer
):
    """``build_model``, ``build_processor`` and ``load`` of a tiny Qwen-VL family (Qwen2-VL, 2.5-VL, 3-VL,
    3.5): ``model_cls`` from ``build_config``, language model at ``model.language_model``, pad
    ``<|endoftext|>`` and eos ``<|im_end|>`` of ``tokenizer()``; the processor ``processor_cls`` over
    Qwen2-VL's image processor, ``tokenizer()`` and ``chat_template``, with no video processor."""
    build_model = model_builder(model_cls, build_config, name, tokenizer, pad=PAD, eos=IM_END)

    def build_processor():
        return without_missing_parts(processor_cls)(
            image_processor=build_image_processor(), tokenizer=tokenizer(), chat_template=chat_template
        )

    return build_model, build_processor, loader(build_model, build_processor)


build_model, build_processor, load = qwen_builders(
    Qwen2VLForConditionalGeneration, Qwen2VLProcessor, build_config, NAME, CHAT_TEMPLATE
)
