"""CHAIR: offline tokenising and singularising, mentions with synonyms, merges and special cases, ground
truth from instances plus reference captions, and the metrics, all counted by hand."""

import pytest
from evals_fixtures import write_coco

from mitigate.evals import chair as chair_mod
from mitigate.evals.coco import CocoData, CocoSetupError
from mitigate.evals.score import score_chair
from mitigate.evals.synonyms import BUILTIN, builtin_table, load_table
from mitigate.evals.tasks import ChairTask, read_image_ids
from mitigate.evals.words import singularize, tokenize

# A table in the reference file's format, with its quirk: ",  motor bike" keeps a leading space.
REFERENCE_STYLE = """person, girl, boy, man, woman, people, baby, adult
motorcycle, scooter,  motor bike, motorbike
airplane, plane, jet, airbus
bus, minibus
car, automobile
truck, pickup
hot dog
teddy bear
dog, puppy, collie
cat, kitten
couch, sofa
toilet
chair, seat, stool
elephant
zebra
dining table, table
wine glass
"""


def test_nlp_needs_no_downloaded_data(monkeypatch):
    import nltk.data

    def refuse(*args, **kwargs):
        raise AssertionError("NLTK data was requested")

    monkeypatch.setattr(nltk.data, "load", refuse)
    monkeypatch.setattr(nltk.data, "find", refuse)
    assert tokenize("a man's dog, near the shop. two cats") == [
        "a", "man", "'s", "dog", ",", "near", "the", "shop", ".", "two", "cats",
    ]  # fmt: skip
    singularize.cache_clear()
    # pattern's quirks that CHAIR numbers depend on, and the four plurals where textblob is corrected
    words = ["people", "bus", "buses", "glass", "glasses", "ties", "scissors", "skis", "knives", "mice",
             "airbuses", "minibuses", "collies", "doggies"]  # fmt: skip
    assert [singularize(w) for w in words] == [
        "person", "bu", "bus", "glas", "glass", "ty", "scissors", "ski", "knife", "mouse",
        "airbus", "minibus", "collies", "doggies",
    ]  # fmt: skip


def test_builtin_table_is_the_80_coco_classes_without_clashes():
    table = builtin_table()
    assert len(table.rows) == 80
    assert table.classes[:3] == ["person", "bicycle", "car"] and "hair drier" in table.classes
    entries = [e for row in table.rows for e in set(row)]
    assert len(entries) == len(set(entries)), "an entry names two classes"
    assert table.source["table"] == "built-in"
    assert all(w == w.lower() for words in BUILTIN.values() for w in words)


def test_reference_file_format_is_read_as_the_reference_reads_it(tmp_path):
    path = tmp_path / "synonyms.txt"
    path.write_text(REFERENCE_STYLE)
    table = load_table(path)
    assert " motor bike" in table.entries and "motor bike" not in table.entries
    assert table.inverse["puppy"] == "dog" and table.source["classes"] == 17
    assert len(table.source["sha256"]) == 64
    with pytest.raises(FileNotFoundError, match="--synonyms"):
        load_table(tmp_path / "missing.txt")


@pytest.mark.parametrize(
    ("caption", "builtin", "reference"),
    [
        # two-word objects merge; "motor bike" only counts where the table really has it
        ("A man riding a motor bike next to two hot dogs and a teddy bear.",
         ["person", "motorcycle", "hot dog", "teddy bear"], ["person", "hot dog", "teddy bear"]),
        ("A man on a motorbike.", ["person", "motorcycle"], ["person", "motorcycle"]),
        # baby/adult X is the animal, not a person; toilet seat is a toilet
        ("A baby elephant and an adult zebra near a toilet seat.", ["elephant", "zebra", "toilet"],
         ["elephant", "zebra", "toilet"]),
        ("There is a toilet and a seat.", ["toilet"], ["toilet"]),  # seat dropped when a toilet is there
        ("A seat.", ["chair"], ["chair"]),
        ("A bus and two buses.", ["bus"], ["bus"]),  # pattern: bus -> "bu", buses -> bus
        ("People at a dining table with wine glasses.", ["person", "dining table", "wine glass"],
         ["person", "dining table", "wine glass"]),
        ("A man with a dog and a cat on a sofa. The dog is happy.",
         ["person", "dog", "cat", "couch", "dog"], ["person", "dog", "cat", "couch", "dog"]),  # repeats count
        ("a baby teddy bear", ["person", "teddy bear"], ["person", "teddy bear"]),
        ("two airbuses and three collies", ["airplane"], ["airplane"]),  # pattern keeps "collies"
        ("a passenger jet over a train track", ["airplane"], ["airplane"]),  # train track is no train
        ("", [], []),
    ],
)  # fmt: skip
def test_mentions_by_hand(tmp_path, caption, builtin, reference):
    path = tmp_path / "synonyms.txt"
    path.write_text(REFERENCE_STYLE)
    assert chair_mod.Chair(builtin_table()).caption_words(caption).nodes == builtin
    assert chair_mod.Chair(load_table(path)).caption_words(caption).nodes == reference


