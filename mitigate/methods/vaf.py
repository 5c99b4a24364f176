"""VAF: Visual Amplification Fusion (ClearSight, Yin et al., CVPR 2025; code: ustc-hyin/ClearSight).

In the middle layers (9..14 of LLaVA-1.5-7B), every head's logits to image keys are multiplied by
``image_scale`` (1.15) and to the system prefix (the tokens before the first image) by ``system_scale``
(0.95), before the softmax. ``rows="all"`` edits every query row, as DESIGN.md states the method;
``rows="after_image"`` edits only rows after the image at prefill (and every decode row), as the
released code does.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ..context import TokenLayout
from ..plan import LogitStage, Stage
from .base import Method, MethodConfig, PlanContext
from .registry import register_method


class VAFConfig(MethodConfig):
    image_scale: float = Field(gt=0, description="multiplies logits to image keys")
    system_scale: float = Field(gt=0, description="multiplies logits to the prefix before the first image")
    rows: Literal["all", "after_image"] = Field(description="which query rows are edited")


@register_method
class VAF(Method):
    name = "vaf"
    Config = VAFConfig
    summary = "Scale attention logits up on image keys and down on the system prefix, in middle layers."

    def default_layers(self) -> list[int]:
        return self.scaled_layers(9, 14)

    def reset(self, state: dict[str, Any], layout: TokenLayout) -> None:
        state.clear()
        cfg = self.config
        scale = (
            1 + (cfg.image_scale - 1) * layout.image.float() + (cfg.system_scale - 1) * layout.prefix.float()
        )
        state["scale"] = scale[:, None, :]

    def plan(self, ctx: PlanContext, state: dict[str, Any]) -> list[Stage]:
        every = self.config.rows == "all"
        rows = ctx.all_rows(ctx.layout.has_image) if every else ctx.rows_after_image()
        return [LogitStage(method=self.name, rows=rows, scale=state["scale"])]
