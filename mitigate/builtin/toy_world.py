"""The toy world: small seeded scenes where hallucination has the cause it has in real VLMs.

Each 64 px scene holds 1 to 4 objects of 14 kinds, named and numbered as COCO classes so that POPE and
CHAIR read them unchanged. Each kind has its own colour and icon. Five pairs co-occur strongly (the pair is
complete in about 88% of the scenes that hold either member), and in half of the complete pairs one member
hides behind the other: smaller, faded, only a sliver showing. Captions and annotations still name it. So
a model trained on this world learns a prior ("a car comes with a bicycle") that competes with weak visual
evidence: asked about an absent member next to its mate, it tends to say yes, which POPE's adversarial
split measures, and its captions tend to name it, which CHAIR measures.

Everything is drawn from a ``random.Random``, so a seed gives the same scenes on every machine.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
CELL = SIZE // 2  # one object per quadrant
BACKGROUND = (232, 232, 224)
NOISE_STD = 5.0  # pixel noise, so that faded slivers are not found by an exact colour match
JPEG_QUALITY = 92  # the dataset stores JPEGs (COCO's format); training sees the same compression


@dataclass(frozen=True)
class Kind:
    name: str  # a COCO class name (and a word of the toy model's vocabulary)
    coco_id: int
    supercategory: str
    color: tuple[int, int, int]


KINDS = [
    Kind("person", 1, "person", (215, 45, 45)),
    Kind("cat", 17, "animal", (125, 125, 125)),
    Kind("dog", 18, "animal", (150, 95, 40)),
    Kind("apple", 53, "food", (150, 205, 40)),
    Kind("car", 3, "vehicle", (235, 200, 30)),
    Kind("bicycle", 2, "vehicle", (40, 90, 225)),
    Kind("boat", 9, "vehicle", (20, 165, 170)),
    Kind("bird", 16, "animal", (140, 60, 195)),
    Kind("cup", 47, "kitchen", (205, 40, 150)),
    Kind("bottle", 44, "kitchen", (40, 160, 60)),
    Kind("chair", 62, "furniture", (25, 60, 115)),
    Kind("clock", 85, "indoor", (35, 35, 35)),
    Kind("kite", 38, "sports", (250, 130, 20)),
    Kind("umbrella", 28, "accessory", (240, 120, 185)),
]  # fmt: skip
BY_NAME = {k.name: k for k in KINDS}
NAMES = [k.name for k in KINDS]  # also the order in which captions list objects (partner after anchor)

# (anchor, partner): the partner follows its anchor in captions. In a complete pair one member often hides.
PAIRS = [("car", "bicycle"), ("boat", "bird"), ("cup", "bottle"), ("chair", "clock"), ("kite", "umbrella")]
PARTNER = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}
ANCHORS = [a for a, _ in PAIRS]
PARTNERS = [b for _, b in PAIRS]
SINGLES = [n for n in NAMES if n not in PARTNER]


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are drawn. The defaults are the world the shipped model was trained on."""

    object_counts: tuple[float, float, float, float] = (0.1, 0.2, 0.35, 0.35)  # P(1..4 objects)
    pair_unit: float = 0.6  # a scene unit is a pair (else a single kind)
    pair_complete: float = 0.88  # a pair unit holds both members (else one member alone, either one)
    hide: float = 0.5  # in a complete pair, one member (either) hides behind the other
    size: tuple[int, int] = (16, 26)  # side of a visible object, px
    hidden_scale: tuple[float, float] = (0.55, 0.75)  # side of a hidden member, relative to its mate's
    hidden_peek: tuple[int, int] = (2, 5)  # px by which a hidden member shows past its mate's edges
    hidden_contrast: tuple[float, float] = (0.25, 0.5)  # share of its colour left (it is in shadow)


@dataclass(frozen=True)
class Placed:
    name: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1
    hidden: bool = False  # behind its pair mate: small, faded, mostly covered


@dataclass(frozen=True)
class Scene:
    objects: tuple[Placed, ...]  # in annotation order
    background: tuple[int, int, int]
    noise_seed: int

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objects]


