"""What methods may know about the model vLLM serves (:class:`mitigate.context.ModelInfo`), read from its
Hugging Face config, and the model families the plugin supports."""

from __future__ import annotations

from typing import Any

from ..context import ModelInfo
from ..errors import UnsupportedModelError

#: vLLM architectures the plugin is tested on, and their mitigate family names
FAMILIES = {
    "LlavaForConditionalGeneration": "llava",
    "Qwen2VLForConditionalGeneration": "qwen2-vl",
}


def family_of(architecture: str) -> str:
    if architecture not in FAMILIES:
        supported = ", ".join(f"{arch} ({name})" for arch, name in FAMILIES.items())
        raise UnsupportedModelError(
            f"mitigate.vllm: {architecture} is not supported inside vLLM; supported: {supported}. "
            "Requests without mitigation are served as usual."
        )
    return FAMILIES[architecture]


def model_info(architecture: str, hf_config: Any, name_or_path: str) -> ModelInfo:
    """ModelInfo for a supported architecture (the same numbers mitigate's adapters give the HF model)."""
    family = family_of(architecture)
    text = hf_config.get_text_config()
    heads = text.num_attention_heads
    info = {
        "family": family,
        "name_or_path": name_or_path,
        "num_layers": text.num_hidden_layers,
        "num_heads": heads,
        "num_kv_heads": getattr(text, "num_key_value_heads", None) or heads,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads,
        "hidden_size": text.hidden_size,
        "rms_norm_eps": float(getattr(text, "rms_norm_eps", 1e-6)),
        "image_token_id": int(hf_config.image_token_id),
    }
    vision = hf_config.vision_config
    if family == "llava":
        depth = vision.num_hidden_layers
        index = hf_config.vision_feature_layer
        layer = None
        if isinstance(index, int):
            layer = depth + index if index < 0 else index - 1  # hidden_states[i] is layer i-1's output
            layer = layer if 0 <= layer < depth else None
        info.update(
            vision_layers=depth,
            vision_feature_layer=layer,
            # CLIP prepends a class token; SigLIP towers (no CLS) are refused by the methods that need one
            vision_has_cls=getattr(vision, "model_type", "") == "clip_vision_model",
            features_drop_cls=hf_config.vision_feature_select_strategy == "default",
        )
    else:  # qwen2-vl: merged patches map 1:1, in raster order, onto the image tokens; no CLS token
        info.update(vision_layers=vision.depth, vision_feature_layer=None, vision_has_cls=False)
    return ModelInfo(**info)
