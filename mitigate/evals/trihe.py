"""Tri-HE (Unified Triplet-Level Hallucination Evaluation for LVLMs, TMLR 2025; code: wujunjie1998/Tri-HE):
object and relation hallucination, claim by claim.

The data is the released ``tri-he.json``: image id -> ``instance`` (a list of ``{question, answer,
triplet}``), ``triplets`` (the image's reference triplets, strings such as ``"(man, holding, pen)"``),
``all_object`` and ``object``; 300 GQA images, 1,226 questions, the images as ``<image id>.jpg``. For each
answer to a question about an image:

1. its claims are extracted as (subject, predicate, object) triplets (an LLM, :mod:`.judge`);
2. each claim is judged against the image's reference triplets and object list (the LLM, or a local NLI
   model);
3. an unsupported claim is a hallucination, of an object or of the relation.

Per question, the hallucination rate is unsupported claims / judged claims. **Hallu-Q** is its mean over
questions, **Hallu-I** the mean over images of their questions' mean; both also for object-only and
relation-only errors. Where this differs from the released scoring, and why:

- a reply that cannot be read is asked again once and then recorded as a judge error: it is left out of
  the claim count (the released code counts it as supported, lowering the rate) and reported;
- a question with no claim (an empty or claim-free answer) or whose claims all failed to be judged has no
  rate: it is left out, as in the released code, but counted and reported (``task_info.counts``);
- an image whose questions all have no rate is left out of Hallu-I, also counted.

Records are per question. Their stat vectors carry each question's weight in Hallu-I (1 / the number of
rated questions of its image), so Hallu-I is exact on a run, and the paired bootstrap of ``mitigate
report`` resamples questions with those weights.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from .coco import SampleError
from .jsonl import JsonlError, iter_lines
from .judge import (
    TRIPLETS_SHAPE,
    ClaimItem,
    JudgeConfig,
    LLMJudge,
    NLIJudge,
    Verdict,
    ask,
    extraction_messages,
    parse_triplets,
)
from .runner import Sample
from .tasks import TASKS, Task

T = TypeVar("T")
RATES = ("hallu", "object_hallu", "relation_hallu")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class TriheDataError(ValueError):
    """``tri-he.json`` is not in the released format."""


@dataclass(frozen=True)
class TriheQuestion:
    sample_id: str  # "<image id>/<index of the question among the image's instances>"
    image_id: str
    index: int
    question: str
    references: tuple[str, ...]
    objects: tuple[str, ...]


def load_questions(path: Path) -> list[TriheQuestion]:
    """Every question of ``tri-he.json``, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file (the released tri-he.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise TriheDataError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(data, dict) or not data:
        raise TriheDataError(f"{path}: expected an object mapping image ids to entries")
    out = []
    for image_id, entry in data.items():
        where = f"{path}: image {image_id}"
        if not isinstance(entry, dict):
            raise TriheDataError(f"{where}: expected an object")
        missing = [k for k in ("instance", "triplets", "all_object") if k not in entry]
        if missing:
            raise TriheDataError(f"{where}: missing {', '.join(missing)} (has {', '.join(entry)})")
        references = _strings(entry["triplets"], f"{where}: triplets")
        objects = tuple(dict.fromkeys(_strings(entry["all_object"], f"{where}: all_object")))
        if not isinstance(entry["instance"], list):
            raise TriheDataError(f"{where}: instance must be a list")
        for index, instance in enumerate(entry["instance"]):
            if not isinstance(instance, dict) or not isinstance(instance.get("question"), str):
                raise TriheDataError(f"{where}: instance {index} has no question")
            out.append(
                TriheQuestion(
                    f"{image_id}/{index}", str(image_id), index, instance["question"], references, objects
                )
            )
    return out


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TriheDataError(f"{where} must be a list of strings")
    return tuple(value)


# ------------------------------------------------------------------------------------------- scoring


def _run(coroutine: Awaitable[T]) -> T:
    """Run a coroutine from sync code, also where an event loop is already running (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)  # type: ignore[arg-type]
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()  # type: ignore[arg-type]


async def _gather(coroutines: list[Awaitable[T]], bar: tqdm) -> list[T]:
    async def tick(coroutine: Awaitable[T]) -> T:
        result = await coroutine
        bar.update(1)
        return result

    try:
        return list(await asyncio.gather(*(tick(c) for c in coroutines)))
    finally:
        bar.close()


@dataclass
class Scorer:
    """Extracts and judges the claims of many answers at once (bounded concurrency); one per run."""

    judge: JudgeConfig
    progress: bool = True
    nli: NLIJudge | None = None
    calls: int = 0
    cache_hits: int = 0

    def local(self) -> NLIJudge | None:
        if self.judge.local_spec and self.nli is None:
            self.nli = NLIJudge(self.judge.local_spec)
        return self.nli

    def score(self, pairs: list[tuple[TriheQuestion, str]]) -> list[dict[str, Any]]:
        self.judge.check()
        nli = self.local()
        return _run(self._score(pairs, nli))

    async def _score(
        self, pairs: list[tuple[TriheQuestion, str]], nli: NLIJudge | None
    ) -> list[dict[str, Any]]:
        async with self.judge.endpoint() as endpoint:

            async def extract(text: str) -> tuple[Any, str | None, list[str]]:
                if not text.strip():
                    return [], None, []  # nothing said, nothing claimed: no call
                return await ask(endpoint, extraction_messages(text), parse_triplets, TRIPLETS_SHAPE)

            extracted = await _gather(
                [extract(text) for _, text in pairs],
                tqdm(total=len(pairs), desc="tri-he: extracting claims", disable=not self.progress),
            )
            items = [
                ClaimItem(tuple(claim), doc.references, doc.objects)
                for (doc, _), (claims, _, _) in zip(pairs, extracted, strict=True)
                for claim in claims or []
            ]
            if nli is not None:
                verdicts = nli.judge_sync(items)
            else:
                judge = LLMJudge(endpoint)
                verdicts = await _gather(
                    [judge.judge([item]) for item in items],
                    tqdm(total=len(items), desc="tri-he: judging claims", disable=not self.progress),
                )
                verdicts = [v[0] for v in verdicts]
            self.calls += endpoint.calls
            self.cache_hits += endpoint.cache_hits
        records = []
        position = 0
        for (doc, text), (claims, error, replies) in zip(pairs, extracted, strict=True):
            claims = claims or []
            mine = verdicts[position : position + len(claims)]
            position += len(claims)
            records.append(question_record(doc, text, claims, mine, error, replies))
        return with_image_weights(records)


def question_record(
    doc: TriheQuestion,
    text: str,
    claims: list[list[str]],
    verdicts: list[Verdict],
    extraction_error: str | None = None,
    extraction_replies: list[str] | None = None,
) -> dict[str, Any]:
    judged = [v for v in verdicts if v.verdict is not None]
    counts = Counter((v.verdict, v.error) for v in judged)
    hallucinated = counts[("no", "object")] + counts[("no", "relation")]
    record: dict[str, Any] = {
        "sample_id": doc.sample_id,
        "image_id": doc.image_id,
        "question": doc.question,
        "text": text,
        "claims": [{"claim": c, **v.as_dict()} for c, v in zip(claims, verdicts, strict=True)],
        "n_claims": len(claims),
        "n_judged": len(judged),
        "n_hallucinated": hallucinated,
        "n_object": counts[("no", "object")],
        "n_relation": counts[("no", "relation")],
        "n_judge_errors": len(verdicts) - len(judged),
        "status": "rated",
    }
    if extraction_error is not None:
        record["status"] = "extraction_error"
        record["extraction_error"] = extraction_error
        record["extraction_replies"] = extraction_replies or []
    elif not claims:
        record["status"] = "no_claims"
    elif not judged:
        record["status"] = "judge_errors"
    n = len(judged)
    for name, count in zip(RATES, (hallucinated, record["n_object"], record["n_relation"]), strict=True):
        record[name] = count / n if n else None
    return record


def with_image_weights(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each rated question's weight in Hallu-I: 1 / the number of rated questions of its image."""
    rated = Counter(r["image_id"] for r in records if r["n_judged"])
    for r in records:
        r["image_weight"] = 1.0 / rated[r["image_id"]] if r["n_judged"] else 0.0
    return records


def count_records(records: Iterable[dict[str, Any]]) -> dict[str, int]:
    records = list(records)
    statuses = Counter(r["status"] for r in records)
    images = {r["image_id"] for r in records}
    rated_images = {r["image_id"] for r in records if r["n_judged"]}
    return {
        "questions": len(records),
        "questions_rated": statuses["rated"],
        "questions_without_claims": statuses["no_claims"],
        "questions_extraction_error": statuses["extraction_error"],
        "questions_all_claims_judge_error": statuses["judge_errors"],
        "images": len(images),
        "images_rated": len(rated_images),
        "claims": sum(r["n_claims"] for r in records),
        "claims_judged": sum(r["n_judged"] for r in records),
        "claims_judge_error": sum(r["n_judge_errors"] for r in records),
    }


def first_error(records: Iterable[dict[str, Any]]) -> str | None:
    """The first extraction or judge error of a run, with its question: what to read when nothing could
    be rated."""
    for r in records:
        if r.get("extraction_error"):
            return f"question {r['sample_id']}: extraction {r['extraction_error']}"
        for claim in r.get("claims", []):
            if claim.get("judge_error"):
                return f"question {r['sample_id']}: judging {claim['judge_error']}"
    return None


def counts_note(counts: dict[str, int]) -> str:
    return (
        f"{counts['questions_rated']} of {counts['questions']} questions rated "
        f"({counts['images_rated']} of {counts['images']} images); "
        f"{counts['questions_without_claims']} without claims, {counts['questions_extraction_error']} with "
        f"an extraction error, {counts['questions_all_claims_judge_error']} whose claims all failed; "
        f"{counts['claims_judged']} of {counts['claims']} claims judged, "
        f"{counts['claims_judge_error']} judge errors (not scored)."
    )


# ---------------------------------------------------------------------------------------------- task


@dataclass
class TriheTask(Task):
    name: ClassVar[str] = "trihe"
    default_max_new_tokens: ClassVar[int] = 512  # free-form answers (the released script allows 1024)

    data: Path
    judge: JudgeConfig | None = None
    image_root: Path | None = None
    limit: int | None = None  # the first N images, with all their questions (Hallu-I needs whole images)
    suffix: str = ""  # the prompt is the question itself, as in the released generation script
    progress: bool = True
    scorer: Scorer | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._docs: list[TriheQuestion] | None = None
        self._counts: dict[str, int] | None = None
        self._first_error: str | None = None

    def docs(self) -> list[TriheQuestion]:
        if self._docs is None:
            docs = load_questions(self.data)
            if self.limit is not None:
                keep = set(list(dict.fromkeys(d.image_id for d in docs))[: self.limit])
                docs = [d for d in docs if d.image_id in keep]
            self._docs = docs
        return self._docs

    def image_path(self, image_id: str) -> Path:
        assert self.image_root is not None
        for suffix in IMAGE_SUFFIXES:
            path = self.image_root / f"{image_id}{suffix}"
            if path.is_file():
                return path
        return self.image_root / f"{image_id}.jpg"

    def load_image(self, image_id: str) -> Image.Image:
        path = self.image_path(image_id)
        if not path.is_file():
            raise SampleError(f"image {path} not found")
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise SampleError(f"image {path} cannot be read: {error}") from error

    def check(self) -> None:
        """Before generating: the images are there and the judge can start (the answers are cached, so a
        judge problem found later costs no generation, only a rerun)."""
        if self.image_root is None or not Path(self.image_root).is_dir():
            raise FileNotFoundError(
                f"--image-root {self.image_root}: not a folder (the released data/usage_figures/, <id>.jpg)"
            )
        images = list(dict.fromkeys(d.image_id for d in self.docs()))
        if images and not any(self.image_path(i).is_file() for i in images):
            raise FileNotFoundError(
                f"--image-root {self.image_root} holds none of the images (e.g. {images[0]}.jpg)"
            )
        if self.judge is None:
            raise ValueError("Tri-HE needs a judge (--judge-url and --judge-model, or --judge local:...)")
        self.judge.check()
        self._scorer().local()  # a local judge that cannot load fails now, not after generation

    def before_generating(self, pending: int) -> None:
        """An endpoint that cannot be reached fails before any answer is generated; a rerun with every
        answer (and so every judge reply) cached makes no request at all."""
        if pending:
            self.judge.probe()

    def sample(self, doc: TriheQuestion) -> Sample:
        return Sample(doc.sample_id, doc.question + self.suffix, lambda: self.load_image(doc.image_id))

    def _scorer(self) -> Scorer:
        if self.scorer is None:
            if self.judge is None:
                raise ValueError("Tri-HE needs a judge (--judge-url and --judge-model, or --judge local:...)")
            self.scorer = Scorer(self.judge, progress=self.progress)
        return self.scorer

    def process(self, doc: TriheQuestion, text: str) -> dict[str, Any]:
        return self.process_all([(doc, text)])[0]

    def process_all(self, pairs: list[tuple[TriheQuestion, str]]) -> list[dict[str, Any]]:
        records = self._scorer().score(pairs)
        self._counts = count_records(records)
        self._first_error = first_error(records)
        return records

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "data": str(self.data),
            "image_root": str(self.image_root) if self.image_root else None,
            "prompt_suffix": self.suffix,
            "limit_images": self.limit,
            "judge": self.judge.info() if self.judge else None,
        }
        if self._counts is not None:
            out["counts"] = self._counts
            label = out["judge"]["label"] if out["judge"] else "none"
            out["note"] = f"Judge: {label}. {counts_note(self._counts)}"
            if out["judge"] and "deviation" in out["judge"]:
                out["note"] += f" Note: {out['judge']['deviation']}"
            if self._first_error is not None:
                out["first_error"] = self._first_error
        if self.scorer is not None:
            out["judge_calls_this_run"] = {"http": self.scorer.calls, "cached": self.scorer.cache_hits}
        return out

    @staticmethod
    def stats(record: dict[str, Any]) -> tuple[str, np.ndarray]:
        rated = 1.0 if record["n_judged"] else 0.0
        w = float(record.get("image_weight", 0.0))
        rates = [record[name] or 0.0 for name in RATES]
        return "all", np.array(
            [rated, *rates, w, *(w * r for r in rates), record["n_claims"], record["n_judge_errors"], 1.0]
        )

    @staticmethod
    def metrics(sums: dict[str, np.ndarray]) -> dict[str, Any]:
        s = np.moveaxis(np.asarray(sums["all"], dtype=float), -1, 0)
        rated, h, o, r, w, wh, wo, wr, claims, errors, questions = s

        def ratio(a, b):
            return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b > 0)

        return {
            "hallu_i": ratio(wh, w),
            "hallu_q": ratio(h, rated),
            "object_hallu_i": ratio(wo, w),
            "object_hallu_q": ratio(o, rated),
            "relation_hallu_i": ratio(wr, w),
            "relation_hallu_q": ratio(r, rated),
            "claims_per_question": ratio(claims, questions),
            "judge_error_rate": ratio(errors, claims),
        }

    @classmethod
    def aggregate(cls, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
        records = list(records)
        if not any(r["n_judged"] for r in records):
            return {}  # no rated question: no rate at all, not a rate of zero
        return super().aggregate(records)


TASKS["trihe"] = TriheTask


# ------------------------------------------------------------------------------------ score answers


def read_answers(path: Path, docs: list[TriheQuestion]) -> list[tuple[TriheQuestion, str]]:
    """JSON lines ``{"image_id", "question", "text"}``, matched to the questions by image and question text
    (never by position); every question needs exactly one answer."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--answers {path}: no such file")
    slots: dict[tuple[str, str], list[TriheQuestion]] = {}
    for doc in docs:
        slots.setdefault((doc.image_id, doc.question.strip()), []).append(doc)
    answered: dict[str, str] = {}
    for number, record in iter_lines(path):
        where = f"{path}:{number}"
        missing = [k for k in ("image_id", "question", "text") if k not in record]
        if missing:
            raise JsonlError(f"{where}: an answer needs image_id, question and text; no {', '.join(missing)}")
        key = (str(record["image_id"]), str(record["question"]).strip())
        if key not in slots:
            raise JsonlError(f"{where}: image {key[0]} has no question {key[1]!r} in the data")
        free = [d for d in slots[key] if d.sample_id not in answered]
        if not free:  # a question asked twice about one image takes its answers in file order
            raise JsonlError(f"{where}: a second answer to image {key[0]}'s question {key[1]!r}")
        answered[free[0].sample_id] = str(record["text"])
    missing_docs = [d for d in docs if d.sample_id not in answered]
    if missing_docs:
        examples = ", ".join(f"{d.image_id}: {d.question!r}" for d in missing_docs[:3])
        raise ValueError(f"{len(missing_docs)} question(s) have no answer in {path}, e.g. {examples}")
    return [(d, answered[d.sample_id]) for d in docs]


def score_trihe(
    data: Path, answers: Path, judge: JudgeConfig, *, progress: bool = True
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(results, per-question records) for answers produced anywhere."""
    task = TriheTask(data, judge=judge, progress=progress)
    judge.check()
    pairs = read_answers(answers, task.docs())
    records = task.process_all(pairs)
    result = {
        "task": "trihe",
        "metrics": task.aggregate(records),
        "task_info": task.info(),
        "answers": str(answers),
        "n_scored": len(records),
    }
    return result, records
