"""Built-in models and data, made locally so that everything runs offline: ``builtin:<name>``."""

from __future__ import annotations

from PIL import Image

from .images import sample_image, shapes_image

PREFIX = "builtin:"
MODELS = ("tiny-llava", "tiny-llava-next", "tiny-gemma3", "toy-llava")
IMAGES = ("sample",)


def is_builtin(spec: str) -> bool:
    return spec.startswith(PREFIX)


def load_model(spec: str, dtype=None):
    """``(model, processor)`` for a built-in model name such as ``builtin:tiny-llava``."""
    name = spec.removeprefix(PREFIX)
    if name == "tiny-llava":
        from . import tiny_llava

        return tiny_llava.load(dtype=dtype)
    if name == "tiny-llava-next":
        from . import tiny_llava_next

        return tiny_llava_next.load(dtype=dtype)
    if name == "tiny-gemma3":
        from . import tiny_gemma3

        return tiny_gemma3.load(dtype=dtype)
    if name == "toy-llava":  # trained on the toy world (mitigate.builtin.toy_train), shipped as package data
        from . import toy_model

        return toy_model.load(dtype=dtype)
    raise ValueError(
        f"unknown built-in model {spec!r}; built-in models: {', '.join(PREFIX + m for m in MODELS)}"
    )


def load_image(spec: str) -> Image.Image:
    name = spec.removeprefix(PREFIX)
    if name == "sample":
        return sample_image()
    raise ValueError(
        f"unknown built-in image {spec!r}; built-in images: {', '.join(PREFIX + i for i in IMAGES)}"
    )


__all__ = ["is_builtin", "load_image", "load_model", "sample_image", "shapes_image"]
