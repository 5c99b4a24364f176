"""Tri-HE's judges: claim extraction and claim checking by any OpenAI-compatible chat endpoint, or claim
checking by a local NLI cross-encoder.

The prompts are written here and follow the paper's protocol (Wu et al., TMLR 2025; code:
wujunjie1998/Tri-HE): the extractor turns an answer into (subject, predicate, object) triplets; the judge
decides whether one triplet is supported by the image's reference triplets and object list and, when it
is not, whether an object or the relation is at fault. Unlike the released code, both replies are JSON:

- extraction: ``[["man", "holding", "cup"], ...]`` (``[]`` when the answer claims nothing);
- judging: ``{"verdict": "yes" | "no", "error": "object" | "relation" | null}`` ("yes" = supported).

Replies are parsed as JSON (code fences and surrounding prose tolerated, never ``eval``). A malformed
reply is asked again once, with the reason; a second malformed reply becomes a judge error: counted and
reported, never scored. 429 and 5xx answers and network errors are retried with exponential backoff
(``Retry-After`` honoured); concurrency is bounded. Before the endpoint has answered once, a few requests it
rejects (4xx) or a few failed connections stop the run as a setup problem (a wrong URL or model), rather
than being retried and counted for every claim. Every reply is cached on disk, keyed by the full
request (endpoint, model, messages, settings; never the API key), so a rerun makes no call.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .cache import digest
from .jsonl import append_jsonl, iter_lines, repair_tail

DEFAULT_URL = "https://api.openai.com/v1"
KEY_VARIABLES = ("MITIGATE_JUDGE_API_KEY", "OPENAI_API_KEY")
PAPER_JUDGE = "gpt-4-1106-preview"

EXTRACT_INSTRUCTIONS = "\n".join(
    [
        "You turn an answer about an image into the claims it makes, as (subject, predicate, object) "
        "triplets.",
        "",
        "Rules:",
        "- Extract only. Do not judge whether a claim is true.",
        '- One fact per triplet. Split "A and B" or "A or B" into one triplet each.',
        '- Attributes are claims: "a red bus" gives ["bus", "is", "red"].',
        '- Skip sentences that say nothing about the image: hedges ("it is hard to tell"), advice, general '
        "knowledge.",
        "- Keep the answer's own words where you can.",
        "",
        "Reply with only a JSON list of [subject, predicate, object] lists, or [] when the answer makes no "
        "claim.",
        "",
        'Example answer: "A man in a white shirt rides a bicycle down the street, past two parked cars. '
        'It is hard to say where he is going."',
        'Example reply: [["man", "wearing", "white shirt"], ["man", "riding", "bicycle"], ["bicycle", "on", '
        '"street"], ["cars", "parked on", "street"], ["cars", "count", "two"]]',
    ]
)

JUDGE_INSTRUCTIONS = "\n".join(
    [
        "You check one claim about an image against what is known about that image: reference triplets "
        "(subject, relation, object) taken from its scene graph, and the list of objects seen in it.",
        "",
        'Task 1: is the claim supported? Say "yes" when the claim is among the references, or can be '
        "inferred from one or more reference triplets together with the object list. Consider:",
        "a. common associations and implications;",
        'b. hedged wording ("could be", "might", "suggests"), which allows a broader inference;',
        'c. objects of the same kind as equal: a "man" or a "woman" is a "person";',
        "d. the object list as evidence that an object is present.",
        'Say "no" when the claim is neither among the references nor reasonably inferred from them and the '
        "object list. Use nothing beyond the references and the object list.",
        "",
        'Task 2: when you say "no", name the unsupported part: "object" when the claim\'s subject or object '
        'is not in the image, "relation" when both are there but the relation between them is not supported.',
        "",
        "Reply with only a JSON object, one of:",
        '{"verdict": "yes", "error": null}',
        '{"verdict": "no", "error": "object"}',
        '{"verdict": "no", "error": "relation"}',
    ]
)

VERDICT_SHAPE = '{"verdict": ..., "error": ...}'
TRIPLETS_SHAPE = "list of [subject, predicate, object] lists"
RETRY_PROMPT = "Your reply could not be read ({reason}). Reply again with only the JSON {shape}, nothing else"


class JudgeSetupError(ValueError):
    """The judge cannot work at all (no model named, key refused, wrong URL): the run stops."""


class JudgeCallError(RuntimeError):
    """One call failed for good (retries spent, or a 4xx the request caused): a judge error, not cached."""


class MalformedReply(ValueError):
    """A reply that is not the JSON asked for."""


# ---------------------------------------------------------------------------------------------- parsing

_FENCE = re.compile(r"```[A-Za-z]*\s*\n?(.*?)```", re.S)


def parse_json_reply(text: str | None) -> Any:
    """The JSON value in a chat reply: the whole reply, the inside of a code fence, or the span from the
    first bracket to the last matching one (a model that adds a sentence around it)."""
    if text is None or not text.strip():
        raise MalformedReply("empty reply")
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for candidate in candidates:
        candidate = candidate.strip()
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            pass
        starts = [i for i in (candidate.find("["), candidate.find("{")) if i >= 0]
        if starts:
            start = min(starts)
            end = candidate.rfind("]" if candidate[start] == "[" else "}")
            if end > start:
                try:
                    return json.loads(candidate[start : end + 1])
                except json.JSONDecodeError:
                    pass
    raise MalformedReply(f"no JSON value in {_short(text)}")


def parse_triplets(text: str | None) -> list[list[str]]:
    """An extraction reply: a JSON list of [subject, predicate, object] lists of non-empty strings."""
    value = parse_json_reply(text)
    if not isinstance(value, list):
        raise MalformedReply(f"expected a JSON list of triplets, got {type(value).__name__}")
    out = []
    for item in value:
        if not isinstance(item, list) or len(item) != 3:
            raise MalformedReply(f"expected [subject, predicate, object], got {_short(json.dumps(item))}")
        parts = [str(p).strip() if isinstance(p, str | int | float) else None for p in item]
        if any(not p for p in parts):
            raise MalformedReply(f"a triplet with an empty or non-text part: {_short(json.dumps(item))}")
        out.append(parts)
    return out


_OBJECT_PARTS = {"object", "object1", "object2", "subject", "objects"}
_RELATION_PARTS = {"relation", "predicate", "relationship"}


def parse_verdict(text: str | None) -> tuple[str, str | None]:
    """A judge reply: ``("yes", None)``, ``("no", "object")`` or ``("no", "relation")``."""
    value = parse_json_reply(text)
    if not isinstance(value, dict):
        raise MalformedReply(f"expected a JSON object, got {type(value).__name__}")
    verdict = str(value.get("verdict", "")).strip(" .!'\"").lower()
    if verdict not in ("yes", "no"):
        raise MalformedReply(f"verdict must be 'yes' or 'no', got {value.get('verdict')!r}")
    if verdict == "yes":
        return "yes", None
    error = str(value.get("error") or "").strip(" .!'\"").lower()
    if error in _OBJECT_PARTS:  # the released prompt's 'object1'/'object2' name the same thing
        return "no", "object"
    if error in _RELATION_PARTS:
        return "no", "relation"
    raise MalformedReply(f"a 'no' verdict needs error 'object' or 'relation', got {value.get('error')!r}")


def _short(text: str, n: int = 120) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


# ---------------------------------------------------------------------------------------------- prompts


def triplet_text(triplet: list[str] | tuple[str, ...]) -> str:
    return json.dumps(list(triplet), ensure_ascii=False)


def extraction_messages(answer: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": EXTRACT_INSTRUCTIONS},
        {"role": "user", "content": f"Answer:\n{answer}"},
    ]


def judge_messages(claim: list[str], references: list[str], objects: list[str]) -> list[dict[str, str]]:
    refs = "\n".join(references) if references else "(none)"
    return [
        {"role": "system", "content": JUDGE_INSTRUCTIONS},
        {
            "role": "user",
            "content": f"Reference triplets:\n{refs}\n\n"
            f"Objects in the image:\n{', '.join(objects) or '(none)'}\n\n"
            f"Claim:\n{triplet_text(claim)}",
        },
    ]


def prompts_digest() -> str:
    """Names this version of the prompts in the results (a prompt change moves every number)."""
    return digest([EXTRACT_INSTRUCTIONS, JUDGE_INSTRUCTIONS, RETRY_PROMPT])[:12]


# ------------------------------------------------------------------------------------------ reply cache


class ReplyCache:
    """Chat replies in a JSON-lines file, keyed by the digest of the full request; appended as they come,
    so a killed scoring run keeps every reply it paid for."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None
        self._replies: dict[str, str] = {}
        if self.path is not None and self.path.is_file():
            for _, record in iter_lines(self.path, skip_partial_tail=True):
                self._replies.setdefault(record["key"], record["content"])
            repair_tail(self.path)  # a line a killed run left unfinished

    def get(self, key: str) -> str | None:
        return self._replies.get(key)

    def put(self, key: str, content: str, model: str) -> None:
        self._replies[key] = content
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            append_jsonl(self.path, [{"key": key, "model": model, "content": content}])

    def __len__(self) -> int:
        return len(self._replies)


