"""``tiny-idefics3``: a tiny random Idefics3 (``Idefics3ForConditionalGeneration``); SmolVLM shares it.

- Paths: ``model.model`` (``Idefics3Model``), language model ``model.model.text_model`` (a ``LlamaModel``,
  **not** ``language_model``), ``.layers[i].self_attn`` (``LlamaAttention``); vision tower
  ``model.model.vision_model`` (SigLIP-like, no CLS, ``.encoder.layers[i].self_attn``, last layer), then
  ``model.model.connector`` (pixel shuffle by ``scale_factor`` 2: 2x2 patches -> one token, then a linear).
- Image span: the image is resized (longest edge ``size``), split into ``max_image_size`` tiles (rows x cols)
  plus a global view. Tokens: for each tile ``<fake_token_around_image><row_r_col_c>`` + n x ``<image>``,
  a newline after each tile row, then ``<fake_token_around_image><global-img>`` + n x ``<image>`` +
  ``<fake_token_around_image>``. Only the n-token runs carry ``config.image_token_id``; the markers are
  ordinary special tokens. Small images: just the global part.
- The processor returns ``pixel_values [B, max_images_in_a_row, 3, S, S]`` and ``pixel_attention_mask
  [B, max_images, S, S]``; a row's missing images are all-zero frames that the model drops (a row without
  an image is fine). 1-D positions; plain causal masks.
"""

from __future__ import annotations

from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    LlamaConfig,
)
from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

from .tiny_common import loader, model_builder, token_id, word_tokenizer

NAME = "builtin:tiny-idefics3"
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<|begin_of_text|>", "<|end_of_text|>"
IMAGE, FAKE, GLOBAL, END_UTTERANCE = (
    "<image>",
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
)
GRID_TOKENS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
SPECIALS = [PAD, UNK, BOS, EOS, IMAGE, FAKE, GLOBAL, END_UTTERANCE, *GRID_TOKENS]
TILE = 32
PATCH_SIZE = 4
SCALE_FACTOR = 2
TOKENS_PER_TILE = (TILE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
LONGEST_EDGE = 2 * TILE  # at most 2x2 tiles plus the global view

# Idefics3's template: "<|begin_of_text|>User:<image>{text}<end_of_utterance>\nAssistant:".
CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% elif part['type'] == 'image' %}<image>{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_tokenizer(specials: list[str] = SPECIALS, *, bos: str = BOS, eos: str = EOS):
    """Named ``image_token`` etc. as SmolVLM's tokenizer; Idefics3's processor finds them by their text."""
    return word_tokenizer(
        specials,
        pad=PAD,
        eos=eos,
        bos=bos,
        unk=UNK,
        named={
            "image_token": IMAGE,
            "fake_image_token": FAKE,
            "global_image_token": GLOBAL,
            "end_of_utterance_token": END_UTTERANCE,
        },
    )


def language_config(tok, *, num_layers: int, hidden_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=token_id(tok, PAD),
        bos_token_id=token_id(tok, tok.bos_token),
        eos_token_id=token_id(tok, END_UTTERANCE),
    )


def vision_kwargs() -> dict:
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": TILE,
        "patch_size": PATCH_SIZE,
    }


def idefics_builders(config_cls, vision_config_cls, model_cls, name: str, tokenizer=build_tokenizer):
    """``build_config`` and ``build_model`` of a tiny family with Idefics3's layout (Idefics3, SmolVLM): the
    same Llama language model (at ``model.model.text_model``), tower and pixel shuffle, token ids from
    ``tokenizer()``; only the classes, the name and the tokenizer's specials differ."""

    def build_config(*, num_layers: int = 4, hidden_size: int = 64):
        tok = tokenizer()
        return config_cls(
            text_config=language_config(tok, num_layers=num_layers, hidden_size=hidden_size),
            vision_config=vision_config_cls(**vision_kwargs()),
            image_token_id=token_id(tok, IMAGE),
            scale_factor=SCALE_FACTOR,
            pad_token_id=token_id(tok, PAD),
        )

    build_model = model_builder(
        model_cls, build_config, name, tokenizer, pad=PAD, eos=END_UTTERANCE, language="model.text_model"
    )
    return build_config, build_model


build_config, build_model = idefics_builders(
    Idefics3Config, Idefics3VisionConfig, Idefics3ForConditionalGeneration, NAME
)


def image_processor_kwargs() -> dict:
    return {
        "size": {"longest_edge": LONGEST_EDGE},
        "max_image_size": {"longest_edge": TILE},
        "do_image_splitting": True,
    }


def build_processor() -> Idefics3Processor:
    return Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(**image_processor_kwargs()),
        tokenizer=build_tokenizer(),
        image_seq_len=TOKENS_PER_TILE,
        chat_template=CHAT_TEMPLATE,
    )


def language_model(model):
    return model.model.text_model


load = loader(build_model, build_processor)