def _fixture(tmp_path):
    objects = {1: ["person", "dog", "person"], 2: ["car", "truck"], 3: []}
    captions = {
        1: ["A man and his puppy on a couch.", "Someone relaxing at home."],
        2: ["A red car parked on the street."],
        3: ["An empty street with a bus."],  # "bus" -> "bu": the reference adds nothing here
    }
    return CocoData(write_coco(tmp_path, objects, captions))


GENERATED = {
    1: "A man with a dog and a cat on a sofa. The dog is happy.",  # cat hallucinated; 17 tokens
    2: "A car.",  # 3 tokens; misses the truck
    3: "Two buses and a kitten.",  # both hallucinated; 6 tokens
}


def test_ground_truth_is_instances_plus_reference_captions(tmp_path):
    gt = chair_mod.Chair(builtin_table()).ground_truth(_fixture(tmp_path), [1, 2, 3])
    assert gt == {1: {"person", "dog", "couch"}, 2: {"car", "truck"}, 3: set()}


def test_chair_metrics_by_hand(tmp_path):
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(f'{{"image_id": {i}, "caption": "{c}"}}\n' for i, c in GENERATED.items()))
    result, records = score_chair(captions, _fixture(tmp_path / "coco"))
    assert [r["hallucinated"] for r in records] == [[["cat", "cat"]], [], [["bus", "bus"], ["kitten", "cat"]]]
    assert records[0]["recalled"] == ["couch", "dog", "person"]
    m = result["metrics"]
    assert m["chair_s"] == pytest.approx(2 / 3)  # captions 1 and 3
    assert m["chair_i"] == pytest.approx(3 / 8)  # mentions: 5 + 1 + 2
    assert m["recall"] == pytest.approx((3 + 1 + 0) / (3 + 2 + 0))
    assert m["length"] == pytest.approx((17 + 3 + 6) / 3)
    assert result["task_info"]["synonyms"]["table"] == "built-in"


def test_unknown_ids_and_categories_are_setup_errors(tmp_path):
    data = _fixture(tmp_path)
    with pytest.raises(CocoSetupError, match=r"not in .*instances_val2014\.json.*train2014.*absent.*\[99\]"):
        chair_mod.Chair(builtin_table()).ground_truth(data, [1, 99])
    path = tmp_path / "small.txt"
    path.write_text("person, man\n")
    with pytest.raises(CocoSetupError, match=r"category 'dog' .* is not in the synonym table"):
        chair_mod.Chair(load_table(path)).ground_truth(data, [1])


def test_image_selection_is_seeded_and_lists_are_read(tmp_path):
    ids = list(range(1000, 1100))
    draw = chair_mod.seeded_image_ids(ids, 10, seed=0)
    assert draw == chair_mod.seeded_image_ids(list(reversed(ids)), 10, seed=0)  # order of input is irrelevant
    assert draw != chair_mod.seeded_image_ids(ids, 10, seed=1) and len(set(draw)) == 10
    (tmp_path / "ids.txt").write_text("5 3\n5, 9\n")
    (tmp_path / "ids.json").write_text("[7, 8]")
    (tmp_path / "ids.jsonl").write_text('{"image_id": 4, "caption": "x"}\n{"image_id": 2, "caption": "y"}\n')
    assert read_image_ids(tmp_path / "ids.txt") == [5, 3, 9]
    assert read_image_ids(tmp_path / "ids.json") == [7, 8]
    assert read_image_ids(tmp_path / "ids.jsonl") == [4, 2]
    task = ChairTask(_fixture(tmp_path / "coco"), image_ids=tmp_path / "ids.json", limit=1)
    assert task.docs() == [7]
