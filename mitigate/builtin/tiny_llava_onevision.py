"""``tiny-llava-onevision``: a tiny random LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``).

- Paths: ``model.model`` (``LlavaOnevisionModel``), ``.language_model`` (a ``Qwen2Model``),
  ``.layers[i].self_attn`` (``Qwen2Attention``: ``layer_idx``, ``is_causal``, ``scaling``, ``sliding_window``
  None); vision tower ``model.model.vision_tower`` (``SiglipVisionModel``: no CLS token;
  ``.vision_model.encoder.layers[i].self_attn``); projector ``model.model.multi_modal_projector``.
- Image span: only ``<image>`` tokens (``config.image_token_id``), no begin/end markers. A single image in a
  prompt is any-resolution: the base view (``(image_size/patch)**2`` tokens) then the unpadded tile grid
  with one ``image_newline`` embedding at the end of every row, all under the same ``<image>`` id (the
  newline slots cannot be told from patches by id). A prompt with several images gets, per image, the base
  view plus one newline, no tiles. Features map 1:1 in order; ``vision_feature_layer`` -1,
  ``vision_feature_select_strategy`` ``"full"`` (every patch, as SigLIP has no CLS).
- The processor returns ``pixel_values [n_images, n_views, 3, H, W]`` (views padded), ``image_sizes`` and
  ``batch_num_images`` (images per prompt: decides tiles or not, so a row's prompt and its images must be
  split together).
- 1-D positions; plain causal masks.
"""

from __future__ import annotations

from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from .tiny_common import loader, model_builder, token_id, without_missing_parts, word_tokenizer

NAME = "builtin:tiny-llava-onevision"
PAD, UNK, IM_START, IM_END, IMAGE, VIDEO = (
    "<|endoftext|>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
    "<image>",
    "<video>",
)
SPECIALS = [PAD, UNK, IM_START, IM_END, IMAGE, VIDEO]
IMAGE_SIZE = 32
PATCH_SIZE = 8
GRID = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE], [64, 64]]

# LLaVA-OneVision (Qwen2) turns: "<|im_start|>user <image>\n{text}<|im_end|><|im_start|>assistant\n".
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] if part['type'] == 'image' %}<image>{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}\n{{ part['text'] }}{% endfor %}"
    "{% endif %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer():
    return word_tokenizer(
        SPECIALS, pad=PAD, eos=IM_END, unk=UNK, named={"image_token": IMAGE, "video_token": VIDEO}
    )


def build_config(*, num_layers: int = 4, hidden_size: int = 64) -> LlavaOnevisionConfig:
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
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
    )
    return LlavaOnevisionConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=token_id(tok, IMAGE),
        video_token_id=token_id(tok, VIDEO),
        image_grid_pinpoints=GRID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )


build_model = model_builder(
    LlavaOnevisionForConditionalGeneration, build_config, NAME, build_tokenizer, pad=PAD, eos=IM_END
)


def build_processor() -> LlavaOnevisionProcessor:
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_grid_pinpoints=GRID
    )
    return without_missing_parts(LlavaOnevisionProcessor)(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        num_image_tokens=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
    )


load = loader(build_model, build_processor)
