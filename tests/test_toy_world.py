"""The toy world's scenes and builtin:shapes: co-occurrence bias, drawing, COCO format, POPE splits."""

from __future__ import annotations

import json
import random

import pytest

from mitigate.builtin import shapes, toy_world
from mitigate.evals import pope
from mitigate.evals.chair import Chair
from mitigate.evals.coco import CocoData, open_data
from mitigate.evals.synonyms import load_table


@pytest.fixture(scope="module")
def world_scenes() -> list[toy_world.Scene]:
    rng = random.Random(0)
    return [toy_world.sample_scene(rng) for _ in range(3000)]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return shapes.ensure_shapes(tmp_path_factory.mktemp("cache"))


def test_pairs_co_occur_strongly(world_scenes):
    for anchor, partner in toy_world.PAIRS:
        either = [s for s in world_scenes if anchor in s.names or partner in s.names]
        both = [s for s in either if anchor in s.names and partner in s.names]
        assert len(either) > 300
        assert len(both) / len(either) >= 0.85, (anchor, partner)
    # and the bias is not the whole story: each pair is sometimes incomplete
    assert any(toy_world.lone_members(s.names) for s in world_scenes)


def test_scenes_are_well_formed(world_scenes):
    assert len(toy_world.KINDS) >= 12 and len(set(toy_world.NAMES)) == len(toy_world.NAMES)
    counts = {len(s.objects) for s in world_scenes}
    assert counts == {1, 2, 3, 4}
    for scene in world_scenes[:500]:
        assert len(set(scene.names)) == len(scene.names)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= toy_world.SIZE and 0 <= y0 < y1 <= toy_world.SIZE
            if obj.hidden:  # only a member of a complete pair hides, behind its mate
                assert toy_world.PARTNER.get(obj.name) in scene.names
                mate = next(o for o in scene.objects if o.name == toy_world.PARTNER[obj.name])
                # its side is >= 9 px and it peeks out by <= 5 px per axis: >= (4/9)^2 of it is covered
                assert not mate.hidden and _overlap(obj.box, mate.box) >= (4 / 9) ** 2
    complete = [s for s in world_scenes if toy_world.complete_pairs(s.names)]
    with_hidden = [s for s in complete if any(o.hidden for o in s.objects)]
    assert 0.35 < len(with_hidden) / len(complete) < 0.75


def _overlap(box, other) -> float:
    """Share of ``box`` covered by ``other``."""
    w = min(box[2], other[2]) - max(box[0], other[0])
    h = min(box[3], other[3]) - max(box[1], other[1])
    return max(0, w) * max(0, h) / ((box[2] - box[0]) * (box[3] - box[1]))


def test_lone_members_are_forced():
    rng = random.Random(1)
    for member in ("car", "bird"):
        scene = toy_world.sample_scene(rng, lone=(member,))
        assert member in scene.names and toy_world.PARTNER[member] not in scene.names


def test_rendering_is_deterministic_and_draws_every_kind():
    scene = toy_world.sample_scene(random.Random(5))
    assert toy_world.render(scene).tobytes() == toy_world.render(scene).tobytes()
    assert toy_world.render(scene).size == (toy_world.SIZE, toy_world.SIZE)
    for kind in toy_world.KINDS:  # each icon draws something in its box
        placed = toy_world.Placed(kind.name, (10, 10, 40, 40), hidden=False)
        image = toy_world.render(toy_world.Scene((placed,), toy_world.BACKGROUND, 0))
        crop = image.crop((10, 10, 40, 40)).convert("L")
        low, high = crop.getextrema()
        assert high - low > 60, kind.name


def test_captions_and_questions():
    assert toy_world.caption(["bicycle", "car", "apple"]) == "There is an apple, a car and a bicycle."
    assert toy_world.caption(["cat"]) == "There is a cat."
    for name in toy_world.NAMES:
        assert toy_world.question(name) == pope.question_text(name)
    rng = random.Random(0)
    negatives = toy_world.negatives(["car", "cat"], rng, 3)
    assert negatives[0] == "bicycle" and not {"car", "cat"} & set(negatives)


def test_shapes_dataset_is_coco_and_deterministic(shapes_root, tmp_path):
    data = CocoData(shapes_root)
    objects = data.objects("val2014")
    assert len(objects) == shapes.NUM_IMAGES
    categories = {c["name"]: c["id"] for c in data.coco("instances").dataset["categories"]}
    assert categories == {k.name: k.coco_id for k in toy_world.KINDS}
    some_id = data.image_ids()[0]
    image = data.load_image(data.file_name(some_id))
    assert image.size == (toy_world.SIZE, toy_world.SIZE)
    captions = data.reference_captions()
    assert all(len(captions[i]) == 1 for i in objects)
    # CHAIR's ground truth (built-in synonym table) is exactly the drawn objects
    gt = Chair(load_table(None)).ground_truth(data, list(objects)[:40])
    assert all(gt[i] == set(objects[i]) for i in gt)
    # same seed, same files
    again = shapes.ensure_shapes(tmp_path)
    first = json.loads((shapes_root / "annotations" / "instances_val2014.json").read_text())
    second = json.loads((again / "annotations" / "instances_val2014.json").read_text())
    assert first == second


def test_shapes_pope_adversarial_asks_about_absent_partners(shapes_root):
    data = CocoData(shapes_root)
    objects = data.objects()
    names = {i: img["file_name"] for i, img in data.coco("instances").imgs.items()}
    by_file = {names[i]: set(o) for i, o in objects.items()}
    splits = pope.build_questions(objects, names)
    share = {}
    for split, questions in splits.items():
        assert len(questions) == 6 * shapes.NUM_POPE_IMAGES
        negatives = [q for q in questions if q.label == "no"]
        partner = [q for q in negatives if toy_world.PARTNER.get(q.object) in by_file[q.image]]
        share[split] = len(partner) / len(negatives)
    assert share["adversarial"] > 0.35 and share["adversarial"] > 2 * share["random"]


def test_open_data_resolves_builtin_shapes(monkeypatch, tmp_path):
    monkeypatch.setenv("MITIGATE_CACHE", str(tmp_path))
    data = open_data("builtin:shapes", None)
    assert data.label == "builtin:shapes" and data.root.parent == tmp_path
