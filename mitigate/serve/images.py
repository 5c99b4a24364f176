"""Images from chat messages: base64 data URLs, local files only under an allowed folder, never remote URLs.

The server never fetches a URL: a remote URL in a request would let any client make the server reach hosts
on its network (server-side request forgery). Sizes are checked before decoding (bytes) and before the
pixels are read (the header's width and height), so a small file that decompresses to a huge image is
refused too.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from .errors import APIError, bad_request


@dataclass(frozen=True)
class ImageLimits:
    max_images: int = 8  # per request
    max_bytes: int = 20 * 1024 * 1024  # per image, encoded
    max_pixels: int = 40_000_000  # per image, width x height
    local_dir: Path | None = None  # --allow-local-files: images may be read from under this folder


def too_large(message: str) -> APIError:
    return APIError(413, message, code="image_too_large", param="messages")


def load_image(url: str, limits: ImageLimits) -> Image.Image:
    """The RGB image an ``image_url`` part names."""
    if url.startswith("data:"):
        return _decode(_data_url_bytes(url, limits), limits)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https", "ftp", "ws", "wss") or url.startswith("//"):
        raise bad_request(
            "remote image URLs are refused: the server does not fetch URLs (server-side request forgery); "
            "send the image as a base64 data URL (data:image/png;base64,...)",
            code="remote_url_refused",
            param="messages",
        )
    if scheme not in ("", "file"):
        raise bad_request(
            f"unsupported image URL scheme {scheme!r}; send a base64 data URL",
            code="invalid_image_url",
            param="messages",
        )
    return _decode(_local_bytes(url, limits), limits)


def _data_url_bytes(url: str, limits: ImageLimits) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise bad_request(
            "an image data URL must be data:<mime>;base64,<data>", code="invalid_image_url", param="messages"
        )
    mime = header[5:].split(";")[0]
    if mime and not mime.startswith("image/"):
        raise bad_request(
            f"data URL of type {mime!r} is not an image", code="invalid_image", param="messages"
        )
    if len(payload) * 3 // 4 > limits.max_bytes + 3:
        raise too_large(f"an image is larger than the server's limit of {limits.max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(
            "an image data URL is not valid base64", code="invalid_image", param="messages"
        ) from exc


def _local_bytes(url: str, limits: ImageLimits) -> bytes:
    if limits.local_dir is None:
        raise bad_request(
            "local image paths are disabled; start the server with --allow-local-files DIR, or send a base64 "
            "data URL",
            code="local_files_disabled",
            param="messages",
        )
    raw = unquote(urlparse(url).path) if url.lower().startswith("file:") else url
    root = limits.local_dir.resolve()
    path = Path(raw)
    path = (path if path.is_absolute() else root / path).resolve()  # resolve() follows symlinks
    if not path.is_relative_to(root):
        raise APIError(
            403,
            f"image path {raw!r} is outside the allowed folder",
            code="path_not_allowed",
            param="messages",
        )
    if not path.is_file():
        raise bad_request(
            f"image file {raw!r} not found under the allowed folder", code="image_not_found", param="messages"
        )
    if path.stat().st_size > limits.max_bytes:
        raise too_large(f"image {raw!r} is larger than the server's limit of {limits.max_bytes} bytes")
    return path.read_bytes()


def _decode(data: bytes, limits: ImageLimits) -> Image.Image:
    if len(data) > limits.max_bytes:
        raise too_large(f"an image is larger than the server's limit of {limits.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > limits.max_pixels:
                raise too_large(
                    f"an image has {width}x{height} pixels, over the server's limit of {limits.max_pixels}"
                )
            return image.convert("RGB")
    except APIError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise too_large(f"an image is too large to decode: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise bad_request(
            f"an image could not be decoded: {exc}", code="invalid_image", param="messages"
        ) from exc
