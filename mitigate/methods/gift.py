"""GIFT: gaze-shift guidance ("Capturing Gaze Shifts for Guidance", 2025; code: amazon-science/GIFT).

Saliency, once per prompt, from the same prefill pass: in ``saliency_layers``, for the user-query rows,
the positive part of the change in attention to each image key from the previous row; only informative
query tokens count (``pos_filter``); per layer the ``head_fraction`` of heads with the most total change
are kept; the average over layers, heads and tokens is clamped to mean +- 3 std, min-max scaled to
``[0, alpha]`` and exponentiated: ``S``.

Enhancement, in ``enhance_layers`` on the last query row only: the heads with the most image mass get
their image probabilities multiplied by ``S``; ``g`` = their new image mass over their old one (one
scalar per row); the heads with the most user-query mass get their query probabilities multiplied by
``g``; the row is renormalised. A prompt with no informative query token, or a constant saliency map,
gets no enhancement (logged at debug level), never NaN.

The released code pays a whole extra eager prefill to get the saliency. Here, when every saliency layer
precedes every enhanced layer (LLaVA's 11 and 12..22), the saliency layers only observe the few query
rows they need in the pass that generates: no extra pass, the same numbers (the enhancement touches
only the last row, after the saliency layers). Otherwise (the released Qwen2-VL setting: saliency 14,
enhance 5..18) the saliency is read in one prefill probe before the real pass, as the released code
does; with VHR in the same composition that one probe serves both, and the saliency then sees VHR's
reinforced heads, as it would in the generating pass.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from pydantic import Field, model_validator

from ..context import ModelInfo, TokenLayout
from ..errors import ConfigError
from ..plan import GiftRule, Stage
from .base import Method, MethodConfig, PlanContext
from .registry import register_method
from .text import TAGGER, informative_tokens, query_spans, resolve_tokenizer

log = logging.getLogger("mitigate")


class GIFTConfig(MethodConfig):
    saliency_layers: list[int] | None = Field(description="layers whose attention gives the saliency map")
    enhance_layers: list[int] | None = Field(description="layers whose last row is enhanced")
    alpha: float = Field(gt=0, description="saliency is min-max scaled to [0, alpha] before exp")
    head_fraction: float = Field(gt=0, le=1, description="share of heads kept at each selection")
    pos_filter: bool = Field(
        description="keep only informative query tokens (nouns, verbs, ...) for saliency"
    )

    @model_validator(mode="after")
    def _no_layers_field(self):
        if self.layers is not None:
            raise ValueError("gift has saliency_layers and enhance_layers, not layers")
        return self


def saliency_map(changes: list[torch.Tensor], alpha: float, head_fraction: float) -> torch.Tensor | None:
    """``S [n_image]`` from per-layer positive attention changes ``[heads, tokens, n_image]``; ``None``
    when there is no token or the map is constant."""
    if not changes or changes[0].shape[1] == 0:
        return None
    keep = max(1, int(changes[0].shape[0] * head_fraction))
    per_layer = []
    for change in changes:
        heads = change.sum(dim=(1, 2)).topk(keep).indices
        per_layer.append(change[heads].mean(dim=(0, 1)))
    s = torch.stack(per_layer).mean(0)
    if s.numel() < 2:
        return None
    mean, std = s.mean(), s.std()
    s = s.clamp(float(mean - 3 * std), float(mean + 3 * std))
    low, high = s.min(), s.max()
    if not bool(high > low):
        return None
    return torch.exp(alpha * (s - low) / (high - low))


@register_method
class GIFT(Method):
    name = "gift"
    Config = GIFTConfig
    summary = "Boost image keys by a saliency map from the query's gaze shifts, on the last row."

    def __init__(self, config: GIFTConfig, info: ModelInfo, preset: str | None = None, processor: Any = None):
        super().__init__(config, info, preset, processor)
        # the saliency reads every query row's probabilities; the enhancement only the last row
        self.saliency = self._check_layers(
            config.saliency_layers or None,
            "saliency_layers",
            default=lambda: self.scaled_layers(11, 11),
            every_row=True,
        )
        self.enhance_at = self._check_layers(
            config.enhance_layers or None, "enhance_layers", default=lambda: self.scaled_layers(12, 22)
        )
        #: the saliency comes from a probe prefill (an enhanced layer does not follow every saliency layer)
        self.probed = min(self.enhance_at) <= max(self.saliency)
        self.layers = tuple(sorted({*self.saliency, *self.enhance_at}))
        # with a probe, the generating pass only enhances
        self._edited_layers = frozenset(self.enhance_at if self.probed else self.layers)
        self.processor = resolve_tokenizer(processor, info.name_or_path)
        if config.pos_filter and self.processor is None:
            raise ConfigError(
                "gift: pos_filter needs the model's tokenizer to read the query's words; pass it with "
                "apply_mitigation(model, 'gift', processor=processor), or set pos_filter=False"
            )

    def resolved_params(self) -> dict[str, Any]:
        params = super().resolved_params()
        params.pop("layers")
        params.update(saliency_layers=list(self.saliency), enhance_layers=list(self.enhance_at))
        params["pos_tagger"] = TAGGER if self.config.pos_filter else None
        return params

    # -- saliency -------------------------------------------------------------------------------
    def reset(self, state: dict[str, Any], layout: TokenLayout) -> None:
        state.clear()
        if layout.ids is None:
            raise RuntimeError("gift needs input_ids (not inputs_embeds) to find the user's query")
        spans = query_spans(layout.ids, layout.query, self.processor)
        bsz, length = layout.valid.shape
        observe = torch.zeros(bsz, length, dtype=torch.bool, device=layout.valid.device)
        kept: list[list[int]] = []
        for row, span in enumerate(spans):
            if span is None or not bool(layout.has_image[row]):
                kept.append([])
                continue
            first, last = span
            positions = list(range(first, last + 1))
            if self.config.pos_filter:
                ids = layout.ids[row, first : last + 1].tolist()
                positions = [
                    p for p, ok in zip(positions, informative_tokens(self.processor, ids), strict=True) if ok
                ]
            if positions:
                observe[row, first - 1 : last + 1] = True  # the row before the query: the first change
            kept.append(positions)
        query_keys = torch.zeros_like(observe)
        for row, span in enumerate(spans):
            if span is not None:
                query_keys[row, span[0] : span[1] + 1] = True
        firsts = [span[0] - 1 for span, k in zip(spans, kept, strict=True) if span is not None and k]
        lasts = [span[1] + 1 for span, k in zip(spans, kept, strict=True) if span is not None and k]
        observe_span = (min(firsts), max(lasts)) if firsts else (0, 0)
        state.update(
            observe=observe,
            kept=kept,
            rows={},
            query=query_keys,
            observe_span=observe_span,
        )

    def needs_probe(self) -> bool:
        return self.probed

    def probe_twins(self) -> bool:
        return False  # the saliency reads the prompt rows only

    def probe_rows(self, layer_idx: int, state: dict[str, Any]) -> tuple[int, int] | None:
        span = state["observe_span"]
        return span if self.probed and layer_idx in self.saliency and span[1] > span[0] else None

    def observe_rows(self, layer_idx: int, state: dict[str, Any]) -> tuple[int, int] | None:
        span = state["observe_span"]
        return span if not self.probed and layer_idx in self.saliency and span[1] > span[0] else None

    def observe_probs(
        self, layer_idx: int, probs: torch.Tensor, positions: torch.Tensor, state: dict[str, Any]
    ) -> None:
        device = state["observe"].device  # layers may sit on other GPUs (device_map)
        seen = state["rows"].setdefault(layer_idx, {})
        for r, position in enumerate(positions.tolist()):
            seen[position] = probs[:, :, r].float().to(device)

    def _weights(self, layout: TokenLayout, state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-key saliency ``[B, T]`` (1 off the image) and the batch rows that get enhanced ``[B]``."""
        bsz, length = layout.valid.shape
        weights = torch.ones(bsz, length, device=layout.valid.device)
        enhanced = torch.zeros(bsz, dtype=torch.bool, device=layout.valid.device)
        for row, positions in enumerate(state["kept"]):
            image_keys = layout.image[row].nonzero().squeeze(1)
            changes = []
            for layer in self.saliency:
                seen = state["rows"].get(layer, {})
                if not positions or any(p not in seen or p - 1 not in seen for p in positions):
                    changes = []
                    break
                now = torch.stack([seen[p][row][:, image_keys] for p in positions], dim=1)
                before = torch.stack([seen[p - 1][row][:, image_keys] for p in positions], dim=1)
                changes.append((now - before).clamp_min(0))  # [heads, tokens, n_image]
            s = saliency_map(changes, self.config.alpha, self.config.head_fraction)
            if s is None:
                log.debug(
                    "gift: no enhancement for row %d (no informative query token or flat saliency)", row
                )
                continue
            weights[row, image_keys] = s
            enhanced[row] = True
        return weights, enhanced

    # -- plan -----------------------------------------------------------------------------------
    def plan(self, ctx: PlanContext, state: dict[str, Any]) -> list[Stage]:
        if ctx.layer_idx not in self.enhance_at:
            return []
        if "weights" not in state:  # once per prefill, after every saliency layer has been seen
            state["weights"], state["enhanced"] = self._weights(ctx.layout, state)
            state["rows"] = {}
        layout = ctx.layout
        groups = torch.full_like(layout.image, GiftRule.OTHER, dtype=torch.long)
        groups[state["query"]] = GiftRule.QUERY
        groups[layout.image] = GiftRule.IMAGE
        rule = GiftRule(
            method=self.name,
            rows=ctx.last_row(state["enhanced"]),
            groups=groups,
            weights=state["weights"],
            head_fraction=self.config.head_fraction,
        )
        return [rule]
