"""PAINT: dual-stream token selection on top of PAI ("Fixing Imbalanced Attention to Mitigate In-Context
Hallucination of Large Vision-Language Model", 2025; code: hasanar1f/PAINT).

The vision tower's CLS query picks two sets of patches per image (where the projector merges patches
into one image token, InternVL's 2x2 pixel shuffle, a token's attention is the sum over its patches and
the sets are of tokens: the family's adapter does that mapping): ``local`` = the top ``local_ratio`` of
patches by CLS attention (summed over heads) in the tower's first layer, and ``summary`` = the patches
above ``Q3 + 1.5*IQR`` of that attention in the layer the projector reads; ``local -= summary``. In the
edited language layers, the last query row's logits grow by ``alpha*|z|`` on local image keys and
``beta*|z|`` on summary keys.

Only the CLS row of the vision attention is computed (the session routes the tower's attention through
mitigate for that one forward); full attention maps are never requested.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from ..context import ModelInfo, TokenLayout
from ..plan import LogitStage, Stage
from .base import Method, MethodConfig, PlanContext
from .registry import register_method

#: the IQR rule's fence, Q3 + k*IQR (PAINT clip_encoder.py get_top_ratio)
IQR_FENCE = 1.5


class PAINTConfig(MethodConfig):
    alpha: float = Field(ge=0, description="logit boost alpha*|z| on local image keys")
    beta: float = Field(ge=0, description="logit boost beta*|z| on summary image keys")
    local_ratio: float = Field(gt=0, le=1, description="share of patches in the local set")


def token_sets(
    first: torch.Tensor, feature: torch.Tensor, local_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(local, summary)`` bool ``[images, patches]`` from CLS attention per patch in the two layers."""
    patches = first.shape[-1]
    top = first.topk(int(patches * local_ratio), dim=-1).indices
    local = torch.zeros_like(first, dtype=torch.bool).scatter_(-1, top, True)
    q1, q3 = torch.quantile(feature.float(), torch.tensor([0.25, 0.75], device=feature.device), dim=-1)
    summary = feature > (q3 + IQR_FENCE * (q3 - q1))[:, None]
    return local & ~summary, summary


def per_key(features: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Spread per-image feature values ``[images, F]`` over prompt keys ``[B, T]``: the r-th image
    token of the batch (row-major) is feature ``r % F`` of image ``r // F``."""
    count = int(image.sum())
    if count != features.numel():
        raise RuntimeError(f"paint: {count} image tokens in the prompt but {features.numel()} image features")
    out = torch.zeros(image.shape, dtype=features.dtype, device=features.device)
    out[image] = features.reshape(-1)
    return out


@register_method
class PAINT(Method):
    name = "paint"
    Config = PAINTConfig
    summary = "PAI with CLS-chosen local and summary image tokens boosted by different amounts."
    refusal_hint = "Use pai, which boosts every image token."

    @classmethod
    def unsupported(cls, info: ModelInfo) -> str | None:
        if info.vision_feature_layer is None or not info.vision_has_cls:
            return (
                "needs a vision tower with a CLS token (CLIP, InternViT): its token sets come from the CLS "
                "query's attention to the patches, and this tower has none"
            )
        if not info.flat_image_features:
            return (
                "maps the CLS-chosen patches onto image tokens one tower image after another; a base view "
                "plus tiles and row-end tokens (any-resolution LLaVA) is not mapped"
            )
        return None

    def vision_layers(self) -> frozenset[int]:
        return frozenset({0, self.info.vision_feature_layer})

    def reset(self, state: dict[str, Any], layout: TokenLayout) -> None:
        # generate() may run the vision tower before the language model's prefill: keep its capture
        captured = state.get("cls")
        state.clear()
        if captured is not None:
            state["cls"] = captured

    def observe_vision(self, layer_idx: int, cls_attention: torch.Tensor, state: dict[str, Any]) -> None:
        # summed over heads; the adapter hands one column per image feature token, in feature order
        state.setdefault("cls", {})[layer_idx] = cls_attention.sum(1)

    def _sets(self, layout: TokenLayout, state: dict[str, Any]) -> torch.Tensor:
        cls = state.pop("cls", {})  # consumed: a later prompt never reuses this image's capture
        if 0 not in cls or self.info.vision_feature_layer not in cls:
            raise RuntimeError("paint: the vision tower did not run at this prefill (no pixel_values?)")
        local, summary = token_sets(cls[0], cls[self.info.vision_feature_layer], self.config.local_ratio)
        boost = self.config.alpha * local.float() + self.config.beta * summary.float()
        if not self.info.features_drop_cls:  # the CLS feature is an image token too, never boosted
            boost = torch.nn.functional.pad(boost, (1, 0))
        state["local"], state["summary"] = local, summary
        return per_key(boost, layout.image)[:, None, :]

    def plan(self, ctx: PlanContext, state: dict[str, Any]) -> list[Stage]:
        if "abs" not in state:  # once per prefill, after the vision tower ran
            state["abs"] = self._sets(ctx.layout, state) if bool(ctx.layout.has_image.any()) else None
        if state["abs"] is None:
            return []
        rows = ctx.last_row(ctx.layout.has_image)
        return [LogitStage(method=self.name, rows=rows, abs=state["abs"])]
