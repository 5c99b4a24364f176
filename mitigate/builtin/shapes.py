"""``builtin:shapes``: a held-out COCO-format evaluation set of the toy world (:mod:`.toy_world`).

Written like ``builtin:sample`` (``annotations/instances_val2014.json``, ``captions_val2014.json``,
``val2014/COCO_val2014_*.jpg``) into ``$MITIGATE_CACHE/toy_shapes_v<VERSION>`` (default
``~/.cache/mitigate``), once, atomically, from a seed whose scene stream no training run uses. POPE and
CHAIR read it through the code that reads real COCO, so the splits come out of POPE's own builder: the
adversarial split asks, for each positive, about the object that co-occurs with it most.

The scenes are drawn from the training world, conditioned on their make-up: the 150 POPE images (3-4
objects) each hold a pair member without its mate (half of them one such lone member and a complete pair,
half two lone members); 50 more plain scenes of 1-2 objects widen CHAIR. In the world a pair is incomplete
in about 12% of the scenes that hold a member; here every POPE image has one, so that the adversarial split
asks about an absent mate often (about 45% of its questions on absent objects, 15% in the random split),
while each member's mate stays its most frequent companion in the set, as POPE's ranking needs.
"""

from __future__ import annotations

import random
from pathlib import Path

from . import toy_world
from .coco_sample import cache_root, ensure_generated, write_coco

VERSION = 2
SPLIT = "val2014"
SEED = 2014  # the training stream is seeded with "toy-train:<seed>", so no scene is shared
NUM_IMAGES = 200  # 150 with >= 3 objects (POPE: 900 questions per split), 50 with 1 or 2
NUM_POPE_IMAGES = 150


def ensure_shapes(root: Path | None = None, seed: int = SEED) -> Path:
    """The dataset's root folder, generated on first use (safe when several processes race)."""
    suffix = "" if seed == SEED else f"_seed{seed}"
    target = (root or cache_root()) / f"toy_shapes_v{VERSION}{suffix}"
    return ensure_generated(target, lambda tmp: generate(tmp, seed=seed))


def file_name(image_id: int) -> str:
    return f"COCO_{SPLIT}_{image_id:012d}.jpg"


def scenes(seed: int = SEED) -> list[toy_world.Scene]:
    """The set's scenes, in image-id order: the POPE images (3-4 objects), then small plain ones (1-2).

    Half of the POPE images hold exactly one incomplete pair and at least one complete pair, half exactly
    two incomplete pairs; the lone members cycle through every pair member.
    """
    rng = random.Random(f"toy-shapes:{seed}")
    members = [m for pair in toy_world.PAIRS for m in pair]
    out: list[toy_world.Scene] = []
    while len(out) < NUM_POPE_IMAGES:
        i = len(out)
        if i % 2 == 0:
            lone: tuple[str, ...] = (members[i // 2 % len(members)],)
        else:
            first = members[i // 2 % len(members)]
            second = rng.choice([m for m in members if m not in (first, toy_world.PARTNER[first])])
            lone = (first, second)
        scene = toy_world.sample_scene(rng, lone=lone)
        names = scene.names
        if len(names) < 3 or sorted(toy_world.lone_members(names)) != sorted(lone):
            continue
        if len(lone) == 1 and not toy_world.complete_pairs(names):
            continue
        out.append(scene)
    while len(out) < NUM_IMAGES:
        scene = toy_world.sample_scene(rng)
        if len(scene.objects) <= 2:
            out.append(scene)
    return out


def generate(root: Path, seed: int = SEED) -> None:
    """Write the dataset into ``root`` (which exists and is empty)."""
    (root / "annotations").mkdir(parents=True)
    (root / SPLIT).mkdir()
    rng = random.Random(f"toy-shapes-ids:{seed}")
    ids = rng.sample(range(100_000, 600_000), NUM_IMAGES)
    images, instances, captions = [], [], []
    for image_id, scene in zip(ids, scenes(seed), strict=True):
        toy_world.render(scene).save(root / SPLIT / file_name(image_id), quality=toy_world.JPEG_QUALITY)
        images.append(
            {
                "id": image_id,
                "file_name": file_name(image_id),
                "width": toy_world.SIZE,
                "height": toy_world.SIZE,
                "license": 0,
            }
        )
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            instances.append(
                {
                    "id": len(instances) + 1,
                    "image_id": image_id,
                    "category_id": toy_world.BY_NAME[obj.name].coco_id,
                    "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                    "area": float((x1 - x0) * (y1 - y0)),
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "iscrowd": 0,
                    "hidden": obj.hidden,  # not a COCO field (behind its pair mate); readers ignore it
                }
            )
        captions.append(
            {"id": len(captions) + 1, "image_id": image_id, "caption": toy_world.caption(scene.names)}
        )
    info = {
        "description": f"mitigate builtin:shapes v{VERSION} (toy world, generated, seed {seed})",
        "version": "1.0",
        "year": 2014,
    }
    categories = [
        {"id": k.coco_id, "name": k.name, "supercategory": k.supercategory}
        for k in sorted(toy_world.KINDS, key=lambda k: k.coco_id)
    ]
    write_coco(root, info, images, instances, captions, categories)
