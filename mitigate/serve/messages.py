"""OpenAI chat messages to the model's chat template input and the images, in the order they appear."""

from __future__ import annotations

from typing import Any

from PIL import Image

from .errors import bad_request
from .images import ImageLimits, load_image
from .protocol import Message

TEXT_TYPES = ("text", "input_text")
IMAGE_TYPES = ("image_url", "input_image")


def convert(messages: list[Message], limits: ImageLimits) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """``(template messages, images)``: each content becomes a list of ``{"type": "text"|"image"}`` parts,
    the form Hugging Face processors' chat templates take; images are decoded and checked here."""
    out: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        parts: list[dict[str, Any]] = []
        content = message.content
        if content is None:
            raise bad_request(f"messages[{i}] has no content", code="invalid_request", param=f"messages.{i}")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        for j, part in enumerate(content):
            where = f"messages.{i}.content.{j}"
            kind = part.get("type")
            if kind in TEXT_TYPES:
                text = part.get("text")
                if not isinstance(text, str):
                    raise bad_request(
                        f"{where}: a text part needs a string 'text'", code="invalid_request", param=where
                    )
                parts.append({"type": "text", "text": text})
            elif kind in IMAGE_TYPES:
                if role != "user":
                    raise bad_request(
                        f"{where}: images are accepted in user messages only",
                        code="unsupported_content_type",
                        param=where,
                    )
                if len(images) >= limits.max_images:
                    raise bad_request(
                        f"too many images: this server takes at most {limits.max_images} per request",
                        code="too_many_images",
                        param="messages",
                    )
                images.append(load_image(_image_url(part, where), limits))
                parts.append({"type": "image"})
            else:
                raise bad_request(
                    f"{where}: content type {kind!r} is not supported; use 'text' and 'image_url' parts",
                    code="unsupported_content_type",
                    param=where,
                )
        out.append({"role": role, "content": parts})
    if out[-1]["role"] != "user":
        raise bad_request("the last message must be the user's", code="invalid_request", param="messages")
    return out, images


def _image_url(part: dict[str, Any], where: str) -> str:
    value = part.get("image_url", part.get("url"))
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise bad_request(f"{where}: an image part needs image_url.url", code="invalid_request", param=where)
    return value
