"""``tiny-smolvlm``: a tiny random SmolVLM (``SmolVLMForConditionalGeneration``), Idefics3's layout.

Same paths, image spans (tiles with ``<row_r_col_c>`` markers, a global view, ``<image>`` runs),
pixel shuffle and inputs as :mod:`.tiny_idefics3`: language model at ``model.model.text_model``, vision
tower ``model.model.vision_model`` (no CLS), connector ``model.model.connector``. Turns start with
``<|im_start|>`` (no BOS) and end with ``<end_of_utterance>``. The processor needs the ``num2words`` package
(it refuses to build without it, although only videos use it).
"""

from __future__ import annotations

import torch
from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor
from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from .tiny_common import MissingPart, finish, token_id, without_missing_parts
from .tiny_idefics3 import (
    END_UTTERANCE,
    IMAGE,
    PAD,
    SCALE_FACTOR,
    SPECIALS,
    TOKENS_PER_TILE,
    build_tokenizer,
    image_processor_kwargs,
    language_config,
    language_model,
    vision_kwargs,
)

NAME = "builtin:tiny-smolvlm"
IM_START = "<|im_start|>"
SMOL_SPECIALS = [*SPECIALS, IM_START]

# SmolVLM's template: "<|im_start|>User:<image>{text}<end_of_utterance>\nAssistant:".
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% elif part['type'] == 'image' %}<image>{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def tokenizer():
    return build_tokenizer(SMOL_SPECIALS, bos=IM_START, eos=END_UTTERANCE)


def build_config(*, num_layers: int = 4, hidden_size: int = 64) -> SmolVLMConfig:
    tok = tokenizer()
    return SmolVLMConfig(
        text_config=language_config(tok, num_layers=num_layers, hidden_size=hidden_size),
        vision_config=SmolVLMVisionConfig(**vision_kwargs()),
        image_token_id=token_id(tok, IMAGE),
        scale_factor=SCALE_FACTOR,
        pad_token_id=token_id(tok, PAD),
    )


def build_model(seed: int = 0, *, std: float = 0.15, **config_kwargs) -> SmolVLMForConditionalGeneration:
    tok = tokenizer()
    return finish(
        SmolVLMForConditionalGeneration,
        build_config(**config_kwargs),
        NAME,
        seed,
        std,
        "model.text_model",
        pad_id=token_id(tok, PAD),
        eos_id=token_id(tok, END_UTTERANCE),
    )


def build_processor() -> SmolVLMProcessor:
    return without_missing_parts(SmolVLMProcessor)(
        image_processor=SmolVLMImageProcessorPil(**image_processor_kwargs()),
        tokenizer=tokenizer(),
        # its chat template reads these even without a video
        video_processor=MissingPart(num_frames=1, fps=1),
        image_seq_len=TOKENS_PER_TILE,
        chat_template=CHAT_TEMPLATE,
    )


def load(seed: int = 0, dtype: torch.dtype | None = None):
    model = build_model(seed)
    if dtype is not None:
        model = model.to(dtype)
    return model, build_processor()


__all__ = ["build_config", "build_model", "build_processor", "language_model", "load"]
