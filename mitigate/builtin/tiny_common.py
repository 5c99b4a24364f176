"""Shared pieces of the tiny offline family builders: a word-level tokenizer with a family's own special
tokens, the weight re-draw that makes a random model's attention peaked (DESIGN.md, facts about
transformers 5.x), and the ``build_model`` / ``load`` functions every family has in the same shape.

Every ``tiny_<family>`` module builds its model from configs and its processor from these parts, with no
download. The vocabulary is the small word list of :mod:`.tiny_llava` after the family's special tokens.
Each family's facts (config values, special tokens, chat template) stay in its own module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .tiny_llava import COLORS, OBJECTS, WORDS

PLAIN_WORDS = WORDS + OBJECTS + COLORS


def word_tokenizer(
    specials: list[str],
    *,
    pad: str,
    eos: str,
    unk: str | None = None,
    bos: str | None = None,
    add_bos: bool = False,
    named: dict[str, str] | None = None,
    words: Iterable[str] = (),
    padding_side: str = "left",
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``specials`` (ids 0..) then ``words`` then the plain word list.

    Every special is matched whole in raw text (like a real tokenizer's added tokens), so chat markers such as
    ``<|im_start|>`` or ``[IMG_BREAK]`` survive the punctuation split. ``named`` maps attribute names
    (``image_token``, ``boi_token``...) to specials; processors read those attributes. ``add_bos`` prepends
    ``bos`` to every encoded text, as Llama/Gemma tokenizers do (Qwen's do not)."""
    extra = [w for w in words if w not in specials]
    vocab_list = list(specials) + extra + [w for w in PLAIN_WORDS if w not in specials and w not in extra]
    vocab = {word: i for i, word in enumerate(vocab_list)}
    unk = unk or pad
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    if add_bos:
        if bos is None:
            raise ValueError("add_bos needs a bos token")
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, vocab[bos])]
        )
    named = dict(named or {})
    roles = {"pad_token": pad, "eos_token": eos, "unk_token": unk}
    if bos is not None:
        roles["bos_token"] = bos
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **roles, extra_special_tokens=named)
    # the rest of the specials are matched whole too, without a named attribute
    rest = [s for s in specials if s not in set(named.values()) | set(roles.values())]
    if rest:
        fast.add_special_tokens({"additional_special_tokens": rest}, replace_extra_special_tokens=False)
    if len(fast) != len(vocab_list):
        raise AssertionError(f"tokenizer grew past its vocabulary ({len(fast)} != {len(vocab_list)})")
    fast.padding_side = padding_side
    return fast


def redraw(modules: Iterable[torch.nn.Module], seed: int, std: float) -> None:
    """Re-draw every 2-D parameter of ``modules`` from N(0, std), deterministically from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for module in modules:
            for param in module.parameters():
                if param.dim() == 2 and id(param) not in seen:
                    seen.add(id(param))
                    param.copy_(torch.randn(param.shape, generator=gen) * std)


def finish(cls, config, name: str, seed: int, std: float, language: str, *, pad_id: int, eos_id: int):
    """Instantiate ``cls(config)`` under ``seed``, re-draw the 2-D weights of the language model (the
    submodule at dotted path ``language``) and of ``lm_head`` from N(0, std), and name it ``name`` (presets
    are matched by that name). Returns the model in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    redraw([model.get_submodule(language), model.lm_head], seed + 1, std)
    model.config._name_or_path = name
    model.generation_config.pad_token_id = pad_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.bos_token_id = None
    return model.eval()


def model_builder(
    cls,
    build_config: Callable,
    name: str,
    tokenizer: Callable[[], PreTrainedTokenizerFast],
    *,
    pad: str,
    eos: str,
    language: str = "model.language_model",
) -> Callable:
    """A family's ``build_model(seed=0, *, std=0.15, **config_kwargs)``: ``cls`` of
    ``build_config(**config_kwargs)`` through :func:`finish` (language model at dotted path ``language``),
    with generation's pad and eos ids those of the tokens ``pad`` and ``eos`` in ``tokenizer()``."""

    def build_model(seed: int = 0, *, std: float = 0.15, **config_kwargs):
        tok = tokenizer()
        return finish(
            cls,
            build_config(**config_kwargs),
            name,
            seed,
            std,
            language,
            pad_id=token_id(tok, pad),
            eos_id=token_id(tok, eos),
        )

    build_model.__doc__ = (
        f"A tiny random ``{cls.__name__}`` ({name}) in eval mode, the same for the same seed; its 2-D "
        "language weights re-drawn from N(0, std). ``config_kwargs`` go to ``build_config``."
    )
    return build_model


def loader(build_model: Callable, build_processor: Callable) -> Callable:
    """A family's ``load(seed=0, dtype=None)``: ``(build_model(seed), build_processor())``, the model cast to
    ``dtype`` when one is given."""

    def load(seed: int = 0, dtype: torch.dtype | None = None):
        model = build_model(seed)
        if dtype is not None:
            model = model.to(dtype)
        return model, build_processor()

    return load


class MissingPart:
    """Stands in for a sub-processor the tiny models do not use (a video processor needs torchvision), with
    the attributes a processor reads from it even for images (SmolVLM's chat template reads ``num_frames``
    and ``fps``)."""

    def __init__(self, **attributes):
        self.__dict__.update(attributes)


def without_missing_parts(cls):
    """``cls`` (a processor class) accepting ``None`` for sub-processors it does not use here.

    Qwen-VL and Gemma 4 processors take a video processor (and Gemma 4 an audio feature extractor); in
    transformers 5.24 passing ``None`` fails when torchvision is absent (the class check cannot resolve
    ``VideoProcessorMixin``). Images and text need neither, so the tiny processors leave them out (``None``
    or a :class:`MissingPart`)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None or isinstance(argument, MissingPart):
            return None
        return cls.check_argument_for_proper_class(self, argument_name, argument)

    return type(cls.__name__, (cls,), {"check_argument_for_proper_class": check_argument_for_proper_class})


def token_id(tokenizer, token: str) -> int:
    index = tokenizer.convert_tokens_to_ids(token)
    if index is None or (index == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise KeyError(f"{token!r} is not in the tiny vocabulary")
    return index
