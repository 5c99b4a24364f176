"""How edits reach a model: one registered attention function, forward hooks, and the per-generation plans.

A :class:`Session` is the live side of one mitigation on one model. ``install`` registers the ``mitigate``
attention and mask functions with transformers, switches only the language model to them, and adds:

* a pre-hook on the multimodal base model, which at every prefill (no cache yet) builds the token layout
  and resets the methods; it refuses a prompt continued from a cached prefix (chunked prefill), whose edits
  would silently differ, and does nothing at all inside a compiled decode step;
* pre-hooks on the decoder layers whose input hidden state a method needs at prefill;
* when a method reads the vision tower (PAINT), the tower's attention is routed here too, and the CLS
  query's probabilities are computed for the layers it asks for (one row, never the full map);
* when a method needs a probe (VHR; GIFT when its saliency layer does not precede its enhanced layers),
  the base model's pre-hook runs one extra prefill before the real one: on the prompt rows plus their
  image-free twins as one batch when a method compares the two (VHR), else on the prompt rows alone. One
  probe serves every method that needs it.

The family's adapter (:mod:`.adapters`) builds the token layout, the twins' positions (1-D or M-RoPE) and
keeps model state that an extra prefill would overwrite (Qwen's ``rope_deltas``). A prefill call may carry
fewer query rows than the prompt (Gemma 4's key/value-sharing layers get the last row only): they are the
prompt's last rows.

At prefill, the first attention call of each edited layer asks the methods for that layer's stages and
keeps the :class:`~mitigate.plan.LayerPlan` for the whole generation, folded by the kernel for decode
(:meth:`Kernel.prepare`). A decode step only runs the folded plan: no Python that reads tensor values, no
per-step state on the host, so it compiles once per shape (``cache_implementation="static"`` with
``torch.compile``) and replays as a CUDA graph. With a static cache the folded plans keep their storage
from one generation to the next, so a new prompt of the same shape reuses the compiled graph.

``uninstall`` undoes all of it, so the model is exactly as before. Attention modules map to their session
in a weak dictionary, so several models can be mitigated at once and nothing outlives ``uninstall``.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..context import TokenLayout
from ..errors import MitigationError
from ..kernels import KernelCall, get_kernel, resolve_kernel, torch_attention
from ..kernels.masks import causal_keep, padding_of
from ..kernels.reference import probabilities
from ..methods.base import Method, PlanContext
from ..plan import LayerPlan
from ..stats import Stats
from .adapters import Adapter
from .contrast import Contrast
from .twins import double_batch

ATTENTION_NAME = "mitigate"

_SESSIONS: weakref.WeakKeyDictionary[nn.Module, Session] = weakref.WeakKeyDictionary()


def mitigate_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The function registered as ``"mitigate"``: route to the module's session, else plain SDPA."""
    session = _SESSIONS.get(module)
    if session is not None and module in session.vision_index:
        return session.vision_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if session is None or not session.enabled:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return session.attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def _register_functions() -> None:
    AttentionInterface.register(ATTENTION_NAME, mitigate_attention)
    # Without a registered mask function padded batches would arrive with attention_mask=None.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _unregister_functions() -> None:
    if any(True for _ in _SESSIONS.values()):
        return
    AttentionInterface._global_mapping.pop(ATTENTION_NAME, None)
    AttentionMaskInterface._global_mapping.pop(ATTENTION_NAME, None)


COMPILED_PREFILL = (
    "mitigate: a compiled forward over several tokens (a prefill under torch.compile). The methods plan "
    "their edits from the prompt at an eager prefill; compile through generate(..., "
    "cache_implementation='static'), which prefills eagerly and compiles the decode steps, rather than "
    "compiling the model or its forward yourself"
)


