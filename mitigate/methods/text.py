"""Words of the prompt, for methods that read them (GIFT): the user-query span and its informative tokens.

The informative filter keeps nouns, proper nouns, verbs, adjectives, adverbs and numbers, as GIFT's
released code does with spaCy. spaCy's English models are not on the package registry, so the tagger is
TextBlob's bundled Pattern tagger (``pip install mitigate[evals]``; no download at run time), with Penn
tags mapped to those classes the way spaCy's coarse tags fall: auxiliaries (is, do, can, ...) are AUX
and "not" is PART (both left out), wh-adverbs (how, where) are ADV (kept).
Without TextBlob, a stop-word list stands in; :data:`TAGGER` says which one ran.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

import torch

log = logging.getLogger("mitigate")

PENN_INFORMATIVE = ("NN", "NNS", "NNP", "NNPS", "VB", "VBD", "VBG", "VBN", "VBP", "VBZ", "JJ", "JJR", "JJS",
                    "RB", "RBR", "RBS", "WRB", "CD")  # fmt: skip
AUXILIARIES = frozenset(
    "am is are was were be been being do does did have has had can could will would shall should may might "
    "must 's 're 'm 've 'd not n't".split()
)
STOP_WORDS = AUXILIARIES | frozenset(
    "a an the this that these those there here it its i you he she we they me him her us them my your his "
    "our their what which who whom whose when where why how in on at of to for from by with about as into "
    "onto over under and or but not no yes if then than so too very just please answer question using "
    "single word phrase image picture photo describe detail".split()
)


def _tagger():
    try:
        from textblob.en import tag
    except ImportError:
        return None
    return tag


TAGGER = "textblob-pattern" if _tagger() is not None else "stop-words"


def informative_words(text: str) -> list[tuple[int, int]]:
    """Character spans of the informative words in ``text``."""
    tag = _tagger()
    if tag is not None:
        words = [
            w for w, t in tag(text, tokenize=True) if t in PENN_INFORMATIVE and w.lower() not in AUXILIARIES
        ]
    else:
        words = [w for w in text.replace("?", " ").replace(".", " ").replace(",", " ").split()
                 if w.lower() not in STOP_WORDS]  # fmt: skip
    spans, cursor = [], 0
    for word in words:
        start = text.find(word, cursor)
        if start < 0:
            continue
        spans.append((start, start + len(word)))
        cursor = start + len(word)
    return spans


def token_offsets(tokenizer: Any, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of ``ids`` and each token's character span in it (by incremental decoding)."""
    spans, previous = [], 0
    for i in range(len(ids)):
        end = len(tokenizer.decode(ids[: i + 1], skip_special_tokens=False))
        spans.append((previous, end))
        previous = end
    return tokenizer.decode(ids, skip_special_tokens=False), spans


def informative_tokens(tokenizer: Any, ids: list[int]) -> list[bool]:
    text, offsets = token_offsets(tokenizer, ids)
    words = informative_words(text)
    return [any(s < we and ws < e for ws, we in words) for s, e in offsets]


@cache
def _suffix_text(template_owner: Any) -> str:
    """The text the chat template appends after the user's text (e.g. `` ASSISTANT:``), or ``""``."""
    mark = "\u2063MARK\u2063"
    try:
        rendered = template_owner.apply_chat_template(
            [{"role": "user", "content": mark}], add_generation_prompt=True, tokenize=False
        )
    except Exception:  # no chat template: nothing to strip
        return ""
    suffix = rendered.split(mark, 1)[-1]
    return suffix if suffix.strip() else ""


@cache
def _suffix_ids(tokenizer: Any, template_owner: Any) -> tuple[int, ...]:
    """The suffix's token ids when tokenised on its own."""
    suffix = _suffix_text(template_owner)
    return tuple(tokenizer(suffix, add_special_tokens=False)["input_ids"]) if suffix else ()


def _suffix_tokens(tokenizer: Any, row_ids: list[int], suffix: str) -> int:
    """How many of the row's last tokens spell the template's suffix, found in text: a tokeniser may cut
    the suffix differently inside the prompt than on its own (a leading space joined to the user's last
    token, a word-start marker). A token holding user text and the suffix's first blank stays query."""
    wanted = "".join(suffix.split()).lower()  # blanks and case as the tokeniser may normalise them
    text, offsets = token_offsets(tokenizer, row_ids)
    visible = [(i, c.lower()) for i, c in enumerate(text) if not c.isspace()]
    seen = "".join(c for _, c in visible)
    if not wanted or not seen.endswith(wanted) or len(seen) == len(wanted):
        return 0
    cut = visible[len(seen) - len(wanted)][0]  # where the suffix's first visible character is
    for i, (start, end) in enumerate(offsets):
        if end > cut:
            first = i if not text[start:cut].strip() else i + 1
            return len(row_ids) - first
    return 0


def query_spans(ids: torch.Tensor, query: torch.Tensor, processor: Any) -> list[tuple[int, int] | None]:
    """Per row, the user's query as ``(first, last)`` positions (inclusive) inside the ``query`` mask
    (tokens after the last image): the chat template's generation suffix and blank tokens are dropped."""
    tokenizer = getattr(processor, "tokenizer", processor)
    suffix = _suffix_ids(tokenizer, processor) if processor is not None else ()
    spans: list[tuple[int, int] | None] = []
    for row in range(ids.shape[0]):
        positions = query[row].nonzero().squeeze(1).tolist()
        row_ids = ids[row, positions].tolist() if positions else []
        if suffix and len(row_ids) > len(suffix) and tuple(row_ids[-len(suffix) :]) == suffix:
            positions = positions[: -len(suffix)]
            row_ids = row_ids[: -len(suffix)]
        elif suffix and tokenizer is not None and row_ids:  # tokenised otherwise in context
            drop = _suffix_tokens(tokenizer, row_ids, _suffix_text(processor))
            if 0 < drop < len(row_ids):
                positions, row_ids = positions[:-drop], row_ids[:-drop]
        if tokenizer is not None:  # leading and trailing blanks ("\n" after the image) are not the query
            while row_ids and not tokenizer.decode(row_ids[:1]).strip():
                positions, row_ids = positions[1:], row_ids[1:]
            while row_ids and not tokenizer.decode(row_ids[-1:]).strip():
                positions, row_ids = positions[:-1], row_ids[:-1]
        spans.append((positions[0], positions[-1]) if positions else None)
    return spans


def resolve_tokenizer(processor: Any, name_or_path: str) -> Any:
    """The processor the user passed, the built-in one, or one saved beside the model; else ``None``."""
    if processor is not None:
        return processor
    if name_or_path == "builtin:tiny-llava":
        from ..builtin.tiny_llava import build_processor

        return build_processor()
    if name_or_path.startswith("builtin:"):
        from ..builtin import load_model

        try:
            return load_model(name_or_path)[1]
        except ValueError:
            return None
    try:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(name_or_path, local_files_only=True)
    except Exception as exc:
        log.debug("mitigate: no processor found for %s: %s", name_or_path, exc)
        return None
