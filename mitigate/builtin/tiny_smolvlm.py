"""``tiny-smolvlm``: a tiny random SmolVLM (``SmolVLMForConditionalGeneration``), Idefics3's layout.

Same paths, image spans (tiles with ``<row_r_col_c>`` markers, a global view, ``<image>`` runs),
pixel shuffle and inputs as :mod:`.tiny_idefics3`: language model at ``model.model.text_model``, vision
tower ``model.model.vision_model`` (no CLS), connector ``model.model.connector``. Turns start with
``<|im_start|>`` (no BOS) and end with ``<end_of_utterance>``. The processor needs the ``num2words`` package
(it refuses to build without it, although only videos use it).
"""

from __future__ import annotations

from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor
from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from .tiny_common import MissingPart, loader, without_missing_parts
from .tiny_idefics3 import (
    END_UTTERANCE,
    SPECIALS,
    TOKENS_PER_TILE,
    build_tokenizer,
    idefics_builders,
    image_processor_kwargs,
    language_model,
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


build_config, build_model = idefics_builders(
    SmolVLMConfig, SmolVLMVisionConfig, SmolVLMForConditionalGeneration, NAME, tokenizer=tokenizer
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


load = loader(build_model, build_processor)


__all__ = ["build_config", "build_model", "build_processor", "language_model", "load"]
