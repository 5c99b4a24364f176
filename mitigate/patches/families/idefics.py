"""Idefics3 and SmolVLM: the language model sits at ``model.model.text_model``; images are split into
tiles plus a global view, each written as ``<fake_token_around_image><row_r_col_c>`` (or ``<global-img>``)
+ n x ``<image>``, a newline after each row of tiles, and a closing ``<fake_token_around_image>``.
A SigLIP-style tower without CLS, 1-D positions, causal masks.

The marker ids are not in the config; the span is read from the grammar: the two tokens before every run
of image tokens are markers (their ids are learned from the prompt), as is every later occurrence of those
ids, and the tokens between a run and the next run's markers are the tile-row newlines.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..adapters import Adapter, runs_of


class Idefics3Adapter(Adapter):
    family = "idefics3"
    title = "Idefics3"
    config_classes = ("Idefics3Config",)
    model_classes = ("Idefics3ForConditionalGeneration",)
    builtin = "builtin:tiny-idefics3"

    def language_model(self) -> nn.Module:
        return self.base_model().text_model

    def vision_attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.base_model().vision_model.encoder.layers]

    def vision_feature_layer(self) -> int:
        return len(self.vision_attention_modules()) - 1

    def span_mask(self, input_ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        rows = [runs_of(r) for r in image.tolist()]
        ids = input_ids.tolist()
        starts = [(b, start) for b, runs in enumerate(rows) for start, _ in runs]
        markers = {ids[b][i] for b, start in starts for i in (start - 2, start - 1) if i >= 0}
        span = image.clone()
        for b, runs in enumerate(rows):
            row = ids[b]
            for k, (start, stop) in enumerate(runs):
                span[b, max(0, start - 2) : start] = True
                # newlines after a row of tiles: everything up to the next run's two markers
                following = runs[k + 1][0] - 2 if k + 1 < len(runs) else None
                if following is not None and stop < len(row) and row[stop] not in markers:
                    span[b, stop:following] = True
            for i, token in enumerate(row):
                if token in markers:
                    span[b, i] = True
        return span

    def double_images(self, kwargs: dict[str, Any], rows: int) -> dict[str, Any]:
        # images come per batch row here ([B, images, ...]); twin rows get all-zero frames, which the
        # model drops as padding
        out = dict(kwargs)
        for key in ("pixel_values", "pixel_attention_mask"):
            value = kwargs.get(key)
            if torch.is_tensor(value) and value.shape[0] == rows:
                out[key] = torch.cat([value, torch.zeros_like(value)])
        return out


class SmolVLMAdapter(Idefics3Adapter):
    family = "smolvlm"
    title = "SmolVLM"
    config_classes = ("SmolVLMConfig",)
    model_classes = ("SmolVLMForConditionalGeneration",)
    builtin = "builtin:tiny-smolvlm"
