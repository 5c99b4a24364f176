"""POPE: question building from COCO annotations, the official question files, answer parsers, metrics.

Building follows the released POPE code (RUCAIBox/POPE ``main.py``/``utils.py``): images with at least 3
distinct categories; per image, its first 3 objects each followed by one negative that is not in the image
and not yet used for the image (yes, no, yes, no, yes, no). Negatives: ``random`` (uniform over the pool of
categories seen in the sampled images), ``popular`` (the pool by how many sampled images contain each,
most first), ``adversarial`` (the objects most often in the same sampled image as the positive); popular
and adversarial fall back to random when their list runs out. Sorts are stable (ties keep first
appearance). Differences, all ours by necessity or on purpose:

* the released code is not seeded; here the image draw and the random negatives are seeded;
* an image's "first 3 objects" come from a list whose order is lost; we use annotation order (the first
  appearance of each category in ``instances_*.json``);
* a random negative is drawn uniformly among the allowed candidates (the released code re-draws until it
  hits one: the same distribution) and a clear error replaces an endless loop when there is none;
* the article is right ("an umbrella") and the text has no "imange" typo.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .jsonl import JsonlError, read_jsonl

SPLITS = ("random", "popular", "adversarial")
PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."
_FILE_SPLIT = re.compile(r"coco_pope_(random|popular|adversarial)")


@dataclass(frozen=True)
class PopeQuestion:
    split: str
    question_id: int
    image: str  # file name, as in the official files: COCO_val2014_000000310196.jpg
    text: str
    label: str  # "yes" or "no"
    object: str | None = None

    @property
    def sample_id(self) -> str:
        return f"{self.split}/{self.question_id}"

    def official(self) -> dict[str, Any]:
        """The line as the official files write it (plus the object, which they lack)."""
        out = {"question_id": self.question_id, "image": self.image, "text": self.text, "label": self.label}
        if self.object is not None:
            out["object"] = self.object
        return out


def question_text(obj: str) -> str:
    article = "an" if obj[:1].lower() in "aeiou" else "a"
    return f"Is there {article} {obj} in the image?"


def seeded_order(ids: Iterable[int], seed: int) -> list[int]:
    """A seeded shuffle that is the same on every machine and Python version (hash order of the ids)."""
    return sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())


def check_splits(splits: Iterable[str]) -> list[str]:
    out = list(splits)
    for split in out:
        if split not in SPLITS:
            raise ValueError(f"unknown POPE split {split!r}; choose from {', '.join(SPLITS)}")
    return out


def build_questions(
    objects: dict[int, list[str]],
    file_names: dict[int, str],
    *,
    n_images: int = 500,
    seed: int = 0,
    splits: Iterable[str] = SPLITS,
    num_positive: int = 3,
) -> dict[str, list[PopeQuestion]]:
    """The POPE splits from per-image object lists (distinct names, in the order that defines "first")."""
    splits = check_splits(splits)
    eligible = [i for i, objs in objects.items() if len(set(objs)) >= num_positive]
    images = seeded_order(eligible, seed)[:n_images]
    if not images:
        raise ValueError(f"no image has at least {num_positive} distinct annotated categories")

    # Statistics over the sampled images only, as the released code computes them.
    counts: dict[str, int] = {}
    co_occur: dict[str, dict[str, int]] = {}
    for image in images:
        objs = list(dict.fromkeys(objects[image]))
        for obj in objs:
            counts[obj] = counts.get(obj, 0) + 1
            row = co_occur.setdefault(obj, {})
            for other in objs:
                if other != obj:
                    row[other] = row.get(other, 0) + 1
    pool = list(counts)
    popular = [o for o, _ in sorted(counts.items(), key=lambda kv: kv[1], reverse=True)]  # stable
    adversarial = {
        o: [x for x, _ in sorted(row.items(), key=lambda kv: kv[1], reverse=True)]
        for o, row in co_occur.items()
    }

    out: dict[str, list[PopeQuestion]] = {}
    for split in splits:
        rng = random.Random(f"pope:{seed}:{split}")
        questions: list[PopeQuestion] = []
        for image in images:
            objs = list(dict.fromkeys(objects[image]))
            history: set[str] = set()
            for positive in objs[:num_positive]:
                history.add(positive)
                negative = _negative(split, positive, objs, history, pool, popular, adversarial, rng, image)
                history.add(negative)
                for obj, label in ((positive, "yes"), (negative, "no")):
                    questions.append(
                        PopeQuestion(
                            split, len(questions) + 1, file_names[image], question_text(obj), label, obj
                        )
                    )
        out[split] = questions
    return out


def _negative(split, positive, objs, history, pool, popular, adversarial, rng, image) -> str:
    def allowed(obj: str) -> bool:
        return obj not in history and obj not in objs

    ranked = (
        popular if split == "popular" else adversarial.get(positive, []) if split == "adversarial" else []
    )
    for obj in ranked:
        if allowed(obj):
            return obj
    candidates = [o for o in pool if allowed(o)]
    if not candidates:
        raise ValueError(
            f"image {image}: no category left to ask about as a negative (pool of {len(pool)} categories)"
        )
    return rng.choice(candidates)


def split_from_path(path: Path) -> str:
    """``coco_pope_random.json`` -> ``random``; other names give their stem."""
    match = _FILE_SPLIT.search(Path(path).name)
    return match.group(1) if match else Path(path).stem


def load_questions(path: Path, split: str | None = None) -> list[PopeQuestion]:
    """An official question file (JSON lines despite ``.json``; CRLF or LF; 2910 or 3000 lines)."""
    path = Path(path)
    split = split or split_from_path(path)
    questions, seen = [], set()
    for record in read_jsonl(path, required=("question_id", "image", "text", "label")):
        label = str(record["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise JsonlError(
                f"{path}: question {record['question_id']}: label {record['label']!r} is not yes/no"
            )
        qid = int(record["question_id"])
        if qid in seen:
            raise JsonlError(f"{path}: question_id {qid} appears twice")
        seen.add(qid)
        questions.append(
            PopeQuestion(split, qid, record["image"], record["text"], label, record.get("object"))
        )
    if not questions:
        raise JsonlError(f"{path}: no questions")
    return questions


def file_digest(path: Path) -> dict[str, Any]:
    data = Path(path).read_bytes()
    n = sum(1 for line in data.splitlines() if line.strip())
    note = {2910: "2023-05 version (LLaVA-1.5's published numbers)", 3000: "3000-question version"}.get(n)
    out = {"path": str(path), "sha256": hashlib.sha256(data).hexdigest(), "questions": n}
    if note:
        out["version"] = note
    return out


# -- answer parsers ---------------------------------------------------------------------------------
# Each returns "yes", "no", or None for an answer it refuses to read (only ``strict`` does).


def parse_pope(text: str, label: str | None = None) -> str:
    """POPE ``evaluate.py`` = LLaVA ``eval_pope.py``: the text before the first '.', commas dropped,
    split on single spaces; No/not/no among the words -> no, otherwise yes (so "" and "Nope" are yes)."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def parse_opera(text: str, label: str | None = None) -> str:
    """OPERA ``pope_eval.py``: the whole answer, every '.' and ',' dropped; No/not/no/NO or a word ending
    in n't -> no, otherwise yes."""
    words = text.replace(".", "").replace(",", "").split(" ")
    negative = any(w in ("No", "not", "no", "NO") for w in words) or any(w.endswith("n't") for w in words)
    return "no" if negative else "yes"


