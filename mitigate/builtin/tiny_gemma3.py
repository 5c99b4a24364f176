"""``builtin:tiny-gemma3``: a tiny random Gemma 3 (SigLIP tower, pooled image tokens between begin/end
markers, image blocks that attend bidirectionally, sliding-window layers), built from configs offline.

It shares the word-level tokenizer of :mod:`.tiny_llava` (the image placeholder is the same ``<image>``)
plus Gemma's turn markers and image delimiters.
"""

from __future__ import annotations

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from .tiny_common import loader
from .tiny_llava import IMAGE_TOKEN, VOCAB, build_tokenizer, finish

NAME = "builtin:tiny-gemma3"
MARKERS = {
    "boi_token": "<boi>",
    "eoi_token": "<eoi>",
    "start_of_turn": "<start_of_turn>",
    "end_of_turn": "<end_of_turn>",
}
WORDS = VOCAB + list(MARKERS.values()) + ["model"]
IMAGE_SIZE = 32
PATCH_SIZE = 4
IMAGE_TOKENS = 16  # the 8x8 patch grid pooled to 4x4, as Gemma 3 pools 64x64 to 16x16
SLIDING_WINDOW = 24  # shorter than the prompts, so sliding layers drop keys at decode

# Gemma's turn format; the image part becomes <boi>, which the processor expands to the image tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}<start_of_turn>{{ 'user' if message['role'] == 'user' else 'model' }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<boi>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_config(*, num_layers: int = 4, hidden_size: int = 64) -> Gemma3Config:
    text = Gemma3TextConfig(
        vocab_size=len(WORDS),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=SLIDING_WINDOW,
        # sliding, full, sliding, full...: both kinds of layer are edited
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    return Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=IMAGE_TOKENS,
        image_token_id=WORDS.index(IMAGE_TOKEN),
        boi_token_id=WORDS.index(MARKERS["boi_token"]),
        eoi_token_id=WORDS.index(MARKERS["eoi_token"]),
        pad_token_id=0,
    )


def build_model(seed: int = 0, *, std: float = 0.15, **config_kwargs) -> Gemma3ForConditionalGeneration:
    model = finish(Gemma3ForConditionalGeneration, build_config(**config_kwargs), NAME, seed, std)
    # Gemma 3 initialises its image projection to zeros: every image token would be the same vector
    gen = torch.Generator().manual_seed(seed + 2)
    weight = model.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=gen) * weight.shape[0] ** -0.5)
    return model


def build_processor() -> Gemma3Processor:
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(WORDS, MARKERS),
        chat_template=CHAT_TEMPLATE,
        image_seq_length=IMAGE_TOKENS,
    )


load = loader(build_model, build_processor)
