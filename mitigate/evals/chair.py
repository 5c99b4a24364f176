"""CHAIR: object mentions in captions against COCO ground truth (instances plus reference captions).

Semantics of the reference (LisaAnne/Hallucination ``utils/chair.py``), step by step:

1. lowercase, tokenise (``nltk.word_tokenize``), singularise every token (pattern's rules; see
   :mod:`.words`);
2. merge pairs greedily left to right when ``w[i] + " " + w[i+1]`` is a key of the double-word map:
   :data:`DOUBLE_WORDS` map to themselves, "baby/adult <animal>" to the animal, "passenger <jet/train>" to
   the vehicle, and "bow tie" -> tie, "toilet seat" -> toilet, "wine glas" -> wine glass (pattern's
   ``glass -> glas``);
3. if "toilet" and "seat" are both in the caption, every "seat" is dropped;
4. keep the tokens that are synonym-table entries and map them to their class ("node word").

Every mention counts, repeats included. CHAIR_i = hallucinated mentions / mentions (over all captions);
CHAIR_s = captions with a hallucinated mention / captions. Two more, as OPERA computes them (its
``chair.py``): recall = sum over captions of |distinct mentioned classes in the ground truth| / sum of
|ground truth|; length = mean number of tokens after merging, punctuation included.

The ground truth of an image = the classes of its instance annotations (the category name looked up in
the table) plus the classes its reference captions mention (through the same steps).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .coco import CocoData, CocoSetupError
from .synonyms import SynonymTable

PROMPT = "Please describe this image in detail."

# The reference list, in its order (duplicates and all: they change nothing).
DOUBLE_WORDS = [
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat",
    "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear",
    "hair drier", "potted plant", "bow tie", "laptop computer", "stove top oven", "hot dog", "teddy bear",
    "home plate", "train track",
]  # fmt: skip
ANIMAL_WORDS = ["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"]
ANIMAL_WORDS += ["animal", "cub"]
VEHICLE_WORDS = ["jet", "train"]
OVERRIDES = {"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"}


def seeded_image_ids(all_ids: list[int], n: int, seed: int = 0) -> list[int]:
    """The CHAIR images: a seeded draw over the sorted ids, the same on every machine (hash order)."""
    ordered = sorted(all_ids, key=lambda i: hashlib.sha256(f"chair:{seed}:{i}".encode()).digest())
    return ordered[:n]


@dataclass(frozen=True)
class CaptionWords:
    words: list[str]  # the table entries found (after merging)
    nodes: list[str]  # their classes, one per mention
    tokens: list[str]  # every token after merging (before the toilet-seat rule), punctuation included


class Chair:
    """Caption parsing against one synonym table."""

    def __init__(self, table: SynonymTable):
        try:  # imported here so that POPE runs without the [evals] extras
            from .words import singularize, tokenize
        except ImportError as error:
            raise ImportError(
                f"CHAIR needs nltk and textblob ({error.name} is missing): pip install 'mitigate[evals]'"
            ) from error
        self._singularize, self._tokenize = singularize, tokenize
        self.table = table
        self.entries = table.entries
        self.inverse = table.inverse
        merges = {w: w for w in [*DOUBLE_WORDS, *table.extra_merges]}
        for animal in ANIMAL_WORDS:
            merges[f"baby {animal}"] = animal
            merges[f"adult {animal}"] = animal
        for vehicle in VEHICLE_WORDS:
            merges[f"passenger {vehicle}"] = vehicle
        merges.update(OVERRIDES)
        self.merges = merges

    def caption_words(self, caption: str) -> CaptionWords:
        tokens = [self._singularize(w) for w in self._tokenize(caption.lower())]
        merged, i = [], 0
        while i < len(tokens):
            pair = " ".join(tokens[i : i + 2])
            if i + 1 < len(tokens) and pair in self.merges:
                merged.append(self.merges[pair])
                i += 2
            else:
                merged.append(tokens[i])
                i += 1
        words = merged
        if "toilet" in words and "seat" in words:
            words = [w for w in words if w != "seat"]
        words = [w for w in words if w in self.entries]
        return CaptionWords(words, [self.inverse[w] for w in words], merged)

    def ground_truth(self, data: CocoData, image_ids: list[int]) -> dict[int, set[str]]:
        """Per image: instance classes plus classes mentioned by its reference captions."""
        wanted = set(image_ids)
        by_split: dict[str, list[int]] = {}
        missing = []
        for image_id in wanted:
            split = data.split_of_image(image_id)
            if split is None:
                missing.append(image_id)
            else:
                by_split.setdefault(split, []).append(image_id)
        if missing:
            train = data.annotation_path("instances", "train2014")
            raise CocoSetupError(
                f"{len(missing)} image id(s) are not in {data.annotation_path('instances', 'val2014')}"
                + ("" if data.has("instances", "train2014") else f" (and {train} is absent)")
                + f": {sorted(missing)[:5]}"
            )
        gt: dict[int, set[str]] = {i: set() for i in wanted}
        for split, ids in by_split.items():
            objects = data.objects(split)
            for image_id in ids:
                for name in objects.get(image_id, []):
                    if name not in self.inverse:
                        raise CocoSetupError(
                            f"category {name!r} of {data.annotation_path('instances', split)} is not in the "
                            f"synonym table ({self.table.source.get('table')})"
                        )
                    gt[image_id].add(self.inverse[name])
            captions = data.reference_captions(split)
            for image_id in ids:
                for caption in captions.get(image_id, []):
                    gt[image_id].update(self.caption_words(caption).nodes)
        return gt

    def score_caption(self, caption: str, gt: set[str]) -> dict[str, Any]:
        """One caption's mentions and what is hallucinated, as a per-sample record."""
        found = self.caption_words(caption)
        hallucinated = [(w, n) for w, n in zip(found.words, found.nodes, strict=True) if n not in gt]
        return {
            "mentions": [[w, n] for w, n in zip(found.words, found.nodes, strict=True)],
            "hallucinated": [[w, n] for w, n in hallucinated],
            "ground_truth": sorted(gt),
            "recalled": sorted(set(found.nodes) & gt),
            "length": len(found.tokens),
        }


STATS = (
    "captions",
    "hallucinated_captions",
    "mentions",
    "hallucinated_mentions",
    "recalled",
    "ground_truth",
    "length",
)
METRICS = ("chair_s", "chair_i", "recall", "length")


def stat_vector(record: dict[str, Any]) -> np.ndarray:
    return np.array(
        [
            1.0,
            float(bool(record["hallucinated"])),
            len(record["mentions"]),
            len(record["hallucinated"]),
            len(record["recalled"]),
            len(record["ground_truth"]),
            record["length"],
        ]
    )


def metrics_from_stats(sums: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics from summed stat vectors ``[..., 7]`` (vectorised for the bootstrap)."""
    s = np.moveaxis(np.asarray(sums, dtype=float), -1, 0)
    caps, hcaps, mentions, hmentions, recalled, gt, length = s

    def ratio(a, b):
        return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b > 0)

    return {
        "chair_s": ratio(hcaps, caps),
        "chair_i": ratio(hmentions, mentions),
        "recall": ratio(recalled, gt),
        "length": ratio(length, caps),
    }
