"""InternVL (``InternVLForConditionalGeneration``, the ``-hf`` checkpoints): ``<img>`` + tiles x
``<IMG_CONTEXT>`` run + ``</img>``, tiles back to back, 1-D positions, causal masks.

Its InternViT tower is the one here with a CLS token. The projector drops it and folds each 2x2 block of
patches into one image token (``pixel_shuffle``), so PAINT's CLS attention is summed over the patches of
each token (:meth:`InternVLAdapter.cls_to_features`); each tile (and the thumbnail) is one tower image
whose tokens follow each other in the span.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import UnsupportedModelError
from ..adapters import Adapter, runs_of


class InternVLAdapter(Adapter):
    family = "internvl"
    title = "InternVL"
    config_classes = ("InternVLConfig",)
    model_classes = ("InternVLForConditionalGeneration",)
    builtin = "builtin:tiny-internvl"

    def span_mask(self, input_ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        # <img> right before and </img> right after every run of context tokens (tiles have no separator)
        span = image.clone()
        length = image.shape[1]
        for row, mask_row in enumerate(image.tolist()):
            for start, stop in runs_of(mask_row):
                span[row, max(0, start - 1) : min(length, stop + 1)] = True
        return span

    def vision_attention_modules(self) -> list[nn.Module]:
        return [layer.attention for layer in self.base_model().vision_tower.encoder.layer]

    def vision_has_cls(self) -> bool:
        return getattr(self.base_model().vision_tower.embeddings, "cls_token", None) is not None

    def vision_feature_layer(self) -> int:
        index = self.model.config.vision_feature_layer
        if not isinstance(index, int):
            raise UnsupportedModelError("several vision feature layers: PAINT needs a single one")
        depth = len(self.vision_attention_modules())
        layer = depth + index if index < 0 else index - 1  # hidden_states[i] is the output of layer i-1
        if not 0 <= layer < depth:
            raise UnsupportedModelError(f"vision_feature_layer {index} is not the output of a tower layer")
        return layer

    def features_drop_cls(self) -> bool:
        return self.model.config.vision_feature_select_strategy == "default"

    def cls_to_features(self, cls_attention: torch.Tensor) -> torch.Tensor:
        patches = cls_attention[..., 1:]
        groups = self._token_patches(patches.shape[-1], patches.device)  # [tokens, patches per token]
        return patches[..., groups].sum(-1)

    def _token_patches(self, count: int, device: torch.device) -> torch.Tensor:
        """Which patches the model's own pixel shuffle folds into each image token."""
        side = int(count**0.5)
        index = torch.arange(count, dtype=torch.float32).reshape(1, side, side, 1)
        ratio = self.model.config.downsample_ratio
        folded = self.base_model().pixel_shuffle(index, scale_factor=ratio)
        return folded.reshape(-1, folded.shape[-1]).long().to(device)
