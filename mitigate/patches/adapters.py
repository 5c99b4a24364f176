"""What mitigate knows about a model family, in one place: the adapter. Found by config class.

Family knowledge lives only here and in :mod:`.families` (one small module per family): where the
language layers are and which of them have attention to edit, which tokens are image features and which
are the markers around them, how to build the image-free twin of a prompt (its positions too, 1-D or
Qwen's 3-D M-RoPE), the model state an extra prefill must not disturb, and how the vision tower's CLS
attention maps onto image tokens (PAINT). The session, the methods and the kernels ask the adapter; a new
family is one adapter, one tiny builder (:mod:`mitigate.builtin`) and one test file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from ..context import ModelInfo, TokenLayout, build_layout
from ..errors import MitigationError, UnsupportedModelError

#: forward inputs that are never per-token data, even when shaped like ``input_ids``
PER_IMAGE_INPUTS = (
    "pixel_values",
    "pixel_attention_mask",
    "image_sizes",
    "image_grid_thw",
    "image_position_ids",
    "batch_num_images",
    "second_per_grid_ts",
)


class Adapter:
    """Base adapter. Subclasses set the class attributes and override what differs in their family."""

    family: ClassVar[str]  # short name: "qwen2-vl"
    title: ClassVar[str] = ""  # for tables: "Qwen2-VL"
    config_classes: ClassVar[tuple[str, ...]]
    model_classes: ClassVar[tuple[str, ...]] = ()
    builtin: ClassVar[str | None] = None  # the family's tiny offline model
    text_config_key: ClassVar[str] = "text_config"
    vision_config_key: ClassVar[str] = "vision_config"
    #: the language model's masks are causality, padding and sliding windows only (no bidirectional
    #: image blocks, no prefix-LM), so kernels may rebuild them from the padding
    plain_masks: ClassVar[bool] = True
    #: the position a forward gives a prompt's first real token (PaliGemma counts from 1)
    position_offset: ClassVar[int] = 0

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, config: Any) -> bool:
        return type(config).__name__ in cls.config_classes

    def refusal(self) -> str | None:
        """Why no method can run on this model at all, or ``None`` (checked at apply time)."""
        return None

    # -- structure -----------------------------------------------------------------------------
    def base_model(self) -> nn.Module:
        """The multimodal model whose ``forward`` receives ``input_ids`` and the cache."""
        return getattr(self.model, "model", self.model) if hasattr(self.model, "lm_head") else self.model

    def language_model(self) -> nn.Module:
        return self.base_model().language_model

    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model().layers

    def attention_layers(self) -> list[int]:
        """Indices (the model's own numbering) of the layers whose attention mitigate edits."""
        return list(range(len(self.decoder_layers())))

    def attention_modules(self) -> list[nn.Module]:
        layers = self.decoder_layers()
        return [layers[i].self_attn for i in self.attention_layers()]

    def last_row_layers(self) -> tuple[int, ...]:
        """Layers whose prefill attention gets only the prompt's last query rows under ``generate``."""
        return ()

    def text_config(self):
        return getattr(self.model.config, self.text_config_key)

    # -- vision tower (methods that read it: PAINT) -----------------------------------------------
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

    def flat_image_features(self) -> bool:
        """Whether the image tokens are the tower's per-image features in order (one per patch, or per
        group of merged patches, see :meth:`cls_to_features`)."""
        return True

    def cls_to_features(self, cls_attention: torch.Tensor) -> torch.Tensor:
        """The CLS query's attention ``[images, heads, 1 + patches]`` per image feature token
        ``[images, heads, features]``, the CLS column left out (one token per patch by default)."""
        return cls_attention[..., 1:]

    # -- the prompt ------------------------------------------------------------------------------
    def image_token_id(self) -> int:
        token = getattr(self.model.config, "image_token_id", None)
        if token is None:
            raise UnsupportedModelError(f"{type(self.model).__name__} has no config.image_token_id")
        return int(token)

    def marker_ids(self) -> tuple[int, ...]:
        """Token ids the family writes around or between image features (begin/end of image)."""
        return ()

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

    def span_mask(self, input_ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """bool ``[B, T]``: the image tokens and their markers (what an image-free twin leaves out)."""
        markers = self.marker_ids()
        if not markers:
            return image
        return image | torch.isin(input_ids, torch.tensor(markers, device=input_ids.device))

    def layout(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, mask: torch.Tensor | None
    ) -> TokenLayout:
        """The prompt batch's :class:`~mitigate.context.TokenLayout` (``mask``: 2-D padding or ``None``)."""
        image = self.image_mask(input_ids, inputs_embeds)
        span = self.span_mask(input_ids, image) if input_ids is not None else None
        return build_layout(image, mask, input_ids, span)

    # -- forward inputs ----------------------------------------------------------------------------
    def check_inputs(self, kwargs: dict[str, Any], layout: TokenLayout) -> None:
        """Refuse, at prefill, inputs the methods or this family would silently run wrong: videos (the
        methods and twins know image spans only), and per family (Qwen2.5-VL without M-RoPE inputs)."""
        config = self.model.config
        video = getattr(config, "video_token_id", None)
        if video is None:
            video = getattr(config, "video_token_index", None)
        ids = kwargs.get("input_ids")
        if video is not None and torch.is_tensor(ids) and bool((ids == int(video)).any()):
            raise MitigationError(
                "mitigate: this prompt holds video tokens; the methods edit attention to image tokens and "
                "know image spans only, so a video would be treated as text. Pass frames as images."
            )

    def prompt_positions(self, kwargs: dict[str, Any], mask: torch.Tensor) -> torch.Tensor:
        """Positions for a prompt forward that got none, as ``generate`` makes them (from the padding)."""
        return (mask.long().cumsum(-1) - 1).clamp_min(0) + self.position_offset

    def double_images(self, kwargs: dict[str, Any], rows: int) -> dict[str, Any]:
        """Per-row image inputs of a batch doubled with image-free twins (most families take images
        per image, not per row: nothing to do)."""
        return kwargs

    @contextmanager
    def extra_pass(self) -> Iterator[None]:
        """Around a prefill mitigate adds (a probe): keep model state that a prefill overwrites."""
        yield

    # -- facts for methods ---------------------------------------------------------------------------
    def info(self) -> ModelInfo:
        cfg = self.text_config()
        heads = cfg.num_attention_heads
        layers = self.attention_layers()
        depth = len(self.decoder_layers())
        return ModelInfo(
            family=self.family,
            name_or_path=str(
                getattr(self.model, "name_or_path", "") or getattr(self.model.config, "_name_or_path", "")
            ),
            num_layers=depth,
            num_heads=heads,
            num_kv_heads=_setting(cfg, "num_key_value_heads") or heads,
            head_dim=_setting(cfg, "head_dim") or cfg.hidden_size // heads,
            hidden_size=cfg.hidden_size,
            rms_norm_eps=float(_setting(cfg, "rms_norm_eps") or 1e-6),
            image_token_id=self.image_token_id(),
            attention_layers=None if len(layers) == depth else tuple(layers),
            last_row_layers=tuple(self.last_row_layers()),
            **self._vision_info(),
        )

    def _vision_info(self) -> dict:
        try:
            return {
                "vision_layers": len(self.vision_attention_modules()),
                "vision_feature_layer": self.vision_feature_layer(),
                "vision_has_cls": self.vision_has_cls(),
                "features_drop_cls": self.features_drop_cls(),
                "flat_image_features": self.flat_image_features(),
            }
        except UnsupportedModelError:
            return {"flat_image_features": self.flat_image_features()}


def _setting(config: Any, name: str) -> Any:
    """A text-config value, or ``None`` where it is missing or differs by layer (Gemma 4's head_dim:
    sliding and full layers have their own; transformers raises on the global attribute)."""
    try:
        return getattr(config, name, None)
    except Exception:
        return None


def adapters() -> list[type[Adapter]]:
    """Every adapter, most specific first (a config class may have several, told apart by ``matches``)."""
    from .families import ADAPTERS

    return ADAPTERS


def supported_families() -> str:
    return ", ".join(f"{a.family} ({'/'.join(a.config_classes)})" for a in adapters())


def find_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``'s config class, or a clear error naming what is supported."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a Hugging Face model (no .config); "
            f"mitigate supports: {supported_families()}"
        )
    for adapter in adapters():
        if adapter.matches(config):
            return adapter(model)
    name = type(config).__name__
    is_vlm = hasattr(config, "vision_config") or getattr(config, "image_token_id", None) is not None
    what = (
        "a vision-language model of a family mitigate has no adapter for"
        if is_vlm
        else ("not a vision-language model (mitigate edits attention to image tokens)")
    )
    raise UnsupportedModelError(
        f"{type(model).__name__} ({name}) is {what}; supported families: {supported_families()}"
    )


def runs_of(mask_row: list[bool]) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: the maximal runs of True in one row (stop exclusive)."""
    runs, start = [], None
    for i, on in enumerate(mask_row):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(mask_row)))
    return runs
