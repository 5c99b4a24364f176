"""VAR: Visual Attention Redistribution ("See What You Are Told", ICLR 2025; code: VisAttnSink).

At prefill, in every edited layer, tokens whose RMS-normalised input hidden state is massive in the
model's sink dimensions are sinks. In layers with at least one image sink, image-centric heads (enough
image mass, mostly on non-sink image tokens) move ``moved_fraction`` of their sink mass (image and text
sinks) to the non-sink image tokens, in proportion to their probability. Rows after the image at prefill
and every decode row are edited.

The plan is a :class:`~mitigate.plan.VarRule` over four key groups per layer, so fast kernels run it from
group masses alone.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from ..context import ModelInfo, TokenLayout
from ..errors import ConfigError
from ..plan import Stage, VarRule
from .base import Method, MethodConfig, PlanContext
from .registry import register_method

#: the released code normalises with a fixed eps (VisAttnSink src/logic/logic.py), not the model's
RMS_EPS = 1e-6
#: how many dimensions ``sink_dims="auto"`` takes per prompt row and layer (the released code uses two)
AUTO_SINK_DIMS = 2

OTHER, TEXT_SINK, IMAGE_SINK, IMAGE = VarRule.OTHER, VarRule.TEXT_SINK, VarRule.IMAGE_SINK, VarRule.IMAGE


class VARConfig(MethodConfig):
    sink_dims: list[int] | Literal["auto"] = Field(
        description="hidden dimensions of massive activations, or 'auto' to take the largest per prompt"
    )
    tau: float = Field(gt=0, description="sink threshold on the RMS-normalised hidden state")
    moved_fraction: float = Field(ge=0, le=1, description="fraction of sink mass moved to image tokens")
    min_nonsink_ratio: float = Field(ge=0, le=1, description="head gate: non-sink share of image mass")
    min_image_mass: float = Field(ge=0, le=1, description="head gate: image mass of the row")

    @field_validator("sink_dims")
    @classmethod
    def _dims(cls, value: list[int] | str) -> list[int] | str:
        if isinstance(value, list) and (not value or min(value) < 0):
            raise ValueError("sink_dims must be non-empty and non-negative, or 'auto'")
        return value


def sink_scores(hidden: torch.Tensor, dims: list[int] | str, eps: float, valid: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: max over sink dims of ``|RMSNorm(h)|`` (no learned weight); padding gets 0."""
    h = hidden.float()
    normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).abs()
    normed = normed * valid[..., None]
    if dims == "auto":
        top = normed.amax(dim=1).topk(AUTO_SINK_DIMS, dim=-1).indices  # [B, k]: the row's largest dims
        picked = normed.gather(-1, top[:, None, :].expand(-1, normed.shape[1], -1))
    else:
        picked = normed[..., dims]
    return picked.amax(-1)


@register_method
class VAR(Method):
    name = "var"
    Config = VARConfig
    summary = "Move attention from sink tokens to non-sink image tokens in image-centric heads."
    every_row = True  # sinks are read from every prompt token's input hidden state

    def __init__(self, config: VARConfig, info: ModelInfo, preset: str | None = None, processor: Any = None):
        super().__init__(config, info, preset, processor)
        if isinstance(config.sink_dims, list) and max(config.sink_dims) >= info.hidden_size:
            raise ConfigError(
                f"var: sink_dims {config.sink_dims} do not fit this model's hidden size {info.hidden_size}. "
                "The defaults are Llama-2-7B's massive-activation dims; pass sink_dims='auto' or find this "
                "model's with `mitigate calibrate`."
            )

    def hidden_layers(self) -> frozenset[int]:
        return frozenset(self.layers)

    def observe_hidden(
        self, layer_idx: int, hidden: torch.Tensor, layout: TokenLayout, state: dict[str, Any]
    ) -> None:
        scores = sink_scores(hidden, self.config.sink_dims, RMS_EPS, layout.valid)
        sinks = (scores > self.config.tau) & layout.valid
        image = layout.image
        image_sink_rows = (sinks & image).any(dim=1)  # [B]
        groups = torch.full_like(image, OTHER, dtype=torch.long)
        groups[sinks & ~image] = TEXT_SINK
        groups[sinks & image] = IMAGE_SINK
        groups[~sinks & image] = IMAGE
        state.setdefault("groups", {})[layer_idx] = groups
        state.setdefault("active_rows", {})[layer_idx] = image_sink_rows

    def plan(self, ctx: PlanContext, state: dict[str, Any]) -> list[Stage]:
        layer = ctx.layer_idx
        if layer not in state.get("groups", {}):
            return []
        cfg = self.config
        rule = VarRule(
            method=self.name,
            rows=ctx.rows_after_image(state["active_rows"][layer]),
            groups=state["groups"][layer],
            fraction=cfg.moved_fraction,
            min_nonsink_ratio=cfg.min_nonsink_ratio,
            min_image_mass=cfg.min_image_mass,
        )
        return [rule]