def parse_vcd(text: str, label: str | None = None) -> str:
    """VCD ``eval_pope.py``: label-dependent substring test on the lowercased answer. A yes-label is
    right when "yes" occurs anywhere, a no-label when "no" does, so "snowboard" or "I don't know"
    count as no. Needs the label; reproduces VCD's numbers, artefacts included."""
    if label is None:
        raise ValueError("the vcd parser needs the question's label")
    gen = text.lower().strip()
    if label == "yes":
        return "yes" if "yes" in gen else "no"
    return "no" if "no" in gen else "yes"


def parse_strict(text: str, label: str | None = None) -> str | None:
    """Exactly yes or no (any case, optional final '.' or '!'); anything else is unreadable and wrong."""
    word = text.strip().strip("\"'").rstrip(".!").strip().lower()
    return word if word in ("yes", "no") else None


PARSERS: dict[str, Callable[[str, str | None], str | None]] = {
    "pope": parse_pope,
    "opera": parse_opera,
    "vcd": parse_vcd,
    "strict": parse_strict,
}


def get_parser(name: str) -> Callable[[str, str | None], str | None]:
    if name not in PARSERS:
        raise ValueError(f"unknown POPE parser {name!r}; choose from {', '.join(PARSERS)}")
    return PARSERS[name]


