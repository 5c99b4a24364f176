"""Built-in models and data, made locally so that everything runs offline: ``builtin:<name>``."""

from __future__ import annotations

from importlib import import_module

from PIL import Image

from .images import sample_image, shapes_image

PREFIX = "builtin:"
#: tiny random models, one per family (``builtin:tiny-<family>``): module of mitigate.builtin and the
#: keyword arguments of its ``build_model``
TINY = {
    "tiny-llava": ("tiny_llava", {}),
    "tiny-llava-next": ("tiny_llava_next", {}),
    "tiny-llava-onevision": ("tiny_llava_onevision", {}),
    "tiny-qwen2-vl": ("tiny_qwen2_vl", {}),
    "tiny-qwen2.5-vl": ("tiny_qwen2_5_vl", {}),
    "tiny-qwen3-vl": ("tiny_qwen3_vl", {}),
    "tiny-qwen3.5": ("tiny_qwen3_5", {}),
    "tiny-gemma3": ("tiny_gemma3", {}),
    "tiny-gemma4": ("tiny_gemma4", {}),
    "tiny-internvl": ("tiny_internvl", {}),
    "tiny-smolvlm": ("tiny_smolvlm", {}),
    "tiny-idefics3": ("tiny_idefics3", {}),
    "tiny-paligemma": ("tiny_paligemma", {}),
    "tiny-paligemma2": ("tiny_paligemma", {"version": 2}),
    "tiny-mistral3": ("tiny_mistral3", {}),
}
MODELS = (*TINY, "toy-llava")
IMAGES = ("sample",)


def is_builtin(spec: str) -> bool:
    return spec.startswith(PREFIX)


def load_model(spec: str, dtype=None):
    """``(model, processor)`` for a built-in model name such as ``builtin:tiny-llava``."""
    name = spec.removeprefix(PREFIX)
    if name in TINY:
        module_name, kwargs = TINY[name]
        module = import_module(f"{__name__}.{module_name}")
        model = module.build_model(**kwargs)
        if dtype is not None:
            model = model.to(dtype)
        return model, module.build_processor()
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
