"""Tiny COCO-format fixtures for the evaluation tests, written into a test's tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from mitigate.evals.synonyms import BUILTIN

CATEGORY_IDS = {name: i + 1 for i, name in enumerate(BUILTIN)}


def file_name(image_id: int, split: str = "val2014") -> str:
    return f"COCO_{split}_{image_id:012d}.jpg"


def write_coco(
    root: Path,
    objects: dict[int, list[str]],
    captions: dict[int, list[str]] | None = None,
    *,
    split: str = "val2014",
    images: bool = False,
) -> Path:
    """``objects``: per image, the category of each instance annotation, in file order."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    imgs = [{"id": i, "file_name": file_name(i, split), "width": 32, "height": 32} for i in objects]
    anns = []
    for image_id, names in objects.items():
        for name in names:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[name],
                    "bbox": [0, 0, 8, 8],
                    "area": 64.0,
                    "iscrowd": 0,
                    "segmentation": [[0, 0, 8, 0, 8, 8, 0, 8]],
                }
            )
    used = sorted({n for names in objects.values() for n in names}, key=CATEGORY_IDS.get)
    cats = [{"id": CATEGORY_IDS[n], "name": n, "supercategory": "thing"} for n in used]
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": imgs, "annotations": anns, "categories": cats})
    )
    caps = [
        {"id": k, "image_id": i, "caption": c}
        for k, (i, c) in enumerate(((i, c) for i, cs in (captions or {}).items() for c in cs), start=1)
    ]
    (root / "annotations" / f"captions_{split}.json").write_text(
        json.dumps({"images": imgs, "annotations": caps})
    )
    if images:
        (root / split).mkdir(exist_ok=True)
        for image_id in objects:
            Image.new("RGB", (32, 32), (image_id * 37 % 255, 90, 160)).save(
                root / split / file_name(image_id, split)
            )
    return root


def write_lines(path: Path, records: list[dict], crlf: bool = False) -> Path:
    end = "\r\n" if crlf else "\n"
    path.write_text("".join(json.dumps(r) + end for r in records), newline="")
    return path


def pope_record(sample_id: str, label: str, pred: str | None) -> dict:
    """A POPE run's per-sample record (``samples.jsonl``), as ``mitigate eval pope`` writes it."""
    split, _, number = sample_id.partition("/")
    return {"sample_id": sample_id, "split": split, "question_id": int(number), "image": f"{number}.jpg",
            "question": f"Is there a thing {number} in the image?", "label": label,
            "text": str(pred), "pred": pred}  # fmt: skip


def write_run_folder(
    folder: Path,
    records: list[dict],
    *,
    label: str = "vanilla",
    task: str = "pope",
    task_info: dict | None = None,
    model: str = "hand-written",
) -> Path:
    """A finished run folder written by hand (``results.json`` and ``samples.jsonl``, what ``report`` and
    ``compare`` read), its metrics computed from ``records`` by the task itself."""
    from mitigate.evals.results import write_run
    from mitigate.evals.tasks import task_class

    vanilla = label == "vanilla"
    results = {
        "task": task,
        "model": {"model": model, "dtype": None, "attn_implementation": None},
        "method": {
            "spec": label,
            "label": label,
            "sets": {},
            "resolved": {} if vanilla else {label: {}},
            "presets": {},
            "kernel": None,
        },
        "generation": {"max_new_tokens": 16},
        "run_key": f"hand-written-{label}",
        "task_info": task_info if task_info is not None else {"parser": "pope"},
        "n_samples": len(records),
        "n_scored": len(records),
        "n_errors": 0,
        "errors": [],
        "metrics": task_class(task).aggregate(records) if records else {},
    }
    write_run(Path(folder), results, records)
    return Path(folder)
