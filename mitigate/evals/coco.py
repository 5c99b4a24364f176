"""COCO access through pycocotools: instances, captions and images by id, from a ``--coco-root``.

Expected layout (as COCO's own downloads unpack)::

    ROOT/annotations/instances_val2014.json   captions_val2014.json   (train2014 likewise, optional)
    ROOT/val2014/COCO_val2014_000000xxxxxx.jpg

A missing or unreadable annotation file is a setup problem (:class:`CocoSetupError`, raised before any
generation). A single missing or corrupt image is a :class:`SampleError` for that sample only.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

SPLITS = ("val2014", "train2014")
KINDS = ("instances", "captions")
BUILTIN_SAMPLE = "builtin:sample"
BUILTIN_SHAPES = "builtin:shapes"  # the toy world's held-out set (mitigate.builtin.shapes)
BUILTIN_DATA = (BUILTIN_SAMPLE, BUILTIN_SHAPES)
_FILE_SPLIT = re.compile(r"^COCO_([a-z]+\d{4})_(\d+)\.\w+$")

LAYOUT = (
    "expected COCO's layout: ROOT/annotations/instances_val2014.json and captions_val2014.json, "
    "images in ROOT/val2014/COCO_val2014_000000xxxxxx.jpg (or use --data builtin:sample)"
)


class CocoSetupError(RuntimeError):
    """The COCO files are missing or unreadable: fix the setup, nothing was evaluated."""


class SampleError(RuntimeError):
    """One sample cannot be evaluated (for example its image is missing or corrupt)."""


def split_of_file(file_name: str, default: str = "val2014") -> str:
    """``COCO_train2014_...jpg`` -> ``train2014``; other names fall back to ``default``."""
    match = _FILE_SPLIT.match(file_name)
    return match.group(1) if match else default


class CocoData:
    """Lazy, cached access to one COCO root (annotation files are large: each is read at most once)."""

    def __init__(self, root: Path | str, label: str | None = None):
        self.root = Path(root).expanduser()
        self.label = label or str(self.root)
        if not self.root.is_dir():
            raise CocoSetupError(f"--coco-root {self.root} is not a folder; {LAYOUT}")
        self._cache: dict[tuple[str, str], Any] = {}

    # -- annotations -------------------------------------------------------------------------------
    def annotation_path(self, kind: str, split: str = "val2014") -> Path:
        return self.root / "annotations" / f"{kind}_{split}.json"

    def has(self, kind: str, split: str) -> bool:
        return self.annotation_path(kind, split).is_file()

    def coco(self, kind: str, split: str = "val2014"):
        """The pycocotools ``COCO`` object of one annotation file."""
        if (kind, split) in self._cache:
            return self._cache[kind, split]
        from pycocotools.coco import COCO

        path = self.annotation_path(kind, split)
        if not path.is_file():
            raise CocoSetupError(f"{path} not found; {LAYOUT}")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                data = COCO(str(path))
        except (ValueError, KeyError, TypeError, AssertionError) as error:
            raise CocoSetupError(f"{path} is not a readable COCO annotation file: {error}") from error
        self._cache[kind, split] = data
        return data

    def image_ids(self, split: str = "val2014") -> list[int]:
        """Every image id of the split, sorted (from the instances file's image list)."""
        return sorted(self.coco("instances", split).imgs)

    def file_name(self, image_id: int, split: str = "val2014") -> str:
        images = self.coco("instances", split).imgs
        if image_id not in images:
            raise SampleError(f"image id {image_id} is not in {self.annotation_path('instances', split)}")
        return images[image_id]["file_name"]

    def objects(self, split: str = "val2014") -> dict[int, list[str]]:
        """Per image, its distinct category names in annotation order (first appearance in the file).

        The order is our choice (POPE's positives are "the first 3 objects" of an unreleased list whose
        order cannot be recovered): the first appearance in ``instances_*.json``'s annotation list.
        """
        key = ("objects", split)
        if key not in self._cache:
            data = self.coco("instances", split)
            names = {c["id"]: c["name"] for c in data.dataset.get("categories", [])}
            out: dict[int, list[str]] = {i: [] for i in data.imgs}
            for ann in data.dataset.get("annotations", []):
                name = names.get(ann["category_id"])
                if name is None:
                    raise CocoSetupError(
                        f"{self.annotation_path('instances', split)}: annotation {ann.get('id')} has an "
                        f"unknown category_id {ann['category_id']}"
                    )
                objs = out.setdefault(ann["image_id"], [])
                if name not in objs:
                    objs.append(name)
            self._cache[key] = out
        return self._cache[key]

    def reference_captions(self, split: str = "val2014") -> dict[int, list[str]]:
        key = ("captions_by_image", split)
        if key not in self._cache:
            out: dict[int, list[str]] = {}
            for ann in self.coco("captions", split).dataset.get("annotations", []):
                out.setdefault(ann["image_id"], []).append(ann["caption"])
            self._cache[key] = out
        return self._cache[key]

    def split_of_image(self, image_id: int) -> str | None:
        """The split whose instances list ``image_id`` (val2014 first; train2014 only if present)."""
        for split in SPLITS:
            if (split == "val2014" or self.has("instances", split)) and image_id in self.coco(
                "instances", split
            ).imgs:
                return split
        return None

    # -- images ------------------------------------------------------------------------------------
    def image_path(self, file_name: str) -> Path:
        return self.root / split_of_file(file_name) / file_name

    def check_images(self, file_names: list[str]) -> None:
        """Setup check before a run: the image folders exist (single missing files are per-sample)."""
        for folder in sorted({split_of_file(f) for f in file_names}):
            if not (self.root / folder).is_dir():
                raise CocoSetupError(f"image folder {self.root / folder} not found; {LAYOUT}")

    def load_image(self, file_name: str) -> Image.Image:
        path = self.image_path(file_name)
        if not path.is_file():
            raise SampleError(f"image {path} not found")
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise SampleError(f"image {path} cannot be read: {error}") from error


def open_data(data: str | None, coco_root: Path | str | None) -> CocoData:
    """``--data builtin:sample`` or ``builtin:shapes`` (generated locally) or ``--coco-root DIR`` (COCO)."""
    if data not in (None, "coco", *BUILTIN_DATA):
        raise CocoSetupError(
            f"unknown --data {data!r}; use --coco-root DIR (COCO) or --data {' or '.join(BUILTIN_DATA)}"
        )
    if data in BUILTIN_DATA:
        if coco_root is not None:
            raise CocoSetupError(f"give either --coco-root or --data {data}, not both")
        if data == BUILTIN_SHAPES:
            from ..builtin.shapes import ensure_shapes

            return CocoData(ensure_shapes(), label=BUILTIN_SHAPES)
        from ..builtin.coco_sample import ensure_sample

        return CocoData(ensure_sample(), label=BUILTIN_SAMPLE)
    if coco_root is None:
        raise CocoSetupError(f"no data: give --coco-root DIR ({LAYOUT})")
    return CocoData(coco_root)
