"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision: a CLIP or SigLIP tower, a projector, image tokens marked with
``config.image_token_id`` and no other markers (NeXT's and OneVision's row-end "newline" features carry
the image id too), 1-D positions, causal masks."""

from __future__ import annotations

from torch import nn

from ...errors import UnsupportedModelError
from ..adapters import Adapter


class LlavaAdapter(Adapter):
    """LLaVA-1.5 (``LlavaForConditionalGeneration`` and ``LlavaModel``): CLIP tower + Llama-family LM."""

    family = "llava"
    title = "LLaVA-1.5"
    config_classes = ("LlavaConfig",)
    model_classes = ("LlavaForConditionalGeneration",)
    builtin = "builtin:tiny-llava"

    def _tower(self) -> nn.Module:
        tower = self.base_model().vision_tower
        return getattr(tower, "vision_model", tower)

    def _vision_layers(self) -> nn.ModuleList:
        return self._tower().encoder.layers

    def vision_attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self._vision_layers()]

    def vision_has_cls(self) -> bool:
        # CLIP prepends a class embedding; SigLIP-style towers (no class_embedding) have no CLS token
        return hasattr(self._tower().embeddings, "class_embedding")

    def vision_feature_layer(self) -> int:
        index = self.model.config.vision_feature_layer
        if not isinstance(index, int):
            raise UnsupportedModelError("several vision feature layers: PAINT needs a single one")
        depth = len(self._vision_layers())
        layer = depth + index if index < 0 else index - 1  # hidden_states[i] is the output of layer i-1
        if not 0 <= layer < depth:
            raise UnsupportedModelError(f"vision_feature_layer {index} is not the output of a tower layer")
        return layer

    def features_drop_cls(self) -> bool:
        return self.model.config.vision_feature_select_strategy == "default"


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT (``LlavaNextForConditionalGeneration``): any-resolution tiles of a CLIP tower, with
    row-end tokens, all marked with ``image_token_id`` in the prompt."""

    family = "llava-next"
    title = "LLaVA-NeXT"
    config_classes = ("LlavaNextConfig",)
    model_classes = ("LlavaNextForConditionalGeneration",)
    builtin = "builtin:tiny-llava-next"

    def flat_image_features(self) -> bool:
        return False  # a base view, then unpadded tiles with a newline feature per row


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP (no CLS), a Qwen2 language model,
    a base view plus unpadded tiles with newline features (one image), or base view + one newline per
    image (several images); every one of them carries ``image_token_id``. ``logits_to_keep`` leaks into
    the attention kwargs (ignored)."""

    family = "llava-onevision"
    title = "LLaVA-OneVision"
    config_classes = ("LlavaOnevisionConfig",)
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    builtin = "builtin:tiny-llava-onevision"
