"""``builtin:tiny-llava-next``: the tiny random model as LLaVA-NeXT (any-resolution tiles, row-end tokens).

Same language model, tower, tokenizer and chat template as :mod:`.tiny_llava`; images are split into a
base view and tiles over a 2x2 grid of 32-pixel crops, as LLaVA-NeXT does at 336 pixels.
"""

from __future__ import annotations

from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from .tiny_common import loader
from .tiny_llava import CHAT_TEMPLATE, IMAGE_SIZE, PATCH_SIZE, build_config, build_tokenizer, finish

NAME = "builtin:tiny-llava-next"
GRID = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]]


def build_model(seed: int = 0, *, std: float = 0.15) -> LlavaNextForConditionalGeneration:
    base = build_config()
    config = LlavaNextConfig(
        text_config=base.text_config,
        vision_config=base.vision_config,
        image_token_id=base.image_token_id,
        image_grid_pinpoints=GRID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=0,
    )
    return finish(LlavaNextForConditionalGeneration, config, NAME, seed, std)


def build_processor() -> LlavaNextProcessor:
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=GRID,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


load = loader(build_model, build_processor)