# ------------------------------------------------------------------------------------- the chat client


def api_key() -> str | None:
    for name in KEY_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    return None


@dataclass
class ChatEndpoint:
    """One OpenAI-compatible ``/chat/completions`` endpoint, with the reply cache, bounded concurrency and
    retries. Use inside one event loop (``async with``)."""

    url: str
    model: str
    cache: ReplyCache = field(default_factory=lambda: ReplyCache(None))
    concurrency: int = 8
    timeout: float = 60.0
    max_retries: int = 6
    backoff: float = 1.0  # seconds before the first retry when the server names no Retry-After
    setup_failures: int = 3  # rejections or failed connections, before any answer, that stop the run
    temperature: float = 0.0
    calls: int = 0  # HTTP requests made (retries included)
    cache_hits: int = 0

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self._client: Any = None
        self._sem: asyncio.Semaphore | None = None
        self._inflight: dict[str, asyncio.Future] = {}
        self._answered = False  # any 200 yet: before one, requests the server rejects mean a setup problem
        self._rejected = 0
        self._unreachable = 0  # failed connections (tries included)

    async def __aenter__(self) -> ChatEndpoint:
        try:
            import httpx
        except ImportError:
            raise ImportError("Tri-HE's judge client needs httpx: pip install 'mitigate[evals]'") from None

        self._sem = asyncio.Semaphore(self.concurrency)
        self._client = httpx.AsyncClient(timeout=self.timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()
        self._client = None

    def body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        return {"model": self.model, "messages": messages, "temperature": self.temperature}

    def key(self, messages: list[dict[str, str]]) -> str:
        return digest({"url": self.url, "body": self.body(messages)})

    async def complete(self, messages: list[dict[str, str]]) -> str:
        """The reply's text, from the cache when this exact request was made before."""
        key = self.key(messages)
        cached = self.cache.get(key)
        if cached is not None:
            self.cache_hits += 1
            return cached
        if key in self._inflight:  # the same claim judged for two questions at once: one call
            return await asyncio.shield(self._inflight[key])
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            content = await self._post(self.body(messages))
            self.cache.put(key, content, self.model)
            future.set_result(content)
            return content
        except asyncio.CancelledError:
            future.cancel()  # a future cannot hold a CancelledError as its exception
            raise
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            del self._inflight[key]

    async def _post(self, body: dict[str, Any]) -> str:
        import httpx

        headers = {"Content-Type": "application/json"}
        key = api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = f"{self.url}/chat/completions"
        problem = ""
        for attempt in range(self.max_retries + 1):
            wait = None
            assert self._sem is not None, "use the endpoint inside 'async with'"
            async with self._sem:
                self.calls += 1
                try:
                    response = await self._client.post(url, json=body, headers=headers)
                except (httpx.TimeoutException, httpx.TransportError) as error:
                    problem = f"{type(error).__name__}: {error}"
                    if isinstance(error, _unreachable_types()):
                        # Nothing answers there: before any reply, a wrong --judge-url or a server that is
                        # not running, better stopped now than retried for every claim.
                        self._unreachable += 1
                        if not self._answered and self._unreachable >= self.setup_failures:
                            raise JudgeSetupError(unreachable_message(self.url, problem)) from None
                else:
                    status = response.status_code
                    if status == 200:
                        self._answered = True
                        return _content(response)
                    if status in (401, 403):
                        raise JudgeSetupError(
                            f"the judge endpoint {url} refused the request (HTTP {status}): set "
                            f"{' or '.join(KEY_VARIABLES)} to a key it accepts"
                        )
                    if status == 404:
                        raise JudgeSetupError(
                            f"{url} answered 404: check --judge-url (the base URL, usually ending in /v1) "
                            f"and --judge-model {self.model!r} ({_short(response.text)})"
                        )
                    problem = f"HTTP {status}: {_short(response.text)}"
                    if status != 429 and status != 408 and status < 500:
                        # The request itself is wrong: retrying will not help. One odd request is a judge
                        # error; every request rejected from the start is a setup problem (a model name
                        # or parameter the server does not take), better stopped than counted 10,000 times.
                        self._rejected += 1
                        if not self._answered and self._rejected >= self.setup_failures:
                            raise JudgeSetupError(
                                f"{url} rejected the first {self._rejected} requests ({problem}); check "
                                f"--judge-model {self.model!r} and --judge-url"
                            )
                        raise JudgeCallError(problem)
                    wait = _retry_after(response)
            if attempt < self.max_retries:
                if wait is None:
                    wait = min(self.backoff * 2**attempt, 60.0) * (0.5 + random.random() / 2)
                await asyncio.sleep(wait)
        raise JudgeCallError(f"{problem} (after {self.max_retries + 1} tries)")


def _unreachable_types() -> tuple[type[BaseException], ...]:
    try:
        import httpx
    except ImportError:
        return ()
    return (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol, httpx.ProxyError)


def unreachable_message(url: str, problem: str) -> str:
    return (
        f"the judge endpoint {url} cannot be reached ({problem}); check --judge-url (the base URL, usually "
        "ending in /v1) and that its server is running"
    )


def _retry_after(response: Any) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return min(max(float(value), 0.0), 120.0) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _content(response: Any) -> str:
    try:
        data = response.json()
        content = data["choices"][0]["message"].get("content")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise JudgeCallError(f"not a chat completion: {_short(response.text)}") from None
    return content if isinstance(content, str) else ""  # null content (a refusal) reads as malformed


async def ask(
    endpoint: ChatEndpoint, messages: list[dict[str, str]], parse: Callable[[str], Any], shape: str
) -> tuple[Any, str | None, list[str]]:
    """``(value, None, replies)``, or ``(None, error, replies)`` once a malformed reply came back twice or a
    call failed for good. The retry sends the bad reply back with the reason, so it is a new request (and
    cached as such)."""
    replies: list[str] = []
    try:
        reply = await endpoint.complete(messages)
        replies.append(reply)
        try:
            return parse(reply), None, replies
        except MalformedReply as error:
            retry = [
                *messages,
                {"role": "assistant", "content": reply},
                {"role": "user", "content": RETRY_PROMPT.format(reason=error, shape=shape)},
            ]
        reply = await endpoint.complete(retry)
        replies.append(reply)
        try:
            return parse(reply), None, replies
        except MalformedReply as error:
            return None, f"malformed reply twice: {error}", replies
    except JudgeCallError as error:
        return None, f"call failed: {error}", replies


# --------------------------------------------------------------------------------------------- judges


@dataclass
class Verdict:
    verdict: str | None  # "yes" (supported) / "no" (hallucinated) / None (judge error)
    error: str | None = None  # "object" / "relation" when verdict == "no"
    judge_error: str | None = None
    replies: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"verdict": self.verdict, "error": self.error}
        if self.judge_error is not None:
            out["judge_error"] = self.judge_error
            out["replies"] = self.replies
        return out


