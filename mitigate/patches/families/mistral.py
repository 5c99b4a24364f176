"""Mistral 3 (``Mistral3ForConditionalGeneration``, Mistral Small 3.x with Pixtral): rows of ``[IMG]``, each
row but the last closed by ``[IMG_BREAK]``, the last by ``[IMG_END]`` (own ids, text embeddings; not in the
config, so the span is "every run of image tokens plus the one token after it"). Pixtral has no CLS; a
learned 2x2 patch merger; 1-D positions; causal masks (a sliding window where the config sets one)."""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import Adapter, runs_of


class Mistral3Adapter(Adapter):
    family = "mistral3"
    title = "Mistral 3"
    config_classes = ("Mistral3Config",)
    model_classes = ("Mistral3ForConditionalGeneration",)
    builtin = "builtin:tiny-mistral3"

    def span_mask(self, input_ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        span = image.clone()
        length = image.shape[1]
        for row, mask_row in enumerate(image.tolist()):
            for _, stop in runs_of(mask_row):
                if stop < length:
                    span[row, stop] = True  # [IMG_BREAK] or [IMG_END]
        return span

    def vision_attention_modules(self) -> list[nn.Module]:
        return [layer.attention for layer in self.base_model().vision_tower.transformer.layers]

    def vision_feature_layer(self) -> int:
        return len(self.vision_attention_modules()) - 1
