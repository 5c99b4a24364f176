"""VHR: Vision-aware Head Reinforcement ("Cracking the Code of Hallucination in LVLMs with Vision-aware
Head Divergence", He et al., ACL 2025; code: jinghan1he/VHR, not readable here: built from the paper).

At the first generation step the prompt runs twice in one batch, with and without its image tokens (the
session's probe pass). Layer by layer over ``layers``, each head's output at the last position gives
``vhd = ||o_img - o_txt||_2`` and ``ta = ||o_txt||^2``; with ``outlier_filter``, heads with both above
their layer's mean + std get ``vhd = 0``; heads with ``vhd`` above the layer's median are chosen and
their outputs multiplied by ``alpha`` in both branches, so later layers see reinforced inputs. The
chosen heads are then scaled at every position for the rest of the generation.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from ..context import TokenLayout
from ..plan import HeadStage, Stage
from .base import Method, MethodConfig, PlanContext
from .registry import register_method


class VHRConfig(MethodConfig):
    alpha: float = Field(gt=0, description="multiplies the outputs of the chosen heads")
    outlier_filter: bool = Field(description="zero vhd of heads that are outliers in both vhd and ta")


def choose_heads(o_img: torch.Tensor, o_txt: torch.Tensor, outlier_filter: bool) -> torch.Tensor:
    """bool ``[B, H]`` from head outputs at the last position ``[B, H, D]`` with and without the image."""
    vhd = (o_img.float() - o_txt.float()).norm(dim=-1)
    if outlier_filter:
        ta = o_txt.float().pow(2).sum(-1)
        high_vhd = vhd > vhd.mean(-1, keepdim=True) + vhd.std(-1, keepdim=True)
        high_ta = ta > ta.mean(-1, keepdim=True) + ta.std(-1, keepdim=True)
        vhd = torch.where(high_vhd & high_ta, torch.zeros_like(vhd), vhd)
    return vhd > vhd.median(-1, keepdim=True).values


@register_method
class VHR(Method):
    name = "vhr"
    Config = VHRConfig
    summary = "Reinforce the heads whose output changes most without the image (chosen at the first step)."

    def default_layers(self) -> list[int]:
        # layer 1 and the last 14 of 32 (LLaVA-1.5-7B), the last 14/32 of the depth elsewhere
        depth = self.info.num_layers
        last = max(1, round(14 * depth / 32))
        return sorted({min(1, depth - 1), *range(depth - last, depth)})

    def needs_probe(self) -> bool:
        return True

    def probe_output(
        self, layer_idx: int, out: torch.Tensor, layout: TokenLayout, state: dict[str, Any]
    ) -> torch.Tensor:
        if layer_idx not in self.edited_layers():
            return out
        bsz = out.shape[0] // 2
        chosen = choose_heads(out[:bsz, -1], out[bsz:, -1], self.config.outlier_filter)
        # a row without an image is its own twin: no head diverges (where a family's batched kernels are
        # not bit-identical across rows, Qwen3.5's linear attention, noise would otherwise pick heads)
        chosen = chosen & layout.has_image[:, None].to(chosen.device)
        state.setdefault("heads", {})[layer_idx] = chosen
        factor = torch.where(chosen, self.config.alpha, 1.0).to(out.dtype)  # [B, H]
        return out * factor.repeat(2, 1)[:, None, :, None]

    def plan(self, ctx: PlanContext, state: dict[str, Any]) -> list[Stage]:
        heads = state.get("heads", {}).get(ctx.layer_idx)
        if heads is None:  # the probe did not run (e.g. edits disabled at prefill)
            return []
        scale = torch.where(heads, self.config.alpha, 1.0)
        return [HeadStage(method=self.name, rows=ctx.all_rows(), scale=scale)]
