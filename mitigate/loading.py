"""Loading models, processors and images for the CLI and the eval runner (built-in or Hugging Face).

Everything that can be wrong with a ``--model``, ``--device-map``, ``--dtype`` or ``--image`` is found here
and reported as one clear error (:mod:`mitigate.errors`), before a weight is read where possible: a folder
that does not exist, a model that is not a vision-language model, a hub id while offline (found without
waiting on the network), a GPU this machine does not have, a corrupt or truncated image.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from PIL import Image, UnidentifiedImageError

from . import builtin
from .errors import ConfigError, DeviceError, ImageError, ModelLoadError

log = logging.getLogger("mitigate")

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
_TRUE = {"1", "true", "yes", "on"}
_PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def parse_dtype(name: str | None) -> Any:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def check_device_map(device_map: str | None) -> None:
    """Refuse a device this machine does not have (before loading anything)."""
    if device_map in (None, "cpu", "auto", "balanced", "balanced_low_0", "sequential"):
        return
    text = str(device_map)
    if text.isdigit():
        text = f"cuda:{text}"
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device-map {device_map}: no CUDA GPU is visible to torch on this machine "
                "(torch.cuda.is_available() is False); use --device-map cpu"
            )
        index = text.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise DeviceError(
                f"--device-map {device_map}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
        return
    if text == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("--device-map mps: Apple's MPS backend is not available on this machine")
        return
    raise DeviceError(f"unknown --device-map {device_map!r}; use cpu, cuda, cuda:N, mps or auto")


def _offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in flags)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connect within ``timeout`` seconds (behind a proxy this
    cannot be told, so it is assumed)."""
    if any(os.environ.get(v) for v in _PROXIES):
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1 or spec.endswith("/")


def model_source(spec: str) -> tuple[str, dict[str, Any]]:
    """``(path or hub id, extra from_pretrained kwargs)`` for a non-built-in ``--model``, or a clear error."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"--model {spec} is a file; give the model's folder (with config.json)")
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"--model {spec}: the folder has no config.json, so it is not a Hugging Face model folder "
                "(one written by save_pretrained)"
            )
        return str(path), {}
    builtins = ", ".join(builtin.PREFIX + m for m in builtin.MODELS)
    if _looks_like_path(spec):
        raise ModelLoadError(f"model folder {spec} not found (built-in models: {builtins})")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        raise ModelLoadError(
            f"--model {spec!r} is neither an existing folder nor a valid Hugging Face id (built-in models: "
            f"{builtins})"
        ) from None
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(spec, "config.json"), str)
    if _offline():
        if not cached:
            raise ModelLoadError(
                f"--model {spec}: no such folder here, and the Hugging Face id {spec} is not in the local "
                "cache while HF_HUB_OFFLINE is set (no downloads); download it where there is network, or "
                "give a local folder"
            )
        return spec, {"local_files_only": True}
    if not hub_reachable():
        if not cached:
            raise ModelLoadError(
                f"--model {spec}: no such folder here, and the Hugging Face hub cannot be reached to "
                "download it (no network?); give a local folder, or download it where there is network"
            )
        log.warning("mitigate: the Hugging Face hub cannot be reached; using the cached copy of %s", spec)
        return spec, {"local_files_only": True}
    return spec, {}


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _load_config(spec: str, source: str, extra: dict[str, Any]) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from .patches.adapters import supported_families

    try:
        config = AutoConfig.from_pretrained(source, **extra)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"--model {spec}: cannot read its config: {_first_line(error)}") from error
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        arch = ", ".join(getattr(config, "architectures", None) or []) or "no architecture listed"
        raise ModelLoadError(
            f"--model {spec} is a {config.model_type} model ({arch}), not a vision-language model; "
            f"mitigate supports: {supported_families()}"
        )
    return config


def load_model(
    spec: str,
    *,
    dtype: str | None = None,
    device_map: str | None = None,
    attn_implementation: str | None = None,
) -> tuple[torch.nn.Module, Any]:
    """``(model, processor)`` from ``builtin:<name>``, a local folder or a Hugging Face id (eval mode)."""
    torch_dtype = parse_dtype(dtype)
    check_device_map(device_map)
    if builtin.is_builtin(spec):
        name = spec.removeprefix(builtin.PREFIX)
        if name not in builtin.MODELS:
            raise ModelLoadError(
                f"unknown built-in model {spec!r}; built-in models: "
                f"{', '.join(builtin.PREFIX + m for m in builtin.MODELS)}"
            )
        model, processor = builtin.load_model(spec, dtype=None if torch_dtype == "auto" else torch_dtype)
        if attn_implementation is not None:  # as from_pretrained would: an unknown name is an error
            model.set_attn_implementation(attn_implementation)
        if device_map == "auto":
            device_map = "cuda" if torch.cuda.is_available() else "cpu"
        if device_map not in (None, "cpu"):
            model = model.to(device_map)
        return model, processor
    source, extra = model_source(spec)
    config = _load_config(spec, source, extra)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs: dict[str, Any] = dict(extra)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForImageTextToText.from_pretrained(source, config=config, **kwargs).eval()
    except OSError as error:
        raise ModelLoadError(f"--model {spec}: cannot load its weights: {_first_line(error)}") from error
    try:
        processor = AutoProcessor.from_pretrained(source, **extra)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"--model {spec}: cannot load its processor: {_first_line(error)}") from error
    if getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer.padding_side = "left"
    return model, processor


def load_image(spec: str) -> Image.Image:
    """An RGB image from ``builtin:sample`` or a file; a missing, empty, corrupt or truncated file is an
    :class:`~mitigate.errors.ImageError` naming it."""
    if builtin.is_builtin(spec):
        return builtin.load_image(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ImageError(f"image {spec} not found (give an image file or builtin:sample)")
    if path.is_dir():
        raise ImageError(f"image {spec} is a folder, not an image file")
    if path.stat().st_size == 0:
        raise ImageError(f"image {spec} is empty (0 bytes)")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes every pixel: a truncated file fails here, not later
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(f"image {spec} cannot be read: {_first_line(error)}") from error


def chat_prompt(processor: Any, prompt: str, with_image: bool = True) -> str:
    """The model's own chat template around one user turn (image first, as LLaVA was trained)."""
    content: list[dict[str, str]] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": prompt})
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
