"""The plugin's worker side: per request, mitigate's methods observe the prompt at its first prefill and plan
each layer; per step, the attention backend learns which rows of which requests to edit.

vLLM's V1 model runner (the only one on CPU) keeps each request's state (``runner.requests``: sampling
params, prompt ids, multimodal placeholder ranges) and lays the scheduled tokens of a step out flat, request
after request, in ``runner.input_batch.req_ids`` order. Once per step the attention metadata builder calls
:meth:`Worker.begin_step`, which maps every mitigated request of the step to its rows (:class:`Slot`).

Per mitigated request (:class:`RequestEdits`), as mitigate's Hugging Face session does for a batch of one:

* at its first prefill (the whole prompt, in one step: :mod:`.engine` sees to that) the methods are reset
  with the prompt's :class:`~mitigate.context.TokenLayout`; pre-hooks on the decoder layers hand them each
  layer's input hidden state (VAR); PAINT gets the CLS rows of the vision tower's attention, captured when
  vLLM ran the encoder on the image (kept by the image's hash, since the encoder output may be cached);
* the first attention call of each edited layer asks the methods for its
  :class:`~mitigate.plan.LayerPlan`, kept for the whole generation (decode steps, and recomputation after a
  preemption, only read it); GIFT observes its saliency rows there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..context import TokenLayout, build_layout
from ..errors import MitigationError
from ..methods.base import Method, PlanContext
from ..plan import NEVER, LayerPlan
from .engine import is_mitigated
from .model_info import model_info
from .spec import KEY, MethodCache

log = logging.getLogger("mitigate.vllm")


@dataclass
class RequestEdits:
    """One mitigated request: its methods, their state, its layout and its plans."""

    methods: list[Method]
    layout: TokenLayout
    images: list[str]  # the identifiers of its images, in prompt order
    states: list[dict[str, Any]] = field(default_factory=list)
    plans: dict[int, LayerPlan | None] = field(default_factory=dict)
    observed: bool = False  # its first prefill has run
    saw_vision: bool = False

    def __post_init__(self) -> None:
        self.states = [{} for _ in self.methods]
        self.edited = frozenset(layer for m in self.methods for layer in m.edited_layers())
        self.hidden = frozenset(layer for m in self.methods for layer in m.hidden_layers())


@dataclass
class Slot:
    """A mitigated request's rows in this step: token rows ``start .. stop-1`` of the flat batch, at
    positions ``past .. past + stop - start - 1``; ``index`` is its row of the block table."""

    edits: RequestEdits
    index: int
    start: int
    stop: int
    past: int
    observing: bool  # this step is its first prefill

    @property
    def end(self) -> int:
        return self.past + self.stop - self.start


@dataclass
class Step:
    slots: list[Slot]
    hidden: frozenset[int]  # layers whose input hidden state an observing request needs


class Worker:
    """Everything the plugin keeps in one worker process (one per model runner)."""

    def __init__(self, runner: Any):
        self.runner = runner
        model = runner.vllm_config.model_config
        self.info = model_info(model.architecture, model.hf_config, model.model)
        self.markers = marker_ids(model.hf_config)
        self.methods = MethodCache(self.info)
        self.requests: dict[str, RequestEdits] = {}
        self.step: Step | None = None
        self._pending: list[RequestEdits] = []
        self.vision_rows: dict[str, dict[int, torch.Tensor]] = {}  # image identifier -> layer -> CLS row
        self.hooks_installed = False

    # -- per step ------------------------------------------------------------------------------
    def begin_step(self, num_reqs: int, query_start: list[int], seq_lens: list[int]) -> Step | None:
        """Called by the attention metadata builder, once per step, before the forward."""
        for edits in self._pending:  # the previous step ran their first prefill
            edits.observed = True
        self._pending = []
        self._prune_vision_rows()
        runner = self.runner
        slots = []
        for index, req_id in enumerate(runner.input_batch.req_ids[:num_reqs]):
            state = runner.requests.get(req_id)
            if state is None or not is_mitigated(state.sampling_params):
                continue
            if req_id not in self.requests:  # None: a prompt without images, which no method edits
                self.requests[req_id] = self._new_request(state)
            edits = self.requests[req_id]
            if edits is None:
                continue
            start, stop = query_start[index], query_start[index + 1]
            past = seq_lens[index] - (stop - start)
            observing = not edits.observed
            if observing:
                prompt = edits.layout.prompt_len
                if past != 0 or stop - start < prompt:
                    raise MitigationError(
                        f"mitigate: request {req_id} got positions {past}..{past + stop - start - 1} of its "
                        f"{prompt}-token prompt at its first prefill; the methods need the whole prompt in "
                        "one "
                        "step (a KV connector or another scheduler split it)"
                    )
                for method, method_state in zip(edits.methods, edits.states, strict=True):
                    method.reset(method_state, edits.layout)
                edits.plans.clear()
                self._pending.append(edits)
            slots.append(Slot(edits, index, start, stop, past, observing))
        hidden = frozenset(layer for s in slots if s.observing for layer in s.edits.hidden)
        self.step = Step(slots, hidden) if slots else None
        return self.step

    def _new_request(self, state: Any) -> RequestEdits | None:
        methods = self.methods.resolve(state.sampling_params.extra_args[KEY])
        ids = torch.tensor(list(state.prompt_token_ids))[None]
        image = torch.zeros_like(ids, dtype=torch.bool)
        images = []
        for feature in state.mm_features or []:
            span = feature.mm_position
            where = torch.arange(span.offset, span.offset + span.length)
            if span.is_embed is not None:
                where = where[span.is_embed.bool()]
            image[0, where] = True
            images.append(feature.identifier)
        if not images:
            return None  # every method edits attention to image tokens: a text-only prompt is left as is
        # the image span includes the family's begin/end markers, as the HF adapters build it
        span = image | torch.isin(ids, torch.tensor(self.markers, dtype=ids.dtype)) if self.markers else None
        return RequestEdits(methods, build_layout(image, None, ids, span), images)

    def finish(self, req_id: str) -> None:
        self.requests.pop(req_id, None)

    # -- observations and plans ----------------------------------------------------------------------
    def observe_hidden(self, layer: int, hidden: torch.Tensor) -> None:
        """A decoder layer's input hidden state ``[tokens, d]`` (the residual stream) for this step."""
        for slot in self.step.slots:
            if not slot.observing or layer not in slot.edits.hidden:
                continue
            rows = hidden[slot.start : slot.stop][None]
            for method, state in zip(slot.edits.methods, slot.edits.states, strict=True):
                if layer in method.hidden_layers():
                    method.observe_hidden(layer, rows, slot.edits.layout, state)

    def plan(self, edits: RequestEdits, layer: int) -> LayerPlan | None:
        """The layer's plan for this request's generation (built at its first prefill)."""
        if layer in edits.plans:
            return edits.plans[layer]
        if layer not in edits.edited:
            return None
        if edits.observed:  # every edited layer is planned during the first prefill
            raise MitigationError(f"mitigate: layer {layer} has no plan after the request's first prefill")
        if not edits.saw_vision:
            self._feed_vision(edits)
        ctx = PlanContext(layer_idx=layer, layout=edits.layout, num_heads=self.info.num_heads)
        stages = [
            stage
            for method, state in zip(edits.methods, edits.states, strict=True)
            if layer in method.edited_layers()
            for stage in method.plan(ctx, state)
        ]
        plan = LayerPlan.of(layer, edits.layout.prompt_len, stages) if stages else None
        if plan is not None and all(s.rows.first >= NEVER for s in plan.stages):
            plan = None  # nothing to edit in this layer for this prompt
        edits.plans[layer] = plan
        return plan

    # -- the vision tower's CLS rows (PAINT) ------------------------------------------------------------
    def _feed_vision(self, edits: RequestEdits) -> None:
        edits.saw_vision = True
        wanted = {layer for m in edits.methods for layer in m.vision_layers()}
        if not wanted:
            return
        missing = [h for h in edits.images if h not in self.vision_rows]
        if missing:
            raise MitigationError(
                f"mitigate: the vision tower's CLS attention for image {missing[0]} was not captured when "
                "its "
                "encoder ran (was it encoded before the plugin loaded?)"
            )
        for layer in sorted(wanted):
            cls = torch.stack([self.vision_rows[h][layer] for h in edits.images])  # [images, heads, tokens]
            # one column per image feature token, as the HF adapters hand it (Adapter.cls_to_features):
            # the CLIP towers PAINT runs on here have one token per patch, after the CLS column
            cls = cls[..., 1:]
            for method, state in zip(edits.methods, edits.states, strict=True):
                if layer in method.vision_layers():
                    method.observe_vision(layer, cls, state)

    def keep_vision_rows(self, identifier: str, rows: dict[int, torch.Tensor]) -> None:
        self.vision_rows[identifier] = rows

    def _prune_vision_rows(self) -> None:
        # kept exactly as long as vLLM keeps the image's encoder output (a later request may reuse it)
        cached = self.runner.encoder_cache
        for identifier in [h for h in self.vision_rows if h not in cached]:
            del self.vision_rows[identifier]


def marker_ids(hf_config: Any) -> tuple[int, ...]:
    """The token ids the model's family writes around its images (Qwen's vision start/end), from the HF
    adapter of that family: the one place that knows them."""
    from types import SimpleNamespace

    from ..patches.adapters import adapters

    for adapter in adapters():
        if adapter.matches(hf_config):
            return adapter(SimpleNamespace(config=hf_config)).marker_ids()
    return ()