class Session:
    """Per-model runtime state of a mitigation: hooks, token layout, per-method state, kernel choice."""

    def __init__(self, model: nn.Module, adapter: Adapter, methods: list[Method], kernel: str = "auto"):
        self.model = model
        self.adapter = adapter
        self.methods = methods
        self.kernel_name = resolve_kernel(kernel, _device_of(model))
        self.kernel = get_kernel(self.kernel_name)
        self.enabled = True
        self.stats: Stats | None = None
        self.layout: TokenLayout | None = None
        self.prefill = False
        self.past = 0  # keys cached before the current call (eager calls only)
        self.plans: dict[int, LayerPlan | None] = {}  # this generation's plan per edited layer
        self.decode_plans: dict[int, Any] = {}  # the same, folded by the kernel for decode steps
        self.decode_length = 0  # keys the folded plans cover
        self.static = False  # the generation runs on a static (compilable) cache
        self._last_decode: dict[int, Any] = {}
        self._cache: Any = None  # a weak reference to the cache the plans were made for
        self._uncached: torch.Tensor | None = None  # the last prompt run without a cache (use_cache=False)
        self.state: list[dict[str, Any]] = [{} for _ in methods]
        self.probing = False
        self._edited = {layer for m in methods for layer in m.edited_layers()}
        self._hidden = {layer for m in methods for layer in m.hidden_layers()}
        self._vision = {layer for m in methods for layer in m.vision_layers()}
        self._probe = any(m.needs_probe() for m in methods)
        self._twins = any(m.needs_probe() and m.probe_twins() for m in methods)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.contrast: Contrast | None = None
        self._attention_modules: list[nn.Module] = []
        self.vision_index: dict[nn.Module, int] = {}
        self._previous: dict[str, str] = {}

    # -- install / uninstall ----------------------------------------------------------------
    def install(self) -> None:
        _register_functions()
        switch = {self.adapter.text_config_key: ATTENTION_NAME}
        self._attention_modules = self.adapter.attention_modules()
        if self._vision:
            switch[self.adapter.vision_config_key] = ATTENTION_NAME
            vision = self.adapter.vision_attention_modules()
            self.vision_index = {module: idx for idx, module in enumerate(vision)}
            self._attention_modules = self._attention_modules + vision
        self._previous = {key: getattr(self.model.config, key)._attn_implementation for key in switch}
        self.model.set_attn_implementation(switch)
        for module in self._attention_modules:
            _SESSIONS[module] = self
        base = self.adapter.base_model()
        self._handles.append(base.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._handles.append(base.register_forward_hook(self._after_forward))
        for idx, layer in enumerate(self.adapter.decoder_layers()):
            if idx in self._hidden:
                self._handles.append(layer.register_forward_pre_hook(self._layer_hook(idx), with_kwargs=True))
        contrasts = [c for m in methods_contrast(self.methods) if (c := m) is not None]
        if contrasts:
            gamma, cutoff = contrasts[0]
            self.contrast = Contrast(self.model, self.adapter, gamma, cutoff)

    def uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.contrast is not None:
            self.contrast.remove()
            self.contrast = None
        for module in self._attention_modules:
            if _SESSIONS.get(module) is self:
                del _SESSIONS[module]
        self._attention_modules = []
        self.vision_index = {}
        if self._previous:
            self.model.set_attn_implementation(self._previous)
            self._previous = {}
        self.layout = None
        self.plans, self.decode_plans, self._last_decode = {}, {}, {}
        self.state = [{} for _ in self.methods]
        _unregister_functions()

    @contextmanager
    def disabled(self):
        """Run the model unedited (plain SDPA in every layer) inside the block."""
        was = self.enabled
        self.enabled = False
        if self.contrast is not None:
            self.contrast.enabled = False
        try:
            yield
        finally:
            self.enabled = was
            if self.contrast is not None:
                self.contrast.enabled = was

    # -- hooks ------------------------------------------------------------------------------
    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.probing:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        tokens = input_ids if input_ids is not None else embeds
        if tokens is None:
            return
        if torch.compiler.is_compiling():
            if self.enabled and tokens.shape[1] > 1:  # shapes are known while tracing
                raise MitigationError(COMPILED_PREFILL)
            return  # a compiled decode step: everything it needs was prepared at prefill
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = _cached_length(cache)
        if not self.enabled:  # a disabled block runs plainly and leaves the mitigated generation as it was
            return
        self.past = past
        self.prefill = past == 0
        if not self.prefill:
            if tokens.shape[1] > 1:
                raise MitigationError(
                    f"mitigate: this forward continues a cached prompt with {tokens.shape[1]} new tokens "
                    "(chunked prefill, or a prompt continued from a cached prefix). The methods read the "
                    "whole prompt at its prefill (sinks, saliency, image spans), so they would silently "
                    "differ here; run the prompt in one prefill (no prefill_chunk_size, no reused cache)."
                )
            if self.layout is None or (self._cache is not None and self._cache() is not cache):
                raise MitigationError(
                    "mitigate: a decode step on a cache whose prompt was not prefilled under this "
                    "mitigation (applied in the middle of a generation, or prefilled inside disabled()); its "
                    "edits would be missing or another prompt's: start the generation again"
                )
            return
        uncached = kwargs.get("use_cache") is False and input_ids is not None
        if uncached and _continues(input_ids, self._uncached):
            raise MitigationError(
                "mitigate: this forward, without a cache, repeats the previous prompt and adds tokens to it "
                "(generate(use_cache=False)). The methods plan their edits from the prompt at its prefill "
                "and treat later tokens as decode rows, which a pass without a cache would re-plan as "
                "prompt: generate with the cache (the default)"
            )
        self._uncached = input_ids if uncached else None
        mask = kwargs.get("attention_mask")
        if torch.is_tensor(mask) and mask.dim() == 4:  # a static cache: transformers built the 4-D mask
            mask = padding_of(mask)
        self.layout = self.adapter.layout(
            input_ids, embeds, mask if torch.is_tensor(mask) and mask.dim() == 2 else None
        )
        self.adapter.check_inputs({**kwargs, "input_ids": input_ids}, self.layout)
        self.static = bool(getattr(cache, "is_compileable", False))
        self.decode_length = _static_length(cache) if self.static else self.layout.prompt_len + 64
        self.plans = {}
        # the last generation's folded plans: a static cache refills their storage (see _plan)
        self._last_decode, self.decode_plans = self.decode_plans, {}
        self._cache = _weak(cache)  # decode steps must continue this prompt's cache
        for method, state in zip(self.methods, self.state, strict=True):
            method.reset(state, self.layout)
        if self._probe:
            self.probe(module, args, kwargs)

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not torch.compiler.is_compiling() and not self.probing:
            self.prefill = False  # the layer hooks and attention calls that follow are decode steps

    def _layer_hook(self, layer_idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not (self.enabled and self.prefill) or self.probing or self.layout is None:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            for method, state in zip(self.methods, self.state, strict=True):
                if layer_idx in method.hidden_layers():
                    method.observe_hidden(layer_idx, hidden, self.layout, state)

        return hook

    @torch.no_grad()
    def probe(self, base: nn.Module, args: tuple, kwargs: dict) -> None:
        """One extra prefill of the multimodal model, over ``2B`` rows (the prompt rows, then the same rows
        without their images, :mod:`.twins`) when a method compares the two, else over the prompt rows;
        methods see every layer's head outputs and, where they ask, some rows' probabilities. Going through
        the family's own forward keeps its masks (bidirectional image blocks, windows) right."""
        layout = self.layout
        call = dict(kwargs)
        if args:
            call["input_ids"] = args[0]
        if call.get("input_ids") is None:
            raise RuntimeError("mitigate: the probe pass needs input_ids")
        for name in ("cache", "past_key_values", "logits_to_keep", "use_cache"):
            call.pop(name, None)
        mask = call.get("attention_mask")
        mask = layout.valid.long() if not torch.is_tensor(mask) or mask.dim() != 2 else mask
        call["attention_mask"] = mask
        if call.get("position_ids") is None:
            call["position_ids"] = self.adapter.prompt_positions(call, mask)
        if self._twins:
            pad = (
                getattr(self.model.generation_config, "pad_token_id", None)
                if hasattr(self.model, "generation_config")
                else None
            )
            call, _ = double_batch(call, layout.image_span, mask, 0 if pad is None else int(pad))
            call = self.adapter.double_images(call, layout.batch_size)
        self.probing = True
        try:
            with self.adapter.extra_pass():
                base(**call, use_cache=False)
        finally:
            self.probing = False

    # -- attention --------------------------------------------------------------------------
    def vision_attention(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float,
        scaling: float | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """Plain attention for the vision tower, plus the CLS row's probabilities where a method asks."""
        layer = self.vision_index[module]
        if self.enabled and not self.probing and layer in self._vision:
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            logits = scale * (query[:, :, :1].float() @ key.float().transpose(-1, -2))
            if attention_mask is not None:
                mask = attention_mask[:, :, :1]
                logits = (
                    logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
                )
            cls = torch.softmax(logits, dim=-1)[:, :, 0]  # [images, heads, tokens]
            cls = self.adapter.cls_to_features(cls)  # [images, heads, image tokens]
            for method, state in zip(self.methods, self.state, strict=True):
                if layer in method.vision_layers():
                    method.observe_vision(layer, cls, state)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    def attention(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float,
        scaling: float | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        layer = getattr(module, "layer_idx", None)
        if torch.compiler.is_compiling() and query.shape[2] > 1 and layer in self._edited:
            raise MitigationError(COMPILED_PREFILL)  # (the hook above may run outside the compiled code)
        if self.probing:
            return self._probe_attention(
                module, layer, query, key, value, attention_mask, dropout, scaling, **kwargs
            )
        if layer not in self._edited:
            if self.prefill and self.layout is not None and not torch.compiler.is_compiling():
                key, value, attention_mask = self._prompt_keys(module, query, key, value, attention_mask)
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        if scaling is None:
            scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        causal = bool(getattr(module, "is_causal", True))
        if self.prefill and not torch.compiler.is_compiling():
            window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
            out = self._prefill_attention(
                module, layer, query, key, value, attention_mask, scaling, causal, window
            )
            return out, None
        prepared = self.decode_plans.get(layer)
        if prepared is None:
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        if torch.compiler.is_compiling():
            offset, stats = 0, None  # a static cache: key slots are positions
        else:
            offset, stats = max(0, self.past + query.shape[2] - key.shape[2]), self.stats
            need = offset + key.shape[2]
            if need > prepared.length:  # a dynamic cache outgrew the folded plan
                if need > self.decode_length:  # once per step: the step's other layers follow this length
                    self.decode_length = max(2 * self.decode_length, need)
                prepared = self._prepare(self.plans[layer], query, key, scaling)
                self.decode_plans[layer] = prepared
            if stats is not None:
                self._count_rows(self.plans[layer], None, query.shape[2])
        window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        call = KernelCall(
            scaling=scaling, causal=causal, past=None, key_offset=offset, stats=stats, window=window
        )
        if stats is not None:  # recording: the plan itself, on a path that reports what its rules did
            plan = self.plans[layer].to(query.device)
            return torch_attention(query, key, value, attention_mask, plan, call), None
        return self.kernel.decode(query, key, value, attention_mask, prepared, call), None

    def _prefill_attention(self, module, layer, query, key, value, attention_mask, scaling, causal, window):
        """A prefill call: plan the layer (once per generation), let methods observe rows, run the plan."""
        length = self.layout.prompt_len
        key, value, attention_mask = self._prompt_keys(module, query, key, value, attention_mask, False)
        if key.shape[2] != length or not 0 < query.shape[2] <= length:
            raise MitigationError(
                f"mitigate: layer {layer} got {query.shape[2]} queries and {key.shape[2]} keys at the "
                f"prefill of a {self.layout.prompt_len}-token prompt; edits are planned over the whole prompt"
            )
        past = length - query.shape[2]  # fewer rows (Gemma 4's shared layers): the prompt's last ones
        plan = self._plan(layer, query, key, scaling)
        if plan is not None and plan.core and self.static and window and window < self.decode_length:
            raise MitigationError(
                f"mitigate: layer {layer} keeps a sliding window of {window} keys in a static cache of "
                f"{self.decode_length}; once the window rolls, its key slots no longer map to positions, "
                "which the per-key edits need. Use the default dynamic cache, or a static cache no longer "
                "than the window."
            )
        call = KernelCall(
            scaling=scaling,
            causal=causal,
            past=past,
            stats=self.stats,
            window=window,
            key_valid=self.layout.valid,
            plain_mask=self.adapter.plain_masks,
        )
        if past == 0:
            self._observe(layer, query, key, attention_mask, plan, call)
        if plan is None:
            mask = attention_mask
            if mask is None and causal and 1 < query.shape[2] < key.shape[2]:
                mask = causal_keep(query.shape[2], key.shape[2], query.device)[None, None]
            out, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=scaling)
            return out
        if self.stats is not None:
            self._count_rows(plan, past, query.shape[2])
        return self.kernel.run(query, key, value, attention_mask, plan.to(query.device), call)

    def _prompt_keys(self, module, query, key, value, attention_mask, bottom: bool = True):
        """A prefill call's keys over the prompt only: a static cache's empty slots after the prompt are
        cut off. With fewer query rows than prompt keys and no mask (Gemma 4's shared layers when
        ``generate`` keeps rows), the rows are the prompt's last ones: with ``bottom``, the causal mask is
        built bottom-right aligned (SDPA's own ``is_causal`` would align it top-left)."""
        length = self.layout.prompt_len
        if self.static and key.shape[2] > length:
            key, value = key[:, :, :length], value[:, :, :length]
            if torch.is_tensor(attention_mask):
                attention_mask = attention_mask[..., :length]
        nq, nk = query.shape[2], key.shape[2]
        if bottom and attention_mask is None and 1 < nq < nk and getattr(module, "is_causal", True):
            attention_mask = causal_keep(nq, nk, query.device)[None, None]
        return key, value, attention_mask

    def _plan(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> LayerPlan | None:
        if layer in self.plans:
            return self.plans[layer]
        ctx = PlanContext(layer_idx=layer, layout=self.layout, num_heads=query.shape[1])
        stages = [
            stage
            for method, state in zip(self.methods, self.state, strict=True)
            if layer in method.edited_layers()
            for stage in method.plan(ctx, state)
        ]
        plan = LayerPlan.of(layer, self.layout.prompt_len, stages).to(query.device) if stages else None
        # a layer that edits no row of this batch is dropped (one read per layer and prompt); a static
        # cache keeps a fixed structure, so that the next prompt of this shape reuses the compiled graph
        if plan is not None and not self.static and not any(s.rows.decode_on().any() for s in plan.stages):
            plan = None
        self.plans[layer] = plan
        if plan is not None:
            previous = self._last_decode.get(layer)
            prepared = self._prepare(plan, query, key, scaling)
            # a static cache keeps the storage of the last generation's folded plan, so that a compiled
            # decode step (and its CUDA graph) sees the same tensors for the next prompt of this shape
            self.decode_plans[layer] = (
                previous if self.static and previous is not None and previous.refill(prepared) else prepared
            )
        return plan

    def _prepare(self, plan: LayerPlan, query: torch.Tensor, key: torch.Tensor, scaling: float):
        return self.kernel.prepare(
            plan,
            length=self.decode_length,
            dtype=query.dtype,
            num_heads=query.shape[1],
            num_kv_heads=key.shape[1],
            scaling=scaling,
        )

    def _observe(self, layer, query, key, attention_mask, plan: LayerPlan | None, call: KernelCall) -> None:
        """Methods that read some rows' final probabilities in this layer (GIFT's saliency) get them."""
        for method, state in zip(self.methods, self.state, strict=True):
            span = method.observe_rows(layer, state) if layer in method.edited_layers() else None
            if span is None:
                continue
            index = torch.arange(span[0], span[1], device=query.device)
            probs = probabilities(query, key, attention_mask, plan, replace(call, stats=None), index)
            method.observe_probs(layer, probs, index, state)

    def _count_rows(self, plan: LayerPlan, past: int | None, num_rows: int) -> None:
        for stage in plan.stages:
            rows = stage.rows.decode_on().sum() if past is None else stage.rows.count(past, num_rows)
            self.stats.add(stage.method, plan.layer, edited_rows=rows)

    def _probe_attention(self, module, layer, query, key, value, attention_mask, dropout, scaling, **kwargs):
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        rows = self.layout.batch_size
        for method, state in zip(self.methods, self.state, strict=True):
            if not method.needs_probe():
                continue
            span = method.probe_rows(layer, state)
            if span is not None and query.shape[2] == self.layout.prompt_len:
                # the prompt rows' probabilities (the twins, if any, follow them in the batch)
                index = torch.arange(span[0], span[1], device=query.device)
                call = KernelCall(
                    scaling=scaling if scaling is not None else getattr(module, "scaling", None)
                    or query.shape[-1] ** -0.5,
                    causal=bool(getattr(module, "is_causal", True)),
                )
                mask = attention_mask[:rows] if torch.is_tensor(attention_mask) else attention_mask
                probs = probabilities(query[:rows], key[:rows], mask, None, call, index)
                method.observe_probs(layer, probs, index, state)
            out = method.probe_output(layer, out, self.layout, state)
        return out, None


def _continues(ids: torch.Tensor, previous: torch.Tensor | None) -> bool:
    """Whether ``ids`` is ``previous`` with tokens appended (a generation step without a cache)."""
    if previous is None or ids.shape[0] != previous.shape[0] or ids.shape[1] <= previous.shape[1]:
        return False
    return bool(torch.equal(ids[:, : previous.shape[1]], previous.to(ids.device)))


def _weak(cache: Any) -> Any:
    """A weak reference to ``cache`` (``None`` without one), so the session never keeps a cache alive."""
    if cache is None:
        return None
    try:
        return weakref.ref(cache)
    except TypeError:
        return None


def _cached_length(cache: Any) -> int:
    """Tokens already in ``cache`` (an eager call: a static cache's count is read from the device)."""
    if cache is None:
        return 0
    return int(cache.get_seq_length())


def _static_length(cache: Any) -> int:
    """How many key slots a static cache holds (the longest a generation on it can grow)."""
    length = getattr(cache, "max_cache_len", None)
    if length is None:
        length = max(getattr(layer, "max_cache_len", 0) for layer in cache.layers)
    return int(length)


def methods_contrast(methods: list[Method]) -> list[tuple[float, float | None] | None]:
    """Each method's image-free contrast setting ``(gamma, cutoff)``, or ``None``."""
    return [m.contrast() if hasattr(m, "contrast") else None for m in methods]


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