@dataclass(frozen=True)
class ClaimItem:
    claim: tuple[str, str, str]
    references: tuple[str, ...]
    objects: tuple[str, ...]


class LLMJudge:
    """The paper's judge, behind any OpenAI-compatible endpoint."""

    kind = "llm"

    def __init__(self, endpoint: ChatEndpoint):
        self.endpoint = endpoint

    async def judge(self, items: list[ClaimItem]) -> list[Verdict]:
        async def one(item: ClaimItem) -> Verdict:
            messages = judge_messages(list(item.claim), list(item.references), list(item.objects))
            value, error, replies = await ask(self.endpoint, messages, parse_verdict, VERDICT_SHAPE)
            if error is not None:
                return Verdict(None, None, error, replies)
            return Verdict(value[0], value[1])

        return list(await asyncio.gather(*(one(item) for item in items)))


NLI_DEVIATION = (
    "local NLI judge: a deviation from the paper, which judges with GPT-4. Supported = the cross-encoder's "
    "top class is entailment for the claim read as a sentence, against the reference triplets and the "
    "object list read as a text; for an unsupported claim, 'object' when its subject or object is not "
    "entailed by the object list, else 'relation'. Numbers are not comparable with the paper's."
)


def triplet_sentence(triplet: str | list[str] | tuple[str, ...]) -> str:
    """``"(man, holding, cup)"`` or ``["man", "holding", "cup"]`` as ``"man holding cup."``."""
    parts = triplet.strip().strip("()").split(",") if isinstance(triplet, str) else triplet
    return " ".join(p.strip().strip("\"'") for p in parts if p.strip()) + "."


