"""``builtin:sample`` as a dataset: a tiny COCO-format val2014 made locally, for offline POPE and CHAIR.

The files have COCO's real layout and format (``annotations/instances_val2014.json``,
``annotations/captions_val2014.json``, ``val2014/COCO_val2014_000000xxxxxx.jpg``), so the evaluation reads
them through exactly the code that reads real COCO. Each image holds a few objects drawn as simple icons,
one colour per category; the categories are COCO classes (with COCO's ids) whose names are words of the
built-in tiny model's vocabulary. Everything comes from a seed, so every machine makes the same files.

The dataset is written once into ``$MITIGATE_CACHE/coco_sample_v<VERSION>`` (default
``~/.cache/mitigate``), atomically, so that several processes may ask for it at the same time.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

VERSION = 1
SPLIT = "val2014"
IMAGE_SIZE = 128
CELL = IMAGE_SIZE // 2

# (COCO id, name, supercategory, colour): the names are words of builtin:tiny-llava's vocabulary.
CATEGORIES = [
    (1, "person", "person", (200, 60, 50)),
    (2, "bicycle", "vehicle", (40, 120, 200)),
    (3, "car", "vehicle", (220, 180, 30)),
    (6, "bus", "vehicle", (240, 130, 20)),
    (9, "boat", "vehicle", (30, 160, 160)),
    (16, "bird", "animal", (120, 60, 170)),
    (17, "cat", "animal", (110, 110, 110)),
    (18, "dog", "animal", (140, 90, 40)),
    (47, "cup", "kitchen", (220, 80, 160)),
    (62, "chair", "furniture", (60, 150, 60)),
    (85, "clock", "indoor", (20, 20, 20)),
]
COLOR_WORDS = {"person": "red", "bicycle": "blue", "car": "yellow", "bus": "orange", "boat": "teal",
               "bird": "purple", "cat": "gray", "dog": "brown", "cup": "pink", "chair": "green",
               "clock": "black"}  # fmt: skip
# Caption words other than the class name, all in the reference CHAIR synonym table and the built-in one.
SYNONYMS = {"person": ["man", "woman", "child"], "cat": ["kitten"], "dog": ["puppy"], "bicycle": ["bike"],
            "boat": ["sailboat"], "bird": ["pigeon"]}  # fmt: skip
PLURALS = {"person": "people", "bus": "buses", "boat": "boats"}

NUM_IMAGES = 18  # 16 with 3-4 categories, then one with 2 categories (3 instances) and one with 1


def cache_root() -> Path:
    return Path(os.environ.get("MITIGATE_CACHE") or Path.home() / ".cache" / "mitigate")


def ensure_sample(root: Path | None = None, seed: int = 0) -> Path:
    """The dataset's root folder, generated on first use (safe when several processes race)."""
    suffix = "" if seed == 0 else f"_seed{seed}"
    target = (root or cache_root()) / f"coco_sample_v{VERSION}{suffix}"
    return ensure_generated(target, lambda tmp: generate(tmp, seed=seed))


def ensure_generated(target: Path, write: Callable[[Path], None]) -> Path:
    """``target``, written once by ``write(empty folder)`` into a temporary sibling and renamed into place,
    so a reader never sees half a dataset and racing processes agree. The captions file marks it done."""
    done = target / "annotations" / f"captions_{SPLIT}.json"
    if done.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: its copy is identical
            if not done.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def file_name(image_id: int) -> str:
    return f"COCO_{SPLIT}_{image_id:012d}.jpg"


def _compositions(rng: random.Random) -> list[list[str]]:
    """Per image, the category names drawn (a repeated name is a second instance)."""
    names = [c[1] for c in CATEGORIES]
    deck: list[str] = []
    images = []
    for index in range(NUM_IMAGES - 2):
        count = 3 + index % 2
        chosen: list[str] = []
        while len(chosen) < count:
            if not deck:  # a shuffled deck, refilled when empty, so that every category appears evenly
                deck = names[:]
                rng.shuffle(deck)
            name = deck.pop()
            if name in chosen:
                deck.insert(0, name)
                continue
            chosen.append(name)
        images.append(chosen)
    images.append(["person", "person", "dog"])  # two categories: POPE skips it, CHAIR keeps it
    images.append(["clock"])
    return images


