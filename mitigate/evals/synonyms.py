"""CHAIR's synonym table: the 80 COCO classes, each with the words that name it in a caption.

Paper-comparable CHAIR needs the original table (``data/synonyms.txt`` of the CHAIR repository,
LisaAnne/Hallucination), which this project does not ship: pass it with ``--synonyms FILE``. It is read
exactly as the reference code reads it: each line ``strip()``-ed and split on ", ", the first entry being
the class. Entries that keep a leading space (" motor bike", " cheesecake") therefore never match, as in
the reference.

Without a file, :data:`BUILTIN` is used: this project's own table, written from COCO's class names and
common English words for them. Results say which table was used; numbers from the built-in table are not
comparable with published CHAIR numbers. Captions are singularised before lookup (pattern's rules, see
:mod:`.words`), so entries are singular forms; a two-word entry matches only when it is also a merge
(:data:`~mitigate.evals.chair.DOUBLE_WORDS`, plus the built-in table's own two-word entries).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# COCO class -> other words for it (the class name itself is always an entry).
BUILTIN: dict[str, tuple[str, ...]] = {
    "person": ("people", "man", "men", "woman", "women", "boy", "girl", "child", "children", "kid", "baby",
               "toddler", "adult", "lady", "guy", "gentleman", "player", "skier", "snowboarder", "surfer",
               "skateboarder", "rider", "biker", "cyclist", "pedestrian", "driver", "worker", "chef",
               "cook", "officer", "policeman", "soldier", "tourist", "teenager", "student", "spectator",
               "passenger", "customer", "vendor", "batter", "catcher", "pitcher", "umpire", "athlete",
               "bride", "groom", "mother", "father", "son", "daughter"),
    "bicycle": ("bike", "tricycle", "unicycle"),
    "car": ("automobile", "sedan", "suv", "van", "minivan", "taxi", "cab", "jeep", "hatchback", "coupe",
            "convertible", "limo", "limousine"),
    "motorcycle": ("motorbike", "motor bike", "motor cycle", "scooter", "moped"),
    "airplane": ("plane", "aeroplane", "air plane", "jet", "jetliner", "airliner", "aircraft", "airbus",
                 "biplane", "seaplane"),
    "bus": ("minibus", "trolley", "trolleybus"),
    "train": ("locomotive", "tram", "streetcar", "railcar", "caboose"),
    "truck": ("pickup", "lorry", "firetruck"),
    "boat": ("ship", "sailboat", "yacht", "canoe", "kayak", "ferry", "motorboat", "speedboat", "rowboat",
             "tugboat", "vessel", "catamaran", "dinghy"),
    "traffic light": ("traffic signal", "stop light", "stoplight", "streetlight", "street light"),
    "fire hydrant": ("hydrant",),
    "stop sign": (),
    "parking meter": (),
    "bench": ("pew",),
    "bird": ("pigeon", "seagull", "gull", "duck", "goose", "swan", "parrot", "sparrow", "crow", "owl",
             "eagle", "hawk", "pelican", "flamingo", "heron", "penguin"),
    "cat": ("kitten", "kitty", "feline", "tabby"),
    "dog": ("puppy", "pup", "doggy", "doggie", "canine", "terrier", "poodle", "labrador", "retriever",
            "bulldog", "beagle", "collie", "pug", "dachshund", "chihuahua", "husky"),
    "horse": ("pony", "foal", "stallion", "mare", "colt"),
    "sheep": ("lamb", "ram", "ewe"),
    "cow": ("cattle", "bull", "calf", "ox", "oxen", "heifer"),
    "elephant": (),
    "bear": ("panda",),
    "zebra": (),
    "giraffe": (),
    "backpack": ("knapsack", "rucksack"),
    "umbrella": ("parasol",),
    "handbag": ("purse",),
    "tie": ("necktie", "bow tie"),
    "suitcase": ("suit case", "luggage"),
    "frisbee": (),
    "skis": ("ski",),
    "snowboard": (),
    "sports ball": ("ball", "football"),
    "kite": (),
    "baseball bat": (),
    "baseball glove": ("mitt",),
    "skateboard": (),
    "surfboard": ("longboard", "bodyboard"),
    "tennis racket": ("racket", "racquet"),
    "bottle": (),
    "wine glass": (),
    "cup": ("mug", "teacup"),
    "fork": (),
    "knife": ("knive",),
    "spoon": (),
    "bowl": (),
    "banana": (),
    "apple": (),
    "sandwich": ("sub", "burger", "hamburger", "cheeseburger"),
    "orange": (),
    "broccoli": (),
    "carrot": (),
    "hot dog": ("hotdog",),
    "pizza": (),
    "donut": ("doughnut",),
    "cake": ("cupcake", "cheesecake"),
    "chair": ("seat", "stool", "armchair"),
    "couch": ("sofa", "loveseat", "futon"),
    "potted plant": ("houseplant",),
    "bed": (),
    "dining table": ("table", "desk"),
    "toilet": ("urinal", "commode", "lavatory"),
    "tv": ("television", "monitor"),
    "laptop": ("computer", "notebook", "macbook", "laptop computer"),
    "mouse": (),
    "remote": (),
    "keyboard": (),
    "cell phone": ("mobile phone", "phone", "cellphone", "smartphone", "telephone"),
    "microwave": (),
    "oven": ("stove", "stovetop"),
    "toaster": (),
    "sink": (),
    "refrigerator": ("fridge", "freezer"),
    "book": (),
    "clock": (),
    "vase": (),
    "scissors": (),
    "teddy bear": ("teddybear",),
    "hair drier": ("hair dryer", "hairdryer"),
    "toothbrush": (),
}  # fmt: skip


@dataclass(frozen=True)
class SynonymTable:
    rows: tuple[tuple[str, ...], ...]  # per class: (class, entries...) exactly as read
    source: dict[str, Any]
    extra_merges: tuple[str, ...] = field(default=())  # two-word entries to merge beyond the reference list

    @property
    def entries(self) -> set[str]:
        return {entry for row in self.rows for entry in row}

    @property
    def inverse(self) -> dict[str, str]:
        """Entry -> class (a later row wins on a clash, as in the reference)."""
        return {entry: row[0] for row in self.rows for entry in row}

    @property
    def classes(self) -> list[str]:
        return [row[0] for row in self.rows]


def builtin_table() -> SynonymTable:
    rows = tuple((name, *words) for name, words in BUILTIN.items())
    merges = tuple(sorted({e for row in rows for e in row if e.count(" ") == 1}))
    return SynonymTable(
        rows, {"table": "built-in", "note": "mitigate's own table, not the CHAIR paper's"}, merges
    )


def load_table(path: Path | str | None) -> SynonymTable:
    """The table from ``--synonyms FILE`` (the reference format), or the built-in one for ``None``."""
    if path is None:
        return builtin_table()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--synonyms {path}: no such file")
    data = path.read_bytes()
    rows = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = tuple(line.strip().split(", "))  # the reference's parsing, leading-space entries included
        if not row[0]:
            raise ValueError(f"{path}:{number}: a line must start with the class name")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no synonym lines")
    source = {
        "table": "file",
        "path": str(path),
        "sha256": hashlib.sha256(data).hexdigest(),
        "classes": len(rows),
    }
    return SynonymTable(tuple(rows), source)