def objects_sentence(objects: tuple[str, ...] | list[str]) -> str:
    return f"The image shows {', '.join(dict.fromkeys(objects))}." if objects else "The image shows nothing."


class NLIJudge:
    """``--judge local:<folder or hub id>``: an NLI cross-encoder (``AutoModelForSequenceClassification``
    whose labels name an entailment class), run in batches on the GPU when there is one."""

    kind = "local-nli"

    def __init__(self, spec: str, *, device: str | None = None, batch_size: int = 16, max_length: int = 512):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.spec = spec
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(spec)
            self.model = AutoModelForSequenceClassification.from_pretrained(spec).eval()
        except (OSError, ValueError) as error:
            raise JudgeSetupError(f"--judge local:{spec}: cannot load a cross-encoder ({error})") from None
        labels = {int(i): str(name).lower() for i, name in self.model.config.id2label.items()}
        entail = [i for i, name in labels.items() if name.startswith("entail")]
        if len(entail) != 1:
            raise JudgeSetupError(
                f"--judge local:{spec}: its labels {sorted(labels.values())} name no entailment class; a "
                "local judge must be an NLI cross-encoder (e.g. cross-encoder/nli-deberta-v3-base)"
            )
        self.entailment = entail[0]
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.batch_size = batch_size
        self.max_length = min(max_length, getattr(self.tokenizer, "model_max_length", None) or max_length)

    def entails(self, premises: list[str], hypotheses: list[str]) -> list[bool]:
        import torch

        out: list[bool] = []
        for start in range(0, len(premises), self.batch_size):
            batch = self.tokenizer(
                premises[start : start + self.batch_size],
                hypotheses[start : start + self.batch_size],
                truncation="only_first",  # a long reference list loses its tail, never the claim
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                logits = self.model(**batch).logits
            out += (logits.argmax(-1) == self.entailment).tolist()
        return out

    async def judge(self, items: list[ClaimItem]) -> list[Verdict]:
        return self.judge_sync(items)

    def judge_sync(self, items: list[ClaimItem]) -> list[Verdict]:
        if not items:
            return []
        premises = [
            " ".join(triplet_sentence(r) for r in item.references) + " " + objects_sentence(item.objects)
            for item in items
        ]
        supported = self.entails(premises, [triplet_sentence(item.claim) for item in items])
        refused = [i for i, ok in enumerate(supported) if not ok]
        # Which part is unsupported: are the claim's subject and object in the image at all?
        present = self.entails(
            [objects_sentence(items[i].objects) for i in refused for _ in range(2)],
            [f"The image shows {items[i].claim[part]}." for i in refused for part in (0, 2)],
        )
        verdicts = [Verdict("yes") for _ in items]
        for n, i in enumerate(refused):
            both = present[2 * n] and present[2 * n + 1]
            verdicts[i] = Verdict("no", "relation" if both else "object")
        return verdicts


# ------------------------------------------------------------------------------------------ the config


def check_url(url: str) -> str:
    """``--judge-url`` without its trailing slash, refused at once unless it is an http(s) URL with a
    host (a missing scheme would otherwise fail every request, one retry after another)."""
    text = str(url).strip().rstrip("/")
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError:
        parts = parts._replace(netloc="")
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise JudgeSetupError(
            f"--judge-url {url!r} is not an http:// or https:// URL with a host; give the endpoint's base "
            f"URL, e.g. http://localhost:8000/v1 (default {DEFAULT_URL})"
        )
    return text


@dataclass
class JudgeConfig:
    """What the CLI's ``--judge*`` options name. Extraction always goes through the chat endpoint (a local
    server such as vLLM or llama.cpp keeps everything offline); judging goes there too, or to a local NLI
    model with ``judge="local:<folder or hub id>"``."""

    judge: str = "llm"
    url: str = DEFAULT_URL
    model: str | None = None
    concurrency: int = 8
    timeout: float = 60.0
    cache: Path | None = None
    max_retries: int = 6
    backoff: float = 1.0  # seconds before the first retry (doubled each time)

    def __post_init__(self) -> None:
        self.url = check_url(self.url)
        if self.judge != "llm" and not self.judge.startswith("local:"):
            raise JudgeSetupError(f"--judge {self.judge!r}: give 'llm' or 'local:<folder or hub id>'")
        if self.judge.startswith("local:") and not self.local_spec:
            raise JudgeSetupError("--judge local: needs a folder or hub id after the colon")
        if self.concurrency < 1:
            raise JudgeSetupError("--judge-concurrency must be at least 1")

    @property
    def local_spec(self) -> str | None:
        return self.judge.removeprefix("local:") if self.judge.startswith("local:") else None

    def check(self) -> None:
        if not self.model:
            raise JudgeSetupError(
                "--judge-model is needed: the chat model that extracts the claims"
                + ("" if self.local_spec else " and judges them")
                + f" (the paper used {PAPER_JUDGE}); --judge-url names its endpoint (default {DEFAULT_URL})"
            )

    def endpoint(self) -> ChatEndpoint:
        self.check()
        assert self.model is not None
        return ChatEndpoint(
            self.url,
            self.model,
            ReplyCache(self.cache),
            concurrency=self.concurrency,
            timeout=self.timeout,
            max_retries=self.max_retries,
            backoff=self.backoff,
        )

    def probe(self) -> None:
        """One cheap request before any work (``GET <url>/models``, no tokens spent): the endpoint answers
        at all. Any HTTP answer will do; a failed connection is a :class:`JudgeSetupError`."""
        try:
            import httpx
        except ImportError:
            raise ImportError("Tri-HE's judge client needs httpx: pip install 'mitigate[evals]'") from None
        url = f"{self.url}/models"
        headers = {"Authorization": f"Bearer {key}"} if (key := api_key()) else {}
        try:
            with httpx.Client(timeout=min(self.timeout, 10.0)) as client:
                client.get(url, headers=headers)
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            raise JudgeSetupError(unreachable_message(self.url, f"{type(error).__name__}: {error}")) from None

    def info(self) -> dict[str, Any]:
        prompts = prompts_digest()
        # The label (what reports compare) names the models, not the URL: one model served at localhost
        # or at 127.0.0.1 is one scoring. The reply cache stays keyed by the URL too (see ChatEndpoint.key).
        out: dict[str, Any] = {"extractor": {"url": self.url, "model": self.model, "prompts": prompts}}
        if self.local_spec:
            out |= {
                "kind": "local-nli",
                "model": self.local_spec,
                "label": f"local NLI {self.local_spec} (deviation from the paper's GPT-4 judge)",
                "deviation": NLI_DEVIATION,
            }
        else:
            out |= {
                "kind": "llm",
                "url": self.url,
                "model": self.model,
                "label": f"LLM {self.model}",
            }
        out["label"] += f"; extraction by {self.model}, prompts {prompts}"
        return out
