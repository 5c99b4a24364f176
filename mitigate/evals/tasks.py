"""Tasks in a small registry, with lmms-eval's verbs: build the docs, prompt one doc, process one answer
into a per-sample record, aggregate records into metrics.

Aggregation goes through per-sample stat vectors summed per stratum (POPE: per split), so the metrics, the
``score`` commands and the paired bootstrap of ``report`` all compute from one function.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from . import chair as chair_mod
from . import pope as pope_mod
from .coco import CocoData, CocoSetupError
from .jsonl import JsonlError, read_records
from .runner import Sample
from .synonyms import load_table


class Task(ABC):
    name: ClassVar[str]
    default_max_new_tokens: ClassVar[int]

    @abstractmethod
    def docs(self) -> list[Any]: ...

    @abstractmethod
    def sample(self, doc: Any) -> Sample: ...

    @abstractmethod
    def process(self, doc: Any, text: str) -> dict[str, Any]:
        """One answer as a per-sample record (with ``sample_id``)."""

    def before_generating(self, pending: int) -> None:
        """Called once the run knows how many answers it still has to generate, before the first one (a
        task that needs a service to score them checks it here; nothing to generate, nothing to check)."""
        return None

    def process_all(self, pairs: list[tuple[Any, str]]) -> list[dict[str, Any]]:
        """Every answer as a record; a task that scores answers together (Tri-HE's judge calls) overrides."""
        return [self.process(doc, text) for doc, text in pairs]

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """What the results must say about the data and scoring choices."""

    @staticmethod
    @abstractmethod
    def stats(record: dict[str, Any]) -> tuple[str, np.ndarray]:
        """(stratum, stat vector) of one record."""

    @staticmethod
    @abstractmethod
    def metrics(sums: dict[str, np.ndarray]) -> dict[str, Any]:
        """Metrics from stat sums per stratum (arrays may carry leading resample dims)."""

    @classmethod
    def aggregate(cls, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
        sums: dict[str, np.ndarray] = {}
        for record in records:
            stratum, vector = cls.stats(record)
            sums[stratum] = sums.get(stratum, 0) + vector
        if not sums:
            raise ValueError("no scored samples")
        return pope_mod.to_floats(cls.metrics(sums))


@dataclass
class PopeTask(Task):
    name: ClassVar[str] = "pope"
    default_max_new_tokens: ClassVar[int] = 16

    data: CocoData | None
    splits: list[str] | None = None
    questions: list[Path] = field(default_factory=list)
    n_images: int = 500
    seed: int = 0
    parser: str = "pope"
    limit: int | None = None
    suffix: str = pope_mod.PROMPT_SUFFIX

    def __post_init__(self) -> None:
        pope_mod.get_parser(self.parser)  # fail early on an unknown parser
        if self.splits is not None:
            pope_mod.check_splits(self.splits)
        self._docs: list[pope_mod.PopeQuestion] | None = None

    def docs(self) -> list[pope_mod.PopeQuestion]:
        if self._docs is not None:
            return self._docs
        by_split: dict[str, list[pope_mod.PopeQuestion]] = {}
        if self.questions:
            for path in self.questions:
                split = pope_mod.split_from_path(path)
                if split in by_split:
                    raise ValueError(f"two question files for split {split!r} ({path})")
                by_split[split] = pope_mod.load_questions(path, split)
            if self.splits is not None:
                by_split = {s: by_split[s] for s in self.splits if s in by_split}
        else:
            if self.data is None:
                raise CocoSetupError("POPE needs COCO data to build questions (or --questions files)")
            objects = self.data.objects("val2014")
            names = {i: img["file_name"] for i, img in self.data.coco("instances", "val2014").imgs.items()}
            by_split = pope_mod.build_questions(
                objects, names, n_images=self.n_images, seed=self.seed, splits=self.splits or pope_mod.SPLITS
            )
        if not by_split:
            raise ValueError("no POPE questions selected")
        self._docs = [q for qs in by_split.values() for q in qs[: self.limit]]
        return self._docs

    def sample(self, doc: pope_mod.PopeQuestion) -> Sample:
        data = self.data
        if data is None:
            raise CocoSetupError("POPE generation needs images: give --coco-root or --data builtin:sample")
        return Sample(doc.sample_id, doc.text + self.suffix, lambda: data.load_image(doc.image))

    def check(self) -> None:
        if self.data is not None:
            self.data.check_images([d.image for d in self.docs()])

    def process(self, doc: pope_mod.PopeQuestion, text: str) -> dict[str, Any]:
        pred = pope_mod.get_parser(self.parser)(text, doc.label)
        return {
            "sample_id": doc.sample_id,
            "split": doc.split,
            "question_id": doc.question_id,
            "image": doc.image,
            "question": doc.text,
            "label": doc.label,
            "text": text,
            "pred": pred,
        }

    def info(self) -> dict[str, Any]:
        docs = self.docs()
        splits = list(dict.fromkeys(d.split for d in docs))
        out: dict[str, Any] = {
            "parser": self.parser,
            "splits": splits,
            "prompt_suffix": self.suffix,
            "limit_per_split": self.limit,
        }
        if self.questions:
            out["questions"] = [pope_mod.file_digest(p) for p in self.questions]
        else:
            out["questions"] = {
                "built_from": "instances_val2014.json",
                "images": self.n_images,
                "seed": self.seed,
                "object_order": "annotation order",
            }
        if self.data is not None:
            out["data"] = self.data.label
        return out

    @staticmethod
    def stats(record: dict[str, Any]) -> tuple[str, np.ndarray]:
        return record["split"], pope_mod.count_vector(record["label"], record["pred"])

    @staticmethod
    def metrics(sums: dict[str, np.ndarray]) -> dict[str, Any]:
        ordered = {
            s: sums[s] for s in [*pope_mod.SPLITS, *sorted(set(sums) - set(pope_mod.SPLITS))] if s in sums
        }
        return pope_mod.summarize(ordered)


@dataclass
class ChairTask(Task):
    name: ClassVar[str] = "chair"
    default_max_new_tokens: ClassVar[int] = 512

    data: CocoData
    synonyms: Path | None = None
    image_ids: Path | None = None
    ids: list[int] | None = None  # explicit ids (the images of a caption file), before image_ids
    n_images: int = 500
    seed: int = 0
    limit: int | None = None
    prompt: str = chair_mod.PROMPT

    def __post_init__(self) -> None:
        self.table = load_table(self.synonyms)
        self.chair = chair_mod.Chair(self.table)
        self._docs: list[int] | None = None
        self._gt: dict[int, set[str]] | None = None
        self._files: dict[int, str] = {}

    def docs(self) -> list[int]:
        if self._docs is None:
            if self.ids is not None:
                ids = list(self.ids)
            elif self.image_ids is not None:
                ids = read_image_ids(self.image_ids)
            else:
                ids = chair_mod.seeded_image_ids(self.data.image_ids("val2014"), self.n_images, self.seed)
            self._docs = ids[: self.limit]
        return self._docs

    def ground_truth(self) -> dict[int, set[str]]:
        if self._gt is None:
            self._gt = self.chair.ground_truth(self.data, self.docs())
        return self._gt

    def file_name(self, image_id: int) -> str:
        if image_id not in self._files:
            self._files[image_id] = self.data.file_name(
                image_id, self.data.split_of_image(image_id) or "val2014"
            )
        return self._files[image_id]

    def check(self) -> None:
        self.ground_truth()  # annotation problems surface before any generation
        self.data.check_images([self.file_name(i) for i in self.docs()])

    def sample(self, doc: int) -> Sample:
        return Sample(str(doc), self.prompt, lambda: self.data.load_image(self.file_name(doc)))

    def process(self, doc: int, text: str) -> dict[str, Any]:
        return {
            "sample_id": str(doc),
            "image_id": doc,
            "caption": text,
            **self.chair.score_caption(text, self.ground_truth()[doc]),
        }

    def info(self) -> dict[str, Any]:
        return {
            "synonyms": self.table.source,
            "prompt": self.prompt,
            "data": self.data.label,
            "images": {"file": str(self.image_ids)}
            if self.image_ids
            else {"seeded_draw_over": "sorted val2014 ids", "n": self.n_images, "seed": self.seed},
            "limit": self.limit,
        }

    @staticmethod
    def stats(record: dict[str, Any]) -> tuple[str, np.ndarray]:
        return "all", chair_mod.stat_vector(record)

    @staticmethod
    def metrics(sums: dict[str, np.ndarray]) -> dict[str, Any]:
        return chair_mod.metrics_from_stats(sums["all"])


TASKS: dict[str, type[Task]] = {"pope": PopeTask, "chair": ChairTask}


def scoring_of(info: dict[str, Any]) -> dict[str, Any]:
    """What makes a run's scoring what it is, from its ``task_info``: POPE's parser, CHAIR's synonym table
    (by content, not path), Tri-HE's judge and extraction models and prompt version (not the endpoint's
    URL: one model at localhost or at 127.0.0.1 is one scoring). Another scoring moves every number, so
    a run folder refuses it and ``mitigate report`` refuses to compare across it."""
    judge = info.get("judge")
    if isinstance(judge, dict):
        extractor = judge.get("extractor") or {}
        return {
            "judge": judge.get("kind"),
            "judge_model": judge.get("model"),
            "extraction_model": extractor.get("model"),
            "prompts": extractor.get("prompts"),
        }
    if "parser" in info:
        return {"parser": info["parser"]}
    table = info.get("synonyms") or {}
    return {"synonyms": table.get("table"), "sha256": table.get("sha256")}


def scoring_label(info: dict[str, Any]) -> str:
    """:func:`scoring_of` in words, as reports show it."""
    scoring = scoring_of(info)
    if "judge" in scoring:
        kind = "local NLI" if scoring["judge"] == "local-nli" else "LLM"
        return (
            f"judge {kind} {scoring['judge_model']}; extraction by {scoring['extraction_model']}, "
            f"prompts {scoring['prompts']}"
        )
    if "parser" in scoring:
        return f"parser {scoring['parser']}"
    return f"synonyms {scoring['synonyms']} {scoring['sha256'] or ''}".strip()


def task_class(name: str) -> type[Task]:
    from . import trihe  # noqa: F401  (registers "trihe"; imported here, as it imports this module)

    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]


def read_image_ids(path: Path) -> list[int]:
    """``--image-ids``: JSON lines with ``image_id`` (e.g. a caption file), a JSON list, or whitespace- or
    comma-separated integers. Order kept, duplicates dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--image-ids {path}: no such file")
    text = path.read_text().strip()
    if text.startswith("{") or (text.startswith("[") and "{" in text[:200]):
        ids = [r["image_id"] for r in read_records(path, required=("image_id",))]
    elif text.startswith("["):
        ids = json.loads(text)
    else:
        ids = text.replace(",", " ").split()
    try:
        out = [int(i) for i in ids]
    except (TypeError, ValueError) as error:
        raise JsonlError(f"{path}: image ids must be integers ({error})") from None
    return list(dict.fromkeys(out))
