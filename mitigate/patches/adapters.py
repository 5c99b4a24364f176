"""One adapter per model family: where the language layers are, which module sees ``input_ids``, and the
sizes methods need. Adapters are found by config class, never by hard-coded module paths in methods.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..context import ModelInfo
from ..errors import UnsupportedModelError


class Adapter:
    """Base adapter. Subclasses set ``family`` and ``config_classes`` and override the accessors."""

    family: ClassVar[str]
    config_classes: ClassVar[tuple[str, ...]]
    text_config_key: ClassVar[str] = "text_config"
    #: the language model's masks are causality, padding and sliding windows only (no bidirectional
    #: image blocks, no prefix-LM), so kernels may rebuild them from the padding
    plain_masks: ClassVar[bool] = True

    def __init__(self, model: nn.Module):
        self.model = model

    # -- structure -----------------------------------------------------------------------------
    def base_model(self) -> nn.Module:
        """The multimodal model whose ``forward`` receives ``input_ids`` and the cache."""
        raise NotImplementedError

    def language_model(self) -> nn.Module:
        raise NotImplementedError

    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model().layers

    def attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.decoder_layers()]

    def text_config(self):
        return getattr(self.model.config, self.text_config_key)

    # -- vision tower (methods that read it: PAINT) -----------------------------------------------
    vision_config_key: ClassVar[str] = "vision_config"

    def vision_attention_modules(self) -> list[nn.Module]:
        raise UnsupportedModelError(f"{self.family}: reading the vision tower is not supported")

    def vision_has_cls(self) -> bool:
        return False

    def vision_feature_layer(self) -> int:
        """0-based index of the vision layer whose output the projector reads."""
        raise UnsupportedModelError(f"{self.family}: reading the vision tower is not supported")

    def features_drop_cls(self) -> bool:
        """Whether the image tokens skip the tower's CLS token (LLaVA's "default" strategy)."""
        return True

    def image_token_id(self) -> int:
        token = getattr(self.model.config, "image_token_id", None)
        if token is None:
            raise UnsupportedModelError(f"{type(self.model).__name__} has no config.image_token_id")
        return int(token)

    def image_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """bool ``[B, T]``: image placeholder positions, from the ids or else the placeholder embeddings."""
        token = self.image_token_id()
        if input_ids is not None:
            return input_ids == token
        if inputs_embeds is None:
            raise ValueError("mitigate needs input_ids or inputs_embeds to find the image tokens")
        embed = self.language_model().get_input_embeddings()
        placeholder = embed(torch.tensor(token, device=inputs_embeds.device)).to(inputs_embeds.dtype)
        return (inputs_embeds == placeholder).all(-1)

    def info(self) -> ModelInfo:
        cfg = self.text_config()
        heads = cfg.num_attention_heads
        return ModelInfo(
            family=self.family,
            name_or_path=str(
                getattr(self.model, "name_or_path", "") or getattr(self.model.config, "_name_or_path", "")
            ),
            num_layers=len(self.decoder_layers()),
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            hidden_size=cfg.hidden_size,
            rms_norm_eps=float(getattr(cfg, "rms_norm_eps", 1e-6)),
            image_token_id=self.image_token_id(),
            **self._vision_info(),
        )

    def _vision_info(self) -> dict:
        try:
            return {
                "vision_layers": len(self.vision_attention_modules()),
                "vision_feature_layer": self.vision_feature_layer(),
                "vision_has_cls": self.vision_has_cls(),
                "features_drop_cls": self.features_drop_cls(),
            }
        except UnsupportedModelError:
            return {}


class LlavaAdapter(Adapter):
    """LLaVA-1.5 (``LlavaForConditionalGeneration`` and ``LlavaModel``): CLIP tower + Llama-family LM."""

    family = "llava"
    config_classes = ("LlavaConfig",)

    def base_model(self) -> nn.Module:
        return getattr(self.model, "model", self.model) if hasattr(self.model, "lm_head") else self.model

    def language_model(self) -> nn.Module:
        return self.base_model().language_model

    def _vision_layers(self) -> nn.ModuleList:
        tower = self.base_model().vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    def vision_attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self._vision_layers()]

    def vision_has_cls(self) -> bool:
        # CLIP prepends a class embedding; SigLIP-style towers (no class_embedding) have no CLS token
        tower = self.base_model().vision_tower
        return hasattr(getattr(tower, "vision_model", tower).embeddings, "class_embedding")

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
    config_classes = ("LlavaNextConfig",)

    def _vision_info(self) -> dict:
        return {**super()._vision_info(), "flat_image_features": False}


class Gemma3Adapter(LlavaAdapter):
    """Gemma 3 (``Gemma3ForConditionalGeneration``): a SigLIP tower (no CLS) whose patch features are
    pooled into ``mm_tokens_per_image`` tokens between begin/end-of-image markers; image blocks attend
    bidirectionally and most layers are sliding-window. The family's own mask builder keeps both, since
    the registered mask function is SDPA's."""

    family = "gemma3"
    config_classes = ("Gemma3Config",)
    plain_masks = False  # image blocks attend bidirectionally

    def vision_feature_layer(self) -> int:
        return len(self._vision_layers()) - 1  # the tower's last layer, then pooling

    def features_drop_cls(self) -> bool:
        return False

    def _vision_info(self) -> dict:
        return {**super()._vision_info(), "flat_image_features": False}  # pooled, not one per patch


ADAPTERS: list[type[Adapter]] = [LlavaAdapter, LlavaNextAdapter, Gemma3Adapter]


def supported_families() -> str:
    return ", ".join(f"{a.family} ({'/'.join(a.config_classes)})" for a in ADAPTERS)


def find_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``'s config class, or a clear error naming what is supported."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a Hugging Face model (no .config); "
            f"mitigate supports: {supported_families()}"
        )
    name = type(config).__name__
    for adapter in ADAPTERS:
        if name in adapter.config_classes:
            return adapter(model)
    is_vlm = hasattr(config, "vision_config") or getattr(config, "image_token_id", None) is not None
    what = (
        "a vision-language model of a family mitigate has no adapter for"
        if is_vlm
        else ("not a vision-language model (mitigate edits attention to image tokens)")
    )
    raise UnsupportedModelError(
        f"{type(model).__name__} ({name}) is {what}; supported families: {supported_families()}"
    )