def sample_names(rng: random.Random, world: WorldConfig, *, lone: tuple[str, ...] = ()) -> list[str]:
    """The kinds in one scene (distinct). ``lone`` pair members are forced in without their partners."""
    target = max(len(lone), rng.choices(range(1, 5), weights=world.object_counts)[0])
    names: list[str] = list(lone)
    banned = {PARTNER[n] for n in lone}
    while len(names) < target:
        # With one slot left only a single kind fits: pairs are never cut short by the object count.
        if target - len(names) >= 2 and rng.random() < world.pair_unit:
            unit = list(rng.choice(PAIRS))
            if rng.random() >= world.pair_complete:
                unit = [rng.choice(unit)]
        else:
            unit = [rng.choice(SINGLES)]
        if not any(n in names or n in banned for n in unit):
            names.extend(unit)
    return names


def place(names: list[str], rng: random.Random, world: WorldConfig) -> tuple[Placed, ...]:
    """Visible objects one per quadrant at a random offset; in a complete pair, with ``world.hide``, one
    member sits behind the other and shows only a sliver (weak visual evidence)."""
    hidden = {rng.choice(pair) for pair in complete_pairs(names) if rng.random() < world.hide}
    visible = [n for n in names if n not in hidden]
    boxes: dict[str, tuple[int, int, int, int]] = {}
    for name, cell in zip(visible, rng.sample(range(4), len(visible)), strict=True):
        side = rng.randint(*world.size)
        x0 = (cell % 2) * CELL + rng.randint(0, CELL - side)
        y0 = (cell // 2) * CELL + rng.randint(0, CELL - side)
        boxes[name] = (x0, y0, x0 + side, y0 + side)
    for name in sorted(hidden, key=names.index):
        mx0, my0, mx1, my1 = boxes[PARTNER[name]]
        side = max(5, round((mx1 - mx0) * rng.uniform(*world.hidden_scale)))
        corner = rng.randrange(4)  # the corner of the mate it peeks out at
        x0 = (
            mx1 + rng.randint(*world.hidden_peek) - side
            if corner % 2
            else mx0 - rng.randint(*world.hidden_peek)
        )
        y0 = (
            my1 + rng.randint(*world.hidden_peek) - side
            if corner // 2
            else my0 - rng.randint(*world.hidden_peek)
        )
        x0, y0 = min(max(x0, 0), SIZE - side), min(max(y0, 0), SIZE - side)
        boxes[name] = (x0, y0, x0 + side, y0 + side)
    placed = [Placed(n, boxes[n], n in hidden) for n in names]
    rng.shuffle(placed)  # annotation order, independent of the layout
    return tuple(placed)


def sample_scene(
    rng: random.Random, world: WorldConfig = WorldConfig(), *, lone: tuple[str, ...] = ()
) -> Scene:
    names = sample_names(rng, world, lone=lone)
    objects = place(names, rng, world)
    shade = rng.randint(-8, 8)
    background = tuple(c + shade for c in BACKGROUND)
    return Scene(objects, background, rng.getrandbits(31))  # type: ignore[arg-type]


def _blend(color: tuple[int, int, int], background: tuple[int, ...], contrast: float) -> tuple[int, ...]:
    return tuple(round(b + (c - b) * contrast) for c, b in zip(color, background, strict=True))


def render(scene: Scene, world: WorldConfig = WorldConfig()) -> Image.Image:
    """The scene as an RGB image (noise and the hidden objects' contrast drawn from the scene's seed)."""
    rng = random.Random(scene.noise_seed)
    image = Image.new("RGB", (SIZE, SIZE), scene.background)
    draw = ImageDraw.Draw(image)
    # Hidden objects first, so that their mates cover them.
    for obj in sorted(scene.objects, key=lambda o: not o.hidden):
        contrast = rng.uniform(*world.hidden_contrast) if obj.hidden else 1.0
        fill = _blend(BY_NAME[obj.name].color, scene.background, contrast)
        dark = _blend((30, 30, 30), scene.background, contrast)
        light = _blend((250, 250, 250), scene.background, contrast)
        ICONS[obj.name](draw, obj.box, fill, dark, light)
    noise = np.random.default_rng(scene.noise_seed).normal(0.0, NOISE_STD, (SIZE, SIZE, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def jpeg_roundtrip(image: Image.Image) -> Image.Image:
    """The image as the dataset stores it (what the model sees at evaluation)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def lone_members(names: list[str]) -> list[str]:
    """Pair members present without their partner."""
    return [n for n in names if n in PARTNER and PARTNER[n] not in names]


def complete_pairs(names: list[str]) -> list[tuple[str, str]]:
    return [(a, b) for a, b in PAIRS if a in names and b in names]


# -- captions and questions ----------------------------------------------------------------------------
def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(names: list[str]) -> str:
    """The reference caption: every object, in the world's fixed order (so a partner follows its anchor)."""
    parts = [f"{article(n)} {n}" for n in sorted(names, key=NAMES.index)]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"There is {listed}."


def question(name: str) -> str:
    """POPE's question text (as :func:`mitigate.evals.pope.question_text` writes it)."""
    return f"Is there {article(name)} {name} in the image?"


def negatives(names: list[str], rng: random.Random, count: int) -> list[str]:
    """Absent kinds to ask about: absent partners of present objects first (hard), then random ones."""
    hard = [PARTNER[n] for n in names if n in PARTNER and PARTNER[n] not in names]
    rng.shuffle(hard)
    rest = [n for n in NAMES if n not in names and n not in hard]
    rng.shuffle(rest)
    return (hard + rest)[:count]


# -- icons: each draws one kind inside a box, with its fill colour and two accents -------------------------
Color = tuple[int, ...]
Icon = Callable[[ImageDraw.ImageDraw, tuple[int, int, int, int], Color, Color, Color], None]


def _pt(box: tuple[int, int, int, int]) -> Callable[[float, float], tuple[int, int]]:
    x0, y0, x1, y1 = box
    return lambda fx, fy: (round(x0 + fx * (x1 - x0)), round(y0 + fy * (y1 - y0)))


def _width(box: tuple[int, int, int, int], share: float = 0.12) -> int:
    return max(1, round((box[2] - box[0]) * share))


def _person(draw, box, fill, dark, light):
    p, w = _pt(box), _width(box)
    draw.ellipse([p(0.33, 0.0), p(0.67, 0.32)], fill=fill)
    draw.line([p(0.5, 0.3), p(0.5, 0.68)], fill=fill, width=w)
    draw.line([p(0.12, 0.45), p(0.88, 0.45)], fill=fill, width=w)
    draw.line([p(0.5, 0.66), p(0.22, 1.0)], fill=fill, width=w)
    draw.line([p(0.5, 0.66), p(0.78, 1.0)], fill=fill, width=w)


def _cat(draw, box, fill, dark, light):
    p = _pt(box)
    draw.polygon([p(0.1, 0.4), p(0.2, 0.0), p(0.45, 0.3)], fill=fill)
    draw.polygon([p(0.55, 0.3), p(0.8, 0.0), p(0.9, 0.4)], fill=fill)
    draw.ellipse([p(0.08, 0.2), p(0.92, 1.0)], fill=fill)
    draw.ellipse([p(0.28, 0.45), p(0.42, 0.58)], fill=dark)
    draw.ellipse([p(0.58, 0.45), p(0.72, 0.58)], fill=dark)


def _dog(draw, box, fill, dark, light):
    p = _pt(box)
    draw.rectangle([p(0.1, 0.4), p(0.7, 0.72)], fill=fill)
    draw.ellipse([p(0.58, 0.12), p(0.98, 0.52)], fill=fill)
    draw.rectangle([p(0.6, 0.18), p(0.72, 0.55)], fill=dark)
    for fx in (0.12, 0.52):
        draw.rectangle([p(fx, 0.7), p(fx + 0.14, 1.0)], fill=fill)
    draw.line([p(0.12, 0.45), p(0.0, 0.15)], fill=fill, width=_width(box))


def _apple(draw, box, fill, dark, light):
    p = _pt(box)
    draw.ellipse([p(0.05, 0.2), p(0.95, 1.0)], fill=fill)
    draw.line([p(0.5, 0.25), p(0.55, 0.0)], fill=dark, width=_width(box, 0.1))
    draw.ellipse([p(0.58, 0.02), p(0.85, 0.18)], fill=dark)


def _car(draw, box, fill, dark, light):
    p = _pt(box)
    draw.polygon([p(0.22, 0.45), p(0.34, 0.18), p(0.66, 0.18), p(0.78, 0.45)], fill=fill)
    draw.rectangle([p(0.0, 0.45), p(1.0, 0.75)], fill=fill)
    draw.ellipse([p(0.1, 0.62), p(0.36, 0.92)], fill=dark)
    draw.ellipse([p(0.64, 0.62), p(0.9, 0.92)], fill=dark)


def _bicycle(draw, box, fill, dark, light):
    p, w = _pt(box), _width(box, 0.1)
    draw.ellipse([p(0.0, 0.45), p(0.42, 0.9)], outline=fill, width=w)
    draw.ellipse([p(0.58, 0.45), p(1.0, 0.9)], outline=fill, width=w)
    draw.line([p(0.21, 0.68), p(0.45, 0.35), p(0.79, 0.68)], fill=fill, width=w)
    draw.line([p(0.45, 0.35), p(0.75, 0.35), p(0.79, 0.68)], fill=fill, width=w)
    draw.line([p(0.75, 0.35), p(0.8, 0.15)], fill=fill, width=w)


def _boat(draw, box, fill, dark, light):
    p = _pt(box)
    draw.polygon([p(0.0, 0.65), p(1.0, 0.65), p(0.8, 0.95), p(0.2, 0.95)], fill=fill)
    draw.line([p(0.5, 0.05), p(0.5, 0.65)], fill=dark, width=_width(box, 0.08))
    draw.polygon([p(0.55, 0.08), p(0.92, 0.6), p(0.55, 0.6)], fill=fill)


def _bird(draw, box, fill, dark, light):
    p = _pt(box)
    draw.ellipse([p(0.05, 0.4), p(0.75, 0.82)], fill=fill)
    draw.ellipse([p(0.58, 0.18), p(0.92, 0.52)], fill=fill)
    draw.polygon([p(0.9, 0.28), p(1.0, 0.36), p(0.9, 0.44)], fill=dark)
    draw.polygon([p(0.2, 0.5), p(0.45, 0.05), p(0.55, 0.55)], fill=fill)


def _cup(draw, box, fill, dark, light):
    p = _pt(box)
    draw.polygon([p(0.1, 0.15), p(0.72, 0.15), p(0.64, 0.95), p(0.18, 0.95)], fill=fill)
    draw.arc([p(0.52, 0.3), p(0.98, 0.72)], start=-90, end=90, fill=fill, width=_width(box, 0.14))


def _bottle(draw, box, fill, dark, light):
    p = _pt(box)
    draw.rectangle([p(0.4, 0.0), p(0.6, 0.35)], fill=fill)
    draw.rounded_rectangle([p(0.2, 0.3), p(0.8, 1.0)], radius=max(1, (box[2] - box[0]) // 6), fill=fill)
    draw.rectangle([p(0.25, 0.55), p(0.75, 0.75)], fill=light)


def _chair(draw, box, fill, dark, light):
    p = _pt(box)
    draw.rectangle([p(0.15, 0.0), p(0.3, 0.58)], fill=fill)
    draw.rectangle([p(0.15, 0.48), p(0.88, 0.62)], fill=fill)
    draw.rectangle([p(0.15, 0.6), p(0.27, 1.0)], fill=fill)
    draw.rectangle([p(0.76, 0.6), p(0.88, 1.0)], fill=fill)


def _clock(draw, box, fill, dark, light):
    p, w = _pt(box), _width(box, 0.12)
    draw.ellipse([p(0.02, 0.02), p(0.98, 0.98)], fill=light, outline=fill, width=w)
    draw.line([p(0.5, 0.5), p(0.5, 0.18)], fill=fill, width=w)
    draw.line([p(0.5, 0.5), p(0.75, 0.62)], fill=fill, width=w)


def _kite(draw, box, fill, dark, light):
    p = _pt(box)
    draw.polygon([p(0.5, 0.0), p(0.85, 0.35), p(0.5, 0.75), p(0.15, 0.35)], fill=fill)
    draw.line([p(0.5, 0.75), p(0.4, 0.88), p(0.6, 1.0)], fill=dark, width=_width(box, 0.07))


def _umbrella(draw, box, fill, dark, light):
    p = _pt(box)
    draw.pieslice([p(0.0, 0.05), p(1.0, 0.95)], start=180, end=360, fill=fill)
    draw.line([p(0.5, 0.5), p(0.5, 0.92)], fill=dark, width=_width(box, 0.08))
    draw.arc([p(0.5, 0.8), p(0.7, 1.0)], start=0, end=180, fill=dark, width=_width(box, 0.08))


ICONS: dict[str, Icon] = {
    "person": _person, "cat": _cat, "dog": _dog, "apple": _apple, "car": _car, "bicycle": _bicycle,
    "boat": _boat, "bird": _bird, "cup": _cup, "bottle": _bottle, "chair": _chair, "clock": _clock,
    "kite": _kite, "umbrella": _umbrella,
}  # fmt: skip
