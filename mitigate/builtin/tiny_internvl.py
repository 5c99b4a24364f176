"""``tiny-internvl``: a tiny random InternVL (``InternVLForConditionalGeneration``, InternVL3-hf layout).

- Paths: ``model.model`` (``InternVLModel``), ``.language_model`` (a ``Qwen2Model``), ``.layers[i].self_attn``
  (``Qwen2Attention``); vision tower ``model.model.vision_tower`` (``InternVLVisionModel``, InternViT: a
  **CLS token** first, ``.encoder.layer[i].attention``), ``vision_feature_layer`` -1 and strategy
  ``"default"`` (CLS dropped), then a 2x2 pixel shuffle (``downsample_ratio`` 0.5: 4 neighbouring patches
  -> one token, row-major) and ``model.model.multi_modal_projector``.
- Image span: ``<img>`` + (tiles x ``image_seq_length``) x ``<IMG_CONTEXT>`` (``config.image_token_id``)
  + ``</img>``. The image is cut into up to ``max_patches`` tiles of ``image_size`` plus a thumbnail
  (when there is more than one tile); every tile's tokens follow the previous tile's, with no separator.
  ``pixel_values [sum of tiles, 3, S, S]``; the count per image is not returned (it shows in the span
  length). The chat template writes ``<IMG_CONTEXT>\\n`` per image, which the processor expands.
- 1-D positions; plain causal masks.
"""

from __future__ import annotations

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor, Qwen2Config
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

from .tiny_common import loader, model_builder, redraw, token_id, without_missing_parts, word_tokenizer

NAME = "builtin:tiny-internvl"
PAD, UNK, IM_START, IM_END = "<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>"
START_IMAGE, END_IMAGE, CONTEXT, VIDEO = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
SPECIALS = [PAD, UNK, IM_START, IM_END, START_IMAGE, END_IMAGE, CONTEXT, VIDEO]
IMAGE_SIZE = 32
PATCH_SIZE = 4
TOKENS_PER_TILE = (IMAGE_SIZE // PATCH_SIZE) ** 2 // 4  # after the 2x2 pixel shuffle
MAX_TILES = 4

# InternVL3-hf's template: images as "<IMG_CONTEXT>\n" before the text.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer():
    return word_tokenizer(
        SPECIALS,
        pad=PAD,
        eos=IM_END,
        unk=UNK,
        named={
            "start_image_token": START_IMAGE,
            "end_image_token": END_IMAGE,
            "context_image_token": CONTEXT,
            "video_token": VIDEO,
        },
    )


def build_config(*, num_layers: int = 4, hidden_size: int = 64) -> InternVLConfig:
    tok = build_tokenizer()
    text = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=token_id(tok, PAD),
        bos_token_id=None,
        eos_token_id=token_id(tok, IM_END),
    )
    vision = InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    return InternVLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=token_id(tok, CONTEXT),
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


_build_base = model_builder(
    InternVLForConditionalGeneration, build_config, NAME, build_tokenizer, pad=PAD, eos=IM_END
)


def build_model(seed: int = 0, *, std: float = 0.15, **config_kwargs) -> InternVLForConditionalGeneration:
    """A tiny random InternVL. Besides the language re-draw, the tower's CLS token and position embeddings
    (initialised to zeros, which makes the CLS attend uniformly to every patch) and its 2-D weights are
    re-drawn, so the CLS-to-patch attention that PAINT reads is peaked as in a trained tower."""
    model = _build_base(seed, std=std, **config_kwargs)
    tower = model.model.vision_tower
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        tower.embeddings.cls_token.copy_(torch.randn(tower.embeddings.cls_token.shape, generator=gen))
        positions = tower.embeddings.position_embeddings
        positions.copy_(torch.randn(positions.shape, generator=gen) * 0.5)
    redraw([tower.encoder], seed + 3, std)
    return model


def build_processor() -> InternVLProcessor:
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_to_patches=True,
        min_patches=1,
        max_patches=MAX_TILES,
    )
    return without_missing_parts(InternVLProcessor)(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        video_processor=None,
        image_seq_length=TOKENS_PER_TILE,
        chat_template=CHAT_TEMPLATE,
    )


load = loader(build_model, build_processor)
