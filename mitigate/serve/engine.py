"""One generation worker over one model: batches requests that share a mitigation, never mixes two.

The worker thread owns the model. It takes the oldest waiting request, waits up to ``batch_wait_ms`` (from
that request's arrival) for more with the same canonical mitigation spec, up to ``max_batch``, then applies
that mitigation, generates the left-padded batch greedily, and removes the mitigation. Requests with other
specs wait for their own batch, so no forward ever carries two mitigations.

A request's answer does not depend on its batch: greedy left-padded generation gives each row the tokens it
gets alone (the project checks this for every family), each row stops at its own ``max_tokens``, stop
strings and end-of-sequence token (later tokens of a finished row are discarded), and a sampled request
(temperature > 0) runs alone, seeded by its ``seed``. If a batch fails, its requests that have not
streamed anything yet are retried one by one, so one bad request cannot fail its neighbours.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from ..api import mitigated
from ..errors import MitigationError
from ..loading import model_device
from .errors import APIError
from .specs import Spec

log = logging.getLogger("mitigate.serve")


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string), "length", or "cancelled"
    completion_tokens: int
    batch_size: int


@dataclass(eq=False)
class Job:
    """One request on its way through the worker; events go back to the request's event loop."""

    id: str
    spec: Spec
    prompt: str  # the chat-templated text
    images: list[Image.Image]
    prompt_tokens: int
    max_tokens: int
    stops: list[str] = field(default_factory=list)
    stream: bool = False
    sampling: dict[str, Any] | None = None  # temperature, top_p, seed: runs alone
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    solo: bool = False
    streamed: bool = False

    @property
    def batch_key(self) -> str:
        return f"solo:{self.id}" if self.solo or self.sampling else self.spec.key

    def emit(self, kind: str, value: Any = None) -> None:
        """Hand an event to the request's coroutine: start, delta, done or error."""
        if self.loop is None or self.events is None:
            return
        with contextlib.suppress(RuntimeError):  # the request's loop is gone
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        *,
        max_batch: int = 8,
        batch_wait_ms: float = 10.0,
        max_queue: int = 1024,
        kernel: str = "auto",
    ):
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_batch = max(1, max_batch)
        self.batch_wait = max(0.0, batch_wait_ms) / 1000.0
        self.max_queue = max_queue
        self.kernel = kernel
        self.device = model_device(model)
        self.dtype = next(model.parameters()).dtype
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        # A fast tokenizer is not safe to call from two threads while one sets padding ("Already borrowed"):
        # the request threads and the worker take turns.
        self.processor_lock = threading.Lock()
        self._pending: dict[str, deque[Job]] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches = 0  # batches run so far (for /health)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mitigate-generate", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def queued(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._pending.values())

    def submit(self, job: Job) -> None:
        with self._cond:
            if sum(len(q) for q in self._pending.values()) >= self.max_queue:
                raise APIError(
                    503, "the server's queue is full; retry later", code="server_busy", type="server_error"
                )
            self._pending.setdefault(job.batch_key, deque()).append(job)
            self._cond.notify_all()

    # -- the worker ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._serve(batch)
            except Exception:  # _serve answers its jobs itself; whatever escapes must not end the worker
                log.exception("generation worker")

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            key = min(self._pending, key=lambda k: self._pending[k][0].arrival)
            queue = self._pending[key]
            limit = 1 if key.startswith("solo:") else self.max_batch
            deadline = queue[0].arrival + self.batch_wait
            while len(queue) < limit and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = [queue.popleft() for _ in range(min(limit, len(queue)))]
            if not queue:
                del self._pending[key]
        return [job for job in batch if not job.cancelled]

    def _serve(self, batch: list[Job]) -> None:
        self.batches += 1
        tracker = Tracker(batch, self.tokenizer, self.eos, self.processor_lock)
        try:
            self._generate(batch, tracker)
        except MitigationError as exc:  # refused before the model was touched; the same for every job here
            for job in batch:
                job.emit("error", APIError(400, str(exc), code="invalid_mitigation", param="mitigation"))
        except Exception as exc:
            log.exception("generation failed for a batch of %d", len(batch))
            if len(batch) == 1:
                batch[0].emit("error", APIError(500, f"generation failed: {exc}", code="generation_failed"))
                return
            for job in batch:  # retry alone whatever has not streamed yet
                if job.streamed or tracker.finished(job):
                    if not tracker.finished(job):
                        job.emit(
                            "error", APIError(500, f"generation failed: {exc}", code="generation_failed")
                        )
                    continue
                job.solo = True
                job.arrival = time.monotonic()
                with self._cond:
                    self._pending.setdefault(job.batch_key, deque()).append(job)
                    self._cond.notify_all()

    @torch.inference_mode()
    def _generate(self, batch: list[Job], tracker: Tracker) -> None:
        nested = [job.images for job in batch]
        with self.processor_lock:
            inputs = self.processor(
                images=nested if any(nested) else None,
                text=[job.prompt for job in batch],
                return_tensors="pt",
                padding=True,
            )
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        spec = batch[0].spec
        sampling = batch[0].sampling
        settings: dict[str, Any] = {"max_new_tokens": max(job.max_tokens for job in batch), "num_beams": 1}
        if sampling:
            settings.update(do_sample=True, temperature=sampling["temperature"], top_p=sampling.get("top_p"))
        else:
            settings.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        scope = (
            contextlib.nullcontext()
            if spec.vanilla
            else mitigated(self.model, spec.as_apply_arg(), kernel=self.kernel, processor=self.processor)
        )
        with scope:
            for job in batch:
                job.emit("start", len(batch))
            if sampling and sampling.get("seed") is not None:
                torch.manual_seed(sampling["seed"])
            self.model.generate(**inputs, **settings, stopping_criteria=StoppingCriteriaList([tracker]))
        tracker.close()