# -- metrics ----------------------------------------------------------------------------------------
COUNTS = ("tp", "fp", "tn", "fn", "invalid_yes", "invalid_no")
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def count_vector(label: str, pred: str | None) -> np.ndarray:
    """One answer as counts: yes is the positive class; an unreadable answer is wrong for either label."""
    out = np.zeros(len(COUNTS))
    if pred is None:
        out[COUNTS.index("invalid_yes" if label == "yes" else "invalid_no")] = 1
    elif label == "yes":
        out[COUNTS.index("tp" if pred == "yes" else "fn")] = 1
    else:
        out[COUNTS.index("fp" if pred == "yes" else "tn")] = 1
    return out


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def metrics_from_counts(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics from count vectors ``[..., 6]`` (vectorised over leading dims, for the bootstrap).

    precision = TP / predicted yes; recall = TP / yes labels (unreadable answers included);
    accuracy = (TP + TN) / all; yes_ratio = predicted yes / all (from predictions, not labels).
    """
    tp, fp, tn, fn, inv_yes, inv_no = np.moveaxis(np.asarray(counts, dtype=float), -1, 0)
    n = tp + fp + tn + fn + inv_yes + inv_no
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn + inv_yes)
    return {
        "accuracy": _ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(tp + fp, n),
    }


def summarize(counts_by_split: dict[str, np.ndarray]) -> dict[str, Any]:
    """``{split: {accuracy, precision, recall, f1, yes_ratio}, ..., "mean_f1": x}`` (floats or arrays)."""
    out: dict[str, Any] = {}
    for split, counts in counts_by_split.items():
        out[split] = metrics_from_counts(counts)
    out["mean_f1"] = np.mean([out[s]["f1"] for s in counts_by_split], axis=0)
    return out


def score_answers(
    questions: list[PopeQuestion], answers: dict[str, str], parser: str = "pope"
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, dict[str, int]]]:
    """Per-question records, metrics and raw counts, for answers keyed by ``sample_id``."""
    parse = get_parser(parser)
    records, counts = [], {}
    for q in questions:
        text = answers[q.sample_id]
        pred = parse(text, q.label)
        records.append(
            {
                "sample_id": q.sample_id,
                "split": q.split,
                "question_id": q.question_id,
                "image": q.image,
                "question": q.text,
                "label": q.label,
                "text": text,
                "pred": pred,
            }
        )
        counts[q.split] = counts.get(q.split, np.zeros(len(COUNTS))) + count_vector(q.label, pred)
    metrics = to_floats(summarize(counts))
    raw = {s: {k: int(v) for k, v in zip(COUNTS, c, strict=True)} for s, c in counts.items()}
    return records, metrics, raw


def to_floats(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: to_floats(v) for k, v in tree.items()}
    return float(tree)
