"""Loading models, processors and images for the CLI and the eval runner (built-in or Hugging Face)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import builtin

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def parse_dtype(name: str | None) -> Any:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_model(
    spec: str,
    *,
    dtype: str | None = None,
    device_map: str | None = None,
    attn_implementation: str | None = None,
) -> tuple[torch.nn.Module, Any]:
    """``(model, processor)`` from ``builtin:<name>``, a local folder or a Hugging Face id (eval mode)."""
    torch_dtype = parse_dtype(dtype)
    if builtin.is_builtin(spec):
        model, processor = builtin.load_model(spec, dtype=None if torch_dtype == "auto" else torch_dtype)
        if device_map not in (None, "cpu"):
            model = model.to("cuda" if device_map == "auto" else device_map)
        return model, processor
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs: dict[str, Any] = {}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(spec, **kwargs).eval()
    processor = AutoProcessor.from_pretrained(spec)
    if getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer.padding_side = "left"
    return model, processor


def load_image(spec: str) -> Image.Image:
    if builtin.is_builtin(spec):
        return builtin.load_image(spec)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"image {spec!r} not found (give a file path or builtin:sample)")
    return Image.open(path).convert("RGB")


def chat_prompt(processor: Any, prompt: str, with_image: bool = True) -> str:
    """The model's own chat template around one user turn (image first, as LLaVA was trained)."""
    content: list[dict[str, str]] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": prompt})
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
