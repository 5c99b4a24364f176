"""``builtin:tiny-llava``: a tiny random LLaVA built from configs, with a word-level tokenizer and processor.

Everything is made locally and deterministically from a seed, so tests and the offline demo need no
download. The model is random: it shows the mechanics of every method, not their benefit.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

NAME = "builtin:tiny-llava"
IMAGE_TOKEN = "<image>"
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]
OBJECTS = [
    "person", "cat", "dog", "car", "bus", "bicycle", "tree", "house", "ball", "cup", "chair", "table",
    "bird", "boat", "clock", "sun", "circle", "square", "triangle", "star",
]  # fmt: skip
COLORS = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple"]
WORDS = [
    "user", "assistant", "system", ":", "?", ".", ",", "!", "'", "is", "are", "there", "a", "an", "the",
    "in", "on", "of", "and", "with", "image", "picture", "photo", "this", "what", "describe", "please",
    "detail", "yes", "no", "not", "i", "see", "it", "shows", "answer", "question", "using", "single",
    "word", "or", "phrase", "how", "many", "color", "left", "right", "top", "bottom", "next", "to",
    "one", "two", "three", "four", "big", "small", "some", "objects", "scene", "do", "you",
]  # fmt: skip
VOCAB = SPECIALS + WORDS + OBJECTS + COLORS

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s>{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

IMAGE_SIZE = 32
PATCH_SIZE = 8


def build_tokenizer(
    words: list[str] | None = None, extra_special_tokens: dict[str, str] | None = None
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` (default: this model's vocabulary; must start with SPECIALS).
    ``extra_special_tokens`` name more special tokens (a processor's ``boi_token``...), besides the image."""
    words = VOCAB if words is None else words
    if words[: len(SPECIALS)] != SPECIALS:
        raise ValueError(f"a built-in vocabulary starts with {SPECIALS}")
    vocab = {word: i for i, word in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    # Like Llama tokenizers, prompts start with BOS (usually a text attention sink in real models).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN, **(extra_special_tokens or {})},
    )
    fast.padding_side = "left"
    return fast


def build_processor(
    image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE, words: list[str] | None = None
) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(words),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(
    *, num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2, hidden_size: int = 64
) -> LlavaConfig:
    vocab = len(VOCAB)
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )
    return LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=VOCAB.index(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=0,
    )


def build_model(seed: int = 0, *, std: float = 0.15, **config_kwargs) -> LlavaForConditionalGeneration:
    """A tiny random LLaVA in eval mode, the same for the same seed and torch version.

    Random init gives near-uniform attention, so the 2-D language weights are re-drawn from N(0, std) to
    make attention peaked enough for edits to matter (DESIGN.md, facts about transformers 5.x).
    """
    return finish(LlavaForConditionalGeneration, build_config(**config_kwargs), NAME, seed, std)


def finish(cls, config, name: str, seed: int, std: float):
    """Instantiate ``cls(config)`` under ``seed``, re-draw the 2-D language weights from N(0, std), and
    name it ``name`` (methods pick per-model presets by that name)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for module in (model.model.language_model, model.lm_head):
                for param in module.parameters():
                    if param.dim() == 2:
                        param.copy_(torch.randn(param.shape, generator=gen) * std)
    model.config._name_or_path = name
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 3
    return model.eval()


def load(
    seed: int = 0, dtype: torch.dtype | None = None
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    model = build_model(seed)
    if dtype is not None:
        model = model.to(dtype)
    return model, build_processor()
