"""Gemma 3, Gemma 4 and PaliGemma: SigLIP-style towers (no CLS token), masks that are more than causal.

* Gemma 3 and 4: ``<boi>`` + image tokens + ``<eoi>``; sliding-window layers where each image block also
  attends to itself bidirectionally. The family's own mask builder keeps both (the registered mask
  function is SDPA's), so ``plain_masks`` is off: kernels must read the mask, never rebuild it.
* Gemma 4's last ``num_kv_shared_layers`` layers reuse earlier layers' keys and values, and under
  ``generate`` their prefill gets only the prompt's last query row; its vision attention modules carry a
  ``layer_idx`` too (text and vision are told apart by module identity, never by that attribute).
* PaliGemma is a prefix-LM: at prefill the whole prompt (images, ``<bos>``, task text, ``"\\n"``) attends
  bidirectionally and the text modules have ``is_causal=False`` (a ``None`` mask there means "every key",
  not causal). Positions count from 1. PaliGemma 2 soft-caps attention logits: refused.
"""

from __future__ import annotations

from torch import nn

from ...context import TokenLayout
from ..adapters import Adapter
from .llava import LlavaAdapter


class Gemma3Adapter(LlavaAdapter):
    """Gemma 3 (``Gemma3ForConditionalGeneration``): a SigLIP tower (no CLS) whose patch features are
    pooled into ``mm_tokens_per_image`` tokens between begin/end-of-image markers; image blocks attend
    bidirectionally and most layers are sliding-window."""

    family = "gemma3"
    title = "Gemma 3"
    config_classes = ("Gemma3Config",)
    model_classes = ("Gemma3ForConditionalGeneration",)
    builtin = "builtin:tiny-gemma3"
    plain_masks = False  # image blocks attend bidirectionally

    def marker_ids(self) -> tuple[int, ...]:
        config = self.model.config
        return tuple(int(i) for i in (config.boi_token_index, config.eoi_token_index) if i is not None)

    def vision_feature_layer(self) -> int:
        return len(self._vision_layers()) - 1  # the tower's last layer, then pooling

    def features_drop_cls(self) -> bool:
        return False

    def flat_image_features(self) -> bool:
        return False  # pooled, not one per patch


class Gemma4Adapter(Adapter):
    """Gemma 4 (``Gemma4ForConditionalGeneration``): ``<|image>`` + n x ``<|image|>`` + ``<image|>``; a
    patch tower without CLS, pooled k x k; attention scaling 1.0 (q/k are normalised); full layers may have
    wider heads than sliding ones."""

    family = "gemma4"
    title = "Gemma 4"
    config_classes = ("Gemma4Config",)
    model_classes = ("Gemma4ForConditionalGeneration",)
    builtin = "builtin:tiny-gemma4"
    plain_masks = False  # sliding layers: image blocks attend bidirectionally within the window

    def marker_ids(self) -> tuple[int, ...]:
        config = self.model.config
        return tuple(int(i) for i in (config.boi_token_id, config.eoi_token_id) if i is not None)

    def last_row_layers(self) -> tuple[int, ...]:
        shared = int(getattr(self.text_config(), "num_kv_shared_layers", 0) or 0)
        depth = len(self.decoder_layers())
        return tuple(range(depth - shared, depth)) if shared else ()

    def vision_attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.base_model().vision_tower.encoder.layers]

    def vision_feature_layer(self) -> int:
        return len(self.vision_attention_modules()) - 1

    def flat_image_features(self) -> bool:
        return False  # pooled by position


class PaliGemmaAdapter(Adapter):
    """PaliGemma (``PaliGemmaForConditionalGeneration``): ``<image>`` x n, then ``<bos>`` and the task text
    (no markers; ``<bos>`` belongs to the text, so an image-free twin keeps it, and it is not part of the
    user's query). SigLIP tower, no CLS."""

    family = "paligemma"
    title = "PaliGemma"
    config_classes = ("PaliGemmaConfig",)
    model_classes = ("PaliGemmaForConditionalGeneration",)
    builtin = "builtin:tiny-paligemma"
    plain_masks = False  # prefix-LM: the prompt attends bidirectionally at prefill
    position_offset = 1

    @classmethod
    def matches(cls, config) -> bool:
        return super().matches(config) and not _soft_capped(config)

    def layout(self, input_ids, inputs_embeds, mask) -> TokenLayout:
        layout = super().layout(input_ids, inputs_embeds, mask)
        bos = self.text_config().bos_token_id
        if input_ids is not None and bos is not None:
            layout.query = layout.query & (input_ids != bos)
        return layout

    def vision_attention_modules(self) -> list[nn.Module]:
        tower = self.base_model().vision_tower
        return [layer.self_attn for layer in getattr(tower, "vision_model", tower).encoder.layers]

    def vision_feature_layer(self) -> int:
        return len(self.vision_attention_modules()) - 1


class PaliGemma2Adapter(PaliGemmaAdapter):
    """PaliGemma 2 (the same classes, a Gemma 2 language model): attention logits are soft-capped
    (``cap * tanh(z / cap)`` before the mask), which SDPA cannot do and mitigate's kernels do not do."""

    family = "paligemma2"
    title = "PaliGemma 2"
    builtin = "builtin:tiny-paligemma2"

    @classmethod
    def matches(cls, config) -> bool:
        return type(config).__name__ in cls.config_classes and _soft_capped(config)

    def refusal(self) -> str | None:
        cap = self.text_config().attn_logit_softcapping
        return (
            f"its Gemma 2 language model soft-caps attention logits (cap {cap}: cap*tanh(z/cap) before the "
            "softmax); mitigate's kernels compute plain softmax attention, so every edited or probed layer "
            "would silently differ"
        )


def _soft_capped(config) -> bool:
    return getattr(getattr(config, "text_config", None), "attn_logit_softcapping", None) is not None