class Tracker(StoppingCriteria):
    """Per-row bookkeeping at every decoding step: collects each row's tokens, stops a row at its own
    limits, streams its text, and hands each finished row its completion at once."""

    def __init__(self, jobs: list[Job], tokenizer: Any, eos: set[int], lock: threading.Lock):
        self.jobs = jobs
        self.tokenizer = tokenizer
        self.lock = lock
        self.eos = eos
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.sent = ["" for _ in jobs]
        self.done = [False for _ in jobs]
        self.holdback = [max((len(s) for s in job.stops), default=1) - 1 for job in jobs]

    def finished(self, job: Job) -> bool:
        return self.done[self.jobs.index(job)]

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, -1].tolist()
        for row, job in enumerate(self.jobs):
            if self.done[row]:
                continue
            self.tokens[row].append(new[row])
            if new[row] in self.eos:
                self._finish(row, "stop")
                continue
            text = self._decode(row) if (job.stops or job.stream) else ""
            cut = min((i for s in job.stops if (i := text.find(s)) >= 0), default=-1)
            if cut >= 0:
                self._finish(row, "stop", text[:cut])
            elif job.cancelled:
                self._finish(row, "cancelled")
            elif len(self.tokens[row]) >= job.max_tokens:
                self._finish(row, "length")
            elif job.stream:
                self._stream(row, text)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def close(self) -> None:
        """After ``generate`` returns: rows still open hit the batch's token limit."""
        for row in range(len(self.jobs)):
            if not self.done[row]:
                self._finish(row, "length")

    def _decode(self, row: int) -> str:
        with self.lock:
            return self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)

    def _stream(self, row: int, text: str) -> None:
        """Send the text that can no longer change: up to the last space or newline, never a possible
        start of a stop string, never a half-decoded character."""
        if text.endswith("\ufffd"):
            return
        stable = text[: len(text) - self.holdback[row]]
        boundary = max(stable.rfind(" "), stable.rfind("\n")) + 1
        sent = self.sent[row]
        if boundary > len(sent) and stable.startswith(sent):
            self._send(row, stable[len(sent) : boundary])

    def _send(self, row: int, delta: str) -> None:
        if delta:
            self.sent[row] += delta
            self.jobs[row].streamed = True
            self.jobs[row].emit("delta", delta)

    def _finish(self, row: int, reason: str, text: str | None = None) -> None:
        self.done[row] = True
        job = self.jobs[row]
        text = self._decode(row) if text is None else text
        if job.stream:
            sent = self.sent[row]
            if not text.startswith(sent):  # a tokenizer that rewrote text it had already produced
                log.warning("request %s: streamed text is not a prefix of the final text", job.id)
            self._send(row, text[len(sent) :])
        job.emit("done", Completion(text, reason, len(self.tokens[row]), len(self.jobs)))


_ids = itertools.count()


def next_id() -> str:
    return f"{next(_ids):06d}"
