"""How edits reach a model: one registered attention function, forward pre-hooks, and the per-call context.

A :class:`Session` is the live side of one mitigation on one model. ``install`` registers the ``mitigate``
attention and mask functions with transformers, switches only the language model to them, and adds:

* a pre-hook on the multimodal base model, which builds the token layout at every prefill (no cache yet)
  and notes how many keys were already cached at decode steps;
* pre-hooks on the decoder layers whose input hidden state a method needs at prefill;
* when a method reads the vision tower (PAINT), the tower's attention is routed here too, and the CLS
  query's probabilities are computed for the layers it asks for (one row, never the full map);
* when a method needs a probe (VHR), the base model's pre-hook runs one extra prefill, on the prompt
  rows and their image-free twins as one batch, before the real prefill.

``uninstall`` undoes all of it, so the model is exactly as before. Attention modules map to their session
in a weak dictionary, so several models can be mitigated at once and nothing outlives ``uninstall``.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..kernels import combine, get_kernel, resolve_kernel
from ..methods.base import AttentionCall, Method
from ..stats import Stats
from .adapters import Adapter
from .contrast import Contrast
from .layout import TokenLayout, build_layout
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
        self.past = 0
        self.positions: torch.Tensor | None = None
        self.state: list[dict[str, Any]] = [{} for _ in methods]
        self.probing = False
        self._edited = {layer for m in methods for layer in m.edited_layers()}
        self._hidden = {layer for m in methods for layer in m.hidden_layers()}
        self._vision = {layer for m in methods for layer in m.vision_layers()}
        self._probe = any(m.needs_probe() for m in methods)
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
        if not self.enabled or self.probing:  # a disabled block leaves the generation's state as it was
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        tokens = input_ids if input_ids is not None else embeds
        if tokens is None:
            return
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None else 0
        self.past = past
        self.positions = torch.arange(past, past + tokens.shape[1], device=tokens.device)
        self.prefill = past == 0
        if self.prefill:
            mask = kwargs.get("attention_mask")
            image = self.adapter.image_mask(input_ids, embeds)
            self.layout = build_layout(
                image, mask if mask is not None and mask.dim() == 2 else None, input_ids
            )
            for method, state in zip(self.methods, self.state, strict=True):
                method.reset(state, self.layout)
            if self._probe:
                self.probe(module, args, kwargs)

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
        """One extra prefill of the multimodal model over ``2B`` rows: the prompt rows, then the same rows
        without their image tokens (:mod:`.twins`); methods see every layer's head outputs. Going
        through the family's own forward keeps its masks (bidirectional image blocks, windows) right."""
        layout = self.layout
        call = dict(kwargs)
        if args:
            call["input_ids"] = args[0]
        if call.get("input_ids") is None:
            raise RuntimeError("mitigate: the probe pass needs input_ids")
        for name in ("cache", "past_key_values", "logits_to_keep", "use_cache"):
            call.pop(name, None)
        mask = call.get("attention_mask")
        mask = layout.valid.long() if mask is None or mask.dim() != 2 else mask
        call["attention_mask"] = mask
        if call.get("position_ids") is None:
            call["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
        pad = (
            getattr(self.model.generation_config, "pad_token_id", None)
            if hasattr(self.model, "generation_config")
            else None
        )
        doubled, _ = double_batch(call, layout.image, mask, 0 if pad is None else int(pad))
        self.probing = True
        try:
            base(**doubled, use_cache=False)
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
        positions = self.positions
        if self.probing:
            return self._probe_attention(
                module, layer, query, key, value, attention_mask, dropout, scaling, **kwargs
            )
        if (
            layer not in self._edited
            or self.layout is None
            or positions is None
            or positions.shape[0] != query.shape[2]
        ):
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        call = AttentionCall(
            layer_idx=layer,
            layout=self.layout,
            positions=positions,
            num_keys=key.shape[2],
            num_heads=query.shape[1],
            prefill=self.prefill,
            stats=self.stats,
            past=self.past,
            key_offset=max(0, self.past + query.shape[2] - key.shape[2]),
        )
        per_method = [
            (m, m.edit(call, s))
            for m, s in zip(self.methods, self.state, strict=True)
            if layer in m.edited_layers()
        ]
        if self.stats is not None:
            for method, ops in per_method:
                edited = [op.rows for op in ops if op.kind != "observe"]
                if edited:
                    rows = edited[0] if len(edited) == 1 else torch.stack(edited).any(0)
                    self.stats.add(method.name, layer, edited_rows=rows.sum())
        edit = combine([ops for _, ops in per_method])
        if not edit:
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        if scaling is None:
            scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        causal = bool(getattr(module, "is_causal", True))
        out = self.kernel(query, key, value, attention_mask, edit.to(query.device), scaling, causal)
        return out, None

    def _probe_attention(self, module, layer, query, key, value, attention_mask, dropout, scaling, **kwargs):
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        for method, state in zip(self.methods, self.state, strict=True):
            if method.needs_probe():
                out = method.probe_output(layer, out, self.layout, state)
        return out, None


def methods_contrast(methods: list[Method]) -> list[tuple[float, float | None] | None]:
    """Each method's image-free contrast setting ``(gamma, cutoff)``, or ``None``."""
    return [m.contrast() if hasattr(m, "contrast") else None for m in methods]


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
