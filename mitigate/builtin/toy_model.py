"""``builtin:toy-llava``: the LLaVA the project trains on its toy world (:mod:`.toy_world`), shipped as data.

The architecture is LLaVA-1.5's in miniature: a CLIP vision tower (64 px, 8 px patches, so 64 image
tokens; features from its second-to-last layer, CLS dropped), a two-layer MLP projector and a Llama
language model, with a word-level tokenizer, LLaVA's processor and a USER/ASSISTANT chat template.
:mod:`.toy_train` builds it from :func:`build_config` and trains it; the weights and processor files live
in ``mitigate/builtin/toy_llava/`` and load through ``from_pretrained`` on that folder, offline.
"""

from __future__ import annotations

from contextlib import ExitStack
from importlib import resources
from pathlib import Path

import torch
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from . import tiny_llava, toy_world

NAME = "builtin:toy-llava"
FOLDER = "toy_llava"  # inside the mitigate.builtin package
IMAGE_TOKEN = tiny_llava.IMAGE_TOKEN
SPECIALS = tiny_llava.SPECIALS
PAD, UNK, BOS, EOS, IMAGE_ID = range(len(SPECIALS))
# Every word of the prompts and answers the model is trained on, then a few common ones it never sees
# in training (they map to their own untrained rows rather than to <unk>).
WORDS = [
    "user", "assistant", ":", "?", ".", ",", "is", "there", "a", "an", "in", "the", "image", "answer",
    "question", "using", "single", "word", "or", "phrase", "please", "describe", "this", "detail", "yes",
    "no", "and",
    "what", "picture", "photo", "do", "you", "see", "are", "any", "of", "on", "with", "it", "not",
]  # fmt: skip
VOCAB = SPECIALS + WORDS + toy_world.NAMES

IMAGE_SIZE = toy_world.SIZE
PATCH_SIZE = 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # CLS dropped ("default" feature selection)


def build_processor() -> LlavaProcessor:
    """LLaVA's processor with the toy vocabulary (the word-level tokenizer of :mod:`.tiny_llava`)."""
    return tiny_llava.build_processor(IMAGE_SIZE, PATCH_SIZE, VOCAB)


def build_config(
    *,
    text_hidden: int = 128,
    text_layers: int = 6,
    text_heads: int = 4,
    vision_hidden: int = 128,
    vision_layers: int = 3,
    vision_heads: int = 4,
) -> LlavaConfig:
    """The shipped model's shape by default; smaller values make the test-sized model."""
    text = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=text_hidden,
        intermediate_size=text_hidden * 8 // 3 // 16 * 16,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        max_position_embeddings=512,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=vision_hidden,
    )
    return LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=PAD,
    )


def new_model(seed: int = 0, **sizes: int) -> LlavaForConditionalGeneration:
    """A freshly initialised model (what training starts from), the same for the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(build_config(**sizes))
    finish(model)
    return model


def finish(model: LlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
    """Name and generation settings every copy of the model carries (presets are picked by the name)."""
    model.config._name_or_path = NAME
    model.name_or_path = NAME  # from_pretrained sets the folder here; presets are matched on this name
    model.generation_config.pad_token_id = PAD
    model.generation_config.bos_token_id = BOS
    model.generation_config.eos_token_id = EOS
    return model


def shipped_folder(stack: ExitStack) -> Path:
    """The package-data folder as a real path (kept alive by ``stack``)."""
    return stack.enter_context(resources.as_file(resources.files("mitigate.builtin") / FOLDER))


def load_folder(folder: Path | str, dtype: torch.dtype | None = None):
    """``(model, processor)`` from a folder written by :mod:`.toy_train` (eval mode, left padding)."""
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = LlavaForConditionalGeneration.from_pretrained(folder, **kwargs)
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    return finish(model).eval(), processor


def load(dtype: torch.dtype | None = None):
    """``builtin:toy-llava``: the shipped weights, loaded offline from the package."""
    with ExitStack() as stack:
        folder = shipped_folder(stack)
        if not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"{folder} has no model.safetensors: the package was installed without its data; "
                "train it with `python -m mitigate.builtin.toy_train --out DIR` and load DIR"
            )
        return load_folder(folder, dtype)
