"""Tokenising and singularising captions as CHAIR's reference code does, with no downloaded data.

The reference (LisaAnne/Hallucination ``utils/chair.py``) calls ``nltk.word_tokenize`` and
``pattern.en.singularize``. ``word_tokenize`` needs NLTK's downloaded ``punkt_tab`` model; it is a Punkt
sentence split followed by ``NLTKWordTokenizer`` per sentence, and an untrained ``PunktSentenceTokenizer``
needs no data. It differs from the trained English model only on abbreviations ("mr.", "st."), which
leaves a caption's word list unchanged apart from such dots.

``textblob.en.inflect.singularize`` is a copy of pattern's rules (pattern itself tries to download
WordNet on import). It keeps pattern's quirks that matter for CHAIR: ``bus -> bu`` (so "a bus" is no
mention, "buses" is), ``glass -> glas``, ``ties -> ty``, ``tennis -> tenni``, ``people -> person``. It differs
from pattern on four COCO-relevant plurals, which :data:`PATTERN_FIXES` restores to pattern's output:
``airbuses`` (textblob: bus; pattern: airbus, an airplane), ``minibuses`` (bus; pattern: minibus),
``collies`` and ``doggies`` (collie, doggie; pattern leaves both unchanged, so neither is a dog). Known
differences that touch no COCO word are left as they are: ``as``, ``jeans``, ``christmas``, ``cookies``,
``veggies``.
"""

from __future__ import annotations

from functools import cache

from nltk.tokenize import NLTKWordTokenizer, PunktSentenceTokenizer
from textblob.en.inflect import singularize as _textblob_singularize

PATTERN_FIXES = {"airbuses": "airbus", "minibuses": "minibus", "collies": "collies", "doggies": "doggies"}

_SENTENCES = PunktSentenceTokenizer()
_WORDS = NLTKWordTokenizer()


def tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text)`` without NLTK data."""
    return [token for sentence in _SENTENCES.tokenize(text) for token in _WORDS.tokenize(sentence)]


@cache
def singularize(word: str) -> str:
    """pattern.en's ``singularize`` (through textblob's copy of its rules, with :data:`PATTERN_FIXES`)."""
    return PATTERN_FIXES.get(word) or _textblob_singularize(word)
