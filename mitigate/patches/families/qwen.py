"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5: ``<|vision_start|>`` + image pads + ``<|vision_end|>``,
3-D M-RoPE positions, and ``model.model.rope_deltas``, state that any prefill through the model rewrites.

Positions: ``generate`` hands the model ``[4, B, T]`` (text positions, then temporal/height/width) and
extends them by one per step; a bare forward computes ``[3, B, T]`` from ``mm_token_type_ids`` and
``image_grid_thw`` and keeps the per-row offset in ``rope_deltas`` for its later cached steps. The twins
of a prompt (VHR's probe, PAI's contrast) are text only, so their positions are the plain count in every
row (:mod:`mitigate.patches.twins`); a probe's extra prefill keeps ``rope_deltas`` as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ...context import TokenLayout
from ...errors import MitigationError
from ..adapters import Adapter


class Qwen2VLAdapter(Adapter):
    """Qwen2-VL (``Qwen2VLForConditionalGeneration``): a ViT without CLS and a 2x2 merger, features 1:1 in
    raster order onto the image pads."""

    family = "qwen2-vl"
    title = "Qwen2-VL"
    config_classes = ("Qwen2VLConfig",)
    model_classes = ("Qwen2VLForConditionalGeneration",)
    builtin = "builtin:tiny-qwen2-vl"

    def marker_ids(self) -> tuple[int, ...]:
        config = self.model.config
        return tuple(
            int(i) for i in (config.vision_start_token_id, config.vision_end_token_id) if i is not None
        )

    def vision_attention_modules(self) -> list[nn.Module]:
        return [block.attn for block in self.base_model().visual.blocks]

    def vision_feature_layer(self) -> int:
        return len(self.base_model().visual.blocks) - 1

    def check_inputs(self, kwargs: dict[str, Any], layout: TokenLayout) -> None:
        super().check_inputs(kwargs, layout)
        positions = kwargs.get("position_ids")
        own = torch.is_tensor(positions) and positions.dim() == 3 and positions.shape[0] == 3
        if bool(layout.has_image.any()) and kwargs.get("mm_token_type_ids") is None and not own:
            raise MitigationError(
                f"mitigate: this {self.title} prompt has image tokens but no mm_token_type_ids; without them "
                "the model's M-RoPE positions for the image are not computed (Qwen2.5-VL silently falls back "
                "to 1-D positions). Pass every output of the processor, mm_token_type_ids included."
            )

    def prompt_positions(self, kwargs: dict[str, Any], mask: torch.Tensor) -> torch.Tensor:
        text = super().prompt_positions(kwargs, mask)
        types = kwargs.get("mm_token_type_ids")
        grids = {k: kwargs.get(k) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
        if types is None or (grids["image_grid_thw"] is None and grids["video_grid_thw"] is None):
            return text[None].expand(3, -1, -1)
        given = {k: v for k, v in grids.items() if v is not None}
        base = self.base_model()
        positions, _ = base.get_rope_index(kwargs["input_ids"], types, attention_mask=mask, **given)
        return positions

    @contextmanager
    def extra_pass(self) -> Iterator[None]:
        base = self.base_model()
        deltas = getattr(base, "rope_deltas", None)
        try:
            yield
        finally:
            base.rope_deltas = deltas


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: as Qwen2-VL, with a windowed ViT (its window reorder is undone after the merger).
    Without ``mm_token_type_ids`` it silently computes 1-D positions: refused at prefill."""

    family = "qwen2.5-vl"
    title = "Qwen2.5-VL"
    config_classes = ("Qwen2_5_VLConfig",)
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
    builtin = "builtin:tiny-qwen2.5-vl"


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL: interleaved M-RoPE and DeepStack (tower features added to the hidden states of the first
    layers at image positions: a layer's input already holds them, and a text-only twin gets none)."""

    family = "qwen3-vl"
    title = "Qwen3-VL"
    config_classes = ("Qwen3VLConfig",)
    model_classes = ("Qwen3VLForConditionalGeneration",)
    builtin = "builtin:tiny-qwen3-vl"


class Qwen3_5Adapter(Qwen2VLAdapter):
    """Qwen3.5: hybrid layers. ``text_config.layer_types`` makes each decoder layer either full attention
    (``self_attn``, edited) or a gated-delta linear attention (``linear_attn``, which never calls an
    attention function and is left alone). Methods number layers as the model does; only full layers are
    editable. The full layers gate their output (``o_proj(attn * sigmoid(gate))``): VHR's head scaling
    before ``o_proj`` commutes with the gate."""

    family = "qwen3.5"
    title = "Qwen3.5"
    config_classes = ("Qwen3_5Config",)
    model_classes = ("Qwen3_5ForConditionalGeneration",)
    builtin = "builtin:tiny-qwen3.5"

    def attention_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.decoder_layers()) if hasattr(layer, "self_attn")]