def generate(root: Path, seed: int = 0) -> None:
    """Write the dataset into ``root`` (which exists and is empty)."""
    rng = random.Random(seed)
    (root / "annotations").mkdir(parents=True)
    (root / SPLIT).mkdir()
    by_name = {c[1]: c for c in CATEGORIES}
    ids = rng.sample(range(100_000, 600_000), NUM_IMAGES)
    images, instances, captions = [], [], []
    for image_id, names in zip(ids, _compositions(rng), strict=True):
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (235, 235, 228))
        draw = ImageDraw.Draw(image)
        cells = rng.sample(range(4), len(names))
        for name, cell in zip(names, cells, strict=True):
            side = rng.randint(40, 56)
            x0 = (cell % 2) * CELL + rng.randint(0, CELL - side)
            y0 = (cell // 2) * CELL + rng.randint(0, CELL - side)
            box = (x0, y0, x0 + side, y0 + side)
            draw_icon(draw, name, box, by_name[name][3])
            instances.append(
                {
                    "id": len(instances) + 1,
                    "image_id": image_id,
                    "category_id": by_name[name][0],
                    "segmentation": [[x0, y0, x0 + side, y0, x0 + side, y0 + side, x0, y0 + side]],
                    "area": float(side * side),
                    "bbox": [float(x0), float(y0), float(side), float(side)],
                    "iscrowd": 0,
                }
            )
        image.save(root / SPLIT / file_name(image_id), quality=92)
        images.append(
            {
                "id": image_id,
                "file_name": file_name(image_id),
                "width": IMAGE_SIZE,
                "height": IMAGE_SIZE,
                "license": 0,
            }
        )
        for text in _captions(names, rng):
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": text})
    info = {
        "description": f"mitigate builtin:sample v{VERSION} (generated, seed {seed})",
        "version": "1.0",
        "year": 2014,
    }
    categories = [{"id": i, "name": n, "supercategory": s} for i, n, s, _ in CATEGORIES]
    write_coco(root, info, images, instances, captions, categories)


def write_coco(
    root: Path, info: dict, images: list, instances: list, captions: list, categories: list
) -> None:
    """COCO's two annotation files under ``root/annotations``; captions last (they mark completion)."""
    common = {"info": info, "licenses": [], "images": images}
    (root / "annotations" / f"instances_{SPLIT}.json").write_text(
        json.dumps({**common, "annotations": instances, "categories": categories})
    )
    captions_file = root / "annotations" / f"captions_{SPLIT}.json"
    captions_file.write_text(json.dumps({**common, "annotations": captions}))


def _phrase(name: str, count: int, rng: random.Random, synonym: bool) -> str:
    if count > 1:
        return f"two {PLURALS.get(name, name + 's')}"
    word = rng.choice(SYNONYMS[name]) if synonym and name in SYNONYMS else name
    article = "an" if word[0] in "aeiou" else "a"
    return f"{article} {word}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _captions(names: list[str], rng: random.Random) -> list[str]:
    counts = {n: names.count(n) for n in dict.fromkeys(names)}
    plain = [_phrase(n, c, rng, False) for n, c in counts.items()]
    varied = [_phrase(n, c, rng, True) for n, c in counts.items()]
    colored = [f"{COLOR_WORDS[n]} {n}" for n in counts]
    return [
        f"A drawing of {_join(plain)}.",
        f"There is {_join(varied)} on a light background.",
        f"A simple picture with {_join(colored)} shapes.",
        f"{_join(varied).capitalize()} drawn in bright colors.",
        f"Icons of {_join(plain)} in a square image.",
    ]


def draw_icon(draw: ImageDraw.ImageDraw, name: str, box: tuple[int, int, int, int], color) -> None:
    """One category as a simple recognisable icon inside ``box``."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx = (x0 + x1) // 2

    def p(fx: float, fy: float) -> tuple[int, int]:
        return (round(x0 + fx * w), round(y0 + fy * h))

    dark = (30, 30, 30)
    if name == "person":  # stick figure
        draw.ellipse([p(0.35, 0.0), p(0.65, 0.3)], fill=color)
        draw.line([p(0.5, 0.3), p(0.5, 0.7)], fill=color, width=4)
        draw.line([p(0.15, 0.45), p(0.85, 0.45)], fill=color, width=4)
        draw.line([p(0.5, 0.7), p(0.25, 1.0)], fill=color, width=4)
        draw.line([p(0.5, 0.7), p(0.75, 1.0)], fill=color, width=4)
    elif name == "cat":  # round face, pointed ears, whiskers
        draw.polygon([p(0.15, 0.35), p(0.25, 0.0), p(0.45, 0.3)], fill=color)
        draw.polygon([p(0.55, 0.3), p(0.75, 0.0), p(0.85, 0.35)], fill=color)
        draw.ellipse([p(0.1, 0.2), p(0.9, 1.0)], fill=color)
        draw.ellipse([p(0.3, 0.45), p(0.4, 0.55)], fill=dark)
        draw.ellipse([p(0.6, 0.45), p(0.7, 0.55)], fill=dark)
        draw.line([p(0.2, 0.75), p(0.8, 0.75)], fill=dark, width=1)
    elif name == "dog":  # body, head, floppy ear, legs, tail
        draw.rectangle([p(0.1, 0.4), p(0.7, 0.7)], fill=color)
        draw.ellipse([p(0.6, 0.15), p(0.95, 0.5)], fill=color)
        draw.rectangle([p(0.6, 0.2), p(0.7, 0.5)], fill=dark)
        for fx in (0.15, 0.55):
            draw.rectangle([p(fx, 0.7), p(fx + 0.1, 1.0)], fill=color)
        draw.line([p(0.1, 0.45), p(0.0, 0.2)], fill=color, width=3)
    elif name == "car":  # cabin, body, two wheels
        draw.polygon([p(0.25, 0.45), p(0.35, 0.2), p(0.65, 0.2), p(0.75, 0.45)], fill=color)
        draw.rectangle([p(0.0, 0.45), p(1.0, 0.75)], fill=color)
        draw.ellipse([p(0.1, 0.65), p(0.35, 0.9)], fill=dark)
        draw.ellipse([p(0.65, 0.65), p(0.9, 0.9)], fill=dark)
    elif name == "bus":  # long box, a row of windows, wheels
        draw.rectangle([p(0.0, 0.2), p(1.0, 0.8)], fill=color)
        for i in range(4):
            draw.rectangle([p(0.06 + 0.235 * i, 0.3), p(0.23 + 0.235 * i, 0.5)], fill=(250, 250, 250))
        draw.ellipse([p(0.1, 0.72), p(0.3, 0.92)], fill=dark)
        draw.ellipse([p(0.7, 0.72), p(0.9, 0.92)], fill=dark)
    elif name == "bicycle":  # two wheels, frame, handlebar
        draw.ellipse([p(0.0, 0.5), p(0.4, 0.9)], outline=color, width=3)
        draw.ellipse([p(0.6, 0.5), p(1.0, 0.9)], outline=color, width=3)
        draw.line([p(0.2, 0.7), p(0.45, 0.4), p(0.8, 0.7)], fill=color, width=3)
        draw.line([p(0.45, 0.4), p(0.75, 0.4), p(0.8, 0.7)], fill=color, width=3)
        draw.line([p(0.75, 0.4), p(0.8, 0.25)], fill=color, width=3)
    elif name == "boat":  # hull, mast, sail
        draw.polygon([p(0.0, 0.7), p(1.0, 0.7), p(0.8, 0.95), p(0.2, 0.95)], fill=color)
        draw.line([(cx, round(y0 + 0.05 * h)), (cx, round(y0 + 0.7 * h))], fill=dark, width=2)
        draw.polygon([p(0.52, 0.08), p(0.9, 0.62), p(0.52, 0.62)], fill=(250, 250, 250), outline=color)
    elif name == "bird":  # body, head, beak, wing
        draw.ellipse([p(0.1, 0.4), p(0.75, 0.8)], fill=color)
        draw.ellipse([p(0.6, 0.2), p(0.9, 0.5)], fill=color)
        draw.polygon([p(0.88, 0.3), p(1.0, 0.37), p(0.88, 0.42)], fill=(240, 170, 20))
        draw.polygon([p(0.25, 0.5), p(0.5, 0.1), p(0.55, 0.55)], fill=dark)
    elif name == "cup":  # tapered body and a handle
        draw.polygon([p(0.15, 0.2), p(0.7, 0.2), p(0.62, 0.9), p(0.23, 0.9)], fill=color)
        draw.arc([p(0.55, 0.35), p(0.95, 0.7)], start=-90, end=90, fill=color, width=4)
    elif name == "chair":  # back, seat, legs
        draw.rectangle([p(0.2, 0.0), p(0.3, 0.55)], fill=color)
        draw.rectangle([p(0.2, 0.5), p(0.85, 0.6)], fill=color)
        draw.rectangle([p(0.2, 0.6), p(0.28, 1.0)], fill=color)
        draw.rectangle([p(0.77, 0.6), p(0.85, 1.0)], fill=color)
    elif name == "clock":  # face and two hands
        draw.ellipse([p(0.05, 0.05), p(0.95, 0.95)], fill=(250, 250, 250), outline=color, width=4)
        draw.line([p(0.5, 0.5), p(0.5, 0.2)], fill=color, width=3)
        draw.line([p(0.5, 0.5), p(0.72, 0.6)], fill=color, width=3)
    else:
        raise ValueError(f"no icon for {name!r}; icons: {', '.join(c[1] for c in CATEGORIES)}")
