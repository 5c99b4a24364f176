"""``tiny-paligemma``: a tiny random PaliGemma (``PaliGemmaForConditionalGeneration``), a prefix-LM.

- Paths: ``model.model`` (``PaliGemmaModel``), ``.language_model`` (``GemmaModel``; PaliGemma 2:
  ``Gemma2Model``), ``.layers[i].self_attn`` (``layer_idx``, ``is_causal``, ``scaling``; Gemma 2 also
  ``sliding_window`` and ``attn_logit_softcapping``); vision tower ``model.model.vision_tower``
  (``SiglipVisionModel``, no CLS, last layer); projector ``model.model.multi_modal_projector`` (one linear).
- Prompt: no chat template in the real checkpoints; the processor writes
  ``<image> x image_seq_length`` + ``<bos>`` + prompt + ``"\\n"`` (it inserts ``<bos>`` after the last
  ``<image>``, and adds the image tokens at the very start when the text has none). The tiny processor's
  chat template renders just ``<image>`` and the text, so prompts look like the real ones. Every row needs
  an image (the processor refuses text-only calls).
- ``token_type_ids``: 0 on the prefix (image + prompt + newline), 1 on a suffix (training labels) and on
  generated tokens. At prefill the mask lets the whole prefix attend bidirectionally (prefix-LM), the suffix
  causally; at decode plain causal. The text attention modules have ``is_causal=False``: without
  ``token_type_ids`` an unpadded prefill gets ``mask=None`` and SDPA attends bidirectionally over the whole
  prompt. Positions are 1-D and **1-indexed** (``position_ids + 1``). The processor also returns training
  ``labels``, which must not reach ``generate``.
- PaliGemma 2 (``version=2``): Gemma 2 text with alternating sliding/full layers and attention-logit
  soft-capping, which SDPA refuses: it runs with ``attn_implementation="eager"`` only, and a custom
  attention function receives ``softcap`` in its kwargs and must apply it.
"""

from __future__ import annotations

from transformers import (
    Gemma2Config,
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipVisionConfig,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from .tiny_common import finish, loader, token_id, word_tokenizer

NAME = "builtin:tiny-paligemma"
PAD, EOS, BOS, UNK, IMAGE = "<pad>", "<eos>", "<bos>", "<unk>", "<image>"
SPECIALS = [PAD, EOS, BOS, UNK, IMAGE]
EXTRA_WORDS = ["answer", "en", "caption", "detect"]
IMAGE_SIZE = 32
PATCH_SIZE = 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
TEXT_ONLY_ROWS = False  # the processor needs an image in every row
SLIDING_WINDOW = 16  # PaliGemma 2 only: shorter than the prefix, so sliding layers drop keys

# Images first, then the task text (the processor adds <bos> after the images and "\n" at the end).
CHAT_TEMPLATE = (
    "{% for message in messages if message['role'] == 'user' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] if part['type'] == 'image' %}<image>{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %}{% endfor %}"
)


def build_tokenizer():
    return word_tokenizer(
        SPECIALS, pad=PAD, eos=EOS, bos=BOS, unk=UNK, named={"image_token": IMAGE}, words=EXTRA_WORDS
    )


def build_config(*, version: int = 1, num_layers: int = 4, hidden_size: int = 64) -> PaliGemmaConfig:
    tok = build_tokenizer()
    common = {
        "vocab_size": len(tok),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,  # multi-query, as PaliGemma's Gemma-2B
        "head_dim": 16,
        "max_position_embeddings": 512,
        "pad_token_id": token_id(tok, PAD),
        "bos_token_id": token_id(tok, BOS),
        "eos_token_id": token_id(tok, EOS),
    }
    if version == 1:
        text = GemmaConfig(**common)
    elif version == 2:
        text = Gemma2Config(
            **common,
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
        )
    else:
        raise ValueError(f"PaliGemma version 1 or 2, not {version}")
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
    )
    return PaliGemmaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=token_id(tok, IMAGE),
        projection_dim=hidden_size,
        hidden_size=hidden_size,
        vocab_size=len(tok),
    )


def build_model(seed: int = 0, *, std: float = 0.15, version: int = 1, **config_kwargs):
    """Tiny PaliGemma (``version=1``, SDPA) or PaliGemma 2 (``version=2``: eager attention, soft-capping)."""
    tok = build_tokenizer()
    config = build_config(version=version, **config_kwargs)
    if version == 2:
        config._attn_implementation = "eager"
    model = finish(
        PaliGemmaForConditionalGeneration,
        config,
        NAME if version == 1 else "builtin:tiny-paligemma2",
        seed,
        std,
        "model.language_model",
        pad_id=token_id(tok, PAD),
        eos_id=token_id(tok, EOS),
    )
    return model


def build_processor() -> PaliGemmaProcessor:
    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    image_processor.image_seq_length = IMAGE_TOKENS
    return PaliGemmaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), chat_template=CHAT_TEMPLATE
    )


load = loader(build_model, build_processor)
