"""PAI: Paying More Attention to Image (Liu et al., ECCV 2024; code: LALBJ/PAI).

In every edited layer, the last query row's logits to image keys grow by ``alpha*|z|`` in every head
(the prompt's last row at prefill, the new token at decode). Optionally, ``cfg_gamma`` turns on the
image-free contrast ``gamma*(logp - logp_noimg) + logp_noimg`` (see :mod:`mitigate.patches.contrast`).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ..context import TokenLayout
from ..plan import LogitStage, Stage
from .base import Method, MethodConfig, PlanContext
from .registry import register_method


class PAIConfig(MethodConfig):
    alpha: float = Field(ge=0, description="image-key logits of the last row grow by alpha*|z|")
    cfg_gamma: float | None = Field(
        default=None, gt=0, description="image-free contrast strength; None turns the second pass off"
    )
    cfg_cutoff: float | None = Field(
        default=None, gt=0, le=1, description="contrast: drop tokens with p < cutoff * max p (None: keep all)"
    )


@register_method
class PAI(Method):
    name = "pai"
    Config = PAIConfig
    summary = "Boost the last row's attention logits to image tokens (z += alpha*|z|); optional contrast."

    def reset(self, state: dict[str, Any], layout: TokenLayout) -> None:
        state.clear()
        state["abs"] = self.config.alpha * layout.image[:, None, :].float()

    def plan(self, ctx: PlanContext, state: dict[str, Any]) -> list[Stage]:
        rows = ctx.last_row(ctx.layout.has_image)
        return [LogitStage(method=self.name, rows=rows, abs=state["abs"])]

    def contrast(self) -> tuple[float, float | None] | None:
        """``(gamma, cutoff)`` when the image-free contrast is on."""
        if self.config.cfg_gamma is None:
            return None
        return self.config.cfg_gamma, self.config.cfg_cutoff
