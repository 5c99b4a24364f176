"""Generated images with known drawn objects (``builtin:sample``), for the offline demo and tests."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "orange": (240, 140, 30),
    "purple": (140, 60, 180),
}
SHAPES = ("circle", "square", "triangle")


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color: tuple[int, int, int]
) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def shapes_image(seed: int = 0, size: int = 64, count: int = 2) -> tuple[Image.Image, list[tuple[str, str]]]:
    """An image with ``count`` coloured shapes on a light background, and the ``(colour, shape)`` drawn."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (235, 235, 230))
    draw = ImageDraw.Draw(image)
    drawn = []
    for _ in range(count):
        color = rng.choice(sorted(PALETTE))
        shape = rng.choice(SHAPES)
        side = rng.randint(size // 4, size // 2)
        x, y = rng.randint(0, size - side), rng.randint(0, size - side)
        draw_shape(draw, shape, (x, y, x + side, y + side), PALETTE[color])
        drawn.append((color, shape))
    return image, drawn


def sample_image() -> Image.Image:
    """``builtin:sample``: a red circle and a blue square."""
    image = Image.new("RGB", (64, 64), (235, 235, 230))
    draw = ImageDraw.Draw(image)
    draw_shape(draw, "circle", (6, 8, 30, 32), PALETTE["red"])
    draw_shape(draw, "square", (34, 30, 58, 54), PALETTE["blue"])
    return image
