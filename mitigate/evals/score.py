"""Scoring answers from any source: ``mitigate score pope`` and ``mitigate score chair``.

POPE answers are JSON lines with ``question_id`` and ``text``, matched to questions by id, never by
position. With question files of several splits, an answer says its split with ``split`` (or LLaVA's
``category``), unless its id is in one file only; alternatively give one answer file per question file,
in the same order. CHAIR captions are JSON lines (or a JSON list) with ``image_id`` and ``caption``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import pope as pope_mod
from .coco import CocoData
from .jsonl import JsonlError, iter_lines, read_records
from .tasks import ChairTask, PopeTask


def _pope_answers(path: Path, splits: dict[str, set[int]], only: str | None) -> dict[str, str]:
    """Answers keyed by ``split/question_id``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    out: dict[str, str] = {}
    for number, record in iter_lines(path):
        where = f"{path}:{number}"
        if "question_id" not in record or "text" not in record:
            raise JsonlError(f"{where}: an answer needs question_id and text (has {', '.join(record)})")
        try:
            qid = int(record["question_id"])
        except (TypeError, ValueError):
            raise JsonlError(f"{where}: question_id {record['question_id']!r} is not an integer") from None
        split = only or record.get("split") or record.get("category")
        if split is None:
            holders = [s for s, ids in splits.items() if qid in ids]
            if len(holders) > 1:
                raise JsonlError(
                    f"{where}: question_id {qid} is in several question files ({', '.join(holders)}); add "
                    "a 'split' field to the answers, or give one --answers file per --questions file"
                )
            split = holders[0] if holders else None
        if split not in splits or qid not in splits[split]:
            raise JsonlError(f"{where}: no question {qid} in split {split!r} of the question files")
        key = f"{split}/{qid}"
        if key in out:
            raise JsonlError(f"{where}: a second answer to question {qid} ({split})")
        out[key] = str(record["text"])
    return out


def score_pope(
    questions: list[Path], answers: list[Path], parser: str = "pope"
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics JSON, per-question records)."""
    pope_mod.get_parser(parser)
    task = PopeTask(data=None, questions=list(questions), parser=parser)
    docs = task.docs()
    splits: dict[str, set[int]] = {}
    for q in docs:
        splits.setdefault(q.split, set()).add(q.question_id)
    by_split = list(splits)
    answered: dict[str, str] = {}
    if len(answers) == 1:
        answered = _pope_answers(answers[0], splits, None)
    elif len(answers) == len(questions):
        for path, split in zip(answers, by_split, strict=True):
            answered.update(_pope_answers(path, splits, split))
    else:
        raise ValueError(f"give one --answers file, or one per --questions file ({len(questions)})")
    missing = [q.sample_id for q in docs if q.sample_id not in answered]
    if missing:
        raise ValueError(f"{len(missing)} question(s) have no answer, e.g. {', '.join(missing[:5])}")
    records, metrics, counts = pope_mod.score_answers(docs, answered, parser)
    out = {
        "task": "pope",
        "metrics": metrics,
        "counts": counts,
        "task_info": task.info(),
        "answers": [str(a) for a in answers],
        "n_scored": len(records),
    }
    return out, records


def score_chair(
    captions: Path, data: CocoData, synonyms: Path | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows = read_records(captions, required=("image_id", "caption"))
    seen: set[int] = set()
    for index, row in enumerate(rows, start=1):
        image_id = int(row["image_id"])
        if image_id in seen:
            raise JsonlError(f"{captions}:{index}: a second caption for image {image_id}")
        seen.add(image_id)
    task = ChairTask(data=data, synonyms=synonyms, ids=[int(r["image_id"]) for r in rows])
    records = [task.process(int(r["image_id"]), str(r["caption"])) for r in rows]
    info = task.info() | {"images": {"from": str(captions)}}
    out = {
        "task": "chair",
        "metrics": task.aggregate(records),
        "task_info": info,
        "captions": str(captions),
        "n_scored": len(records),
    }
    return out, records
