"""POPE: parsers on tricky answers, metrics against hand-computed confusion matrices, question building,
official question files and scoring answers from elsewhere."""

import numpy as np
import pytest
from evals_fixtures import write_coco, write_lines

from mitigate.evals import pope
from mitigate.evals.coco import CocoData
from mitigate.evals.jsonl import JsonlError
from mitigate.evals.score import score_pope
from mitigate.evals.tasks import PopeTask

# answer -> (pope, opera, vcd on a yes-label, vcd on a no-label, strict)
TRICKY = {
    "No, there is not.": ("no", "no", "no", "no", None),
    "yes.": ("yes", "yes", "yes", "yes", "yes"),
    "Yes": ("yes", "yes", "yes", "yes", "yes"),
    "NO": ("yes", "no", "no", "no", "no"),  # LLaVA's parser is case sensitive: NO is not in its list
    "I don't see one": ("yes", "no", "no", "yes", None),  # only OPERA reads n't
    "Yes, but...": ("yes", "yes", "yes", "yes", None),  # VCD: no "no" substring on a no-label -> FP
    "": ("yes", "yes", "no", "yes", None),  # LLaVA/OPERA: empty is yes; VCD: wrong for either label
    "Yes. There is no cat.": ("yes", "no", "yes", "no", None),  # LLaVA reads the first sentence only
    "There is a snowboard.": ("yes", "yes", "no", "no", None),  # VCD: "no" inside "snowboard"
    "Not at all": ("yes", "yes", "no", "no", None),  # "Not" is not "not" for LLaVA and OPERA
    "no": ("no", "no", "no", "no", "no"),
    "No!": ("yes", "yes", "no", "no", "no"),  # "No!" is one word, not "No"
}


@pytest.mark.parametrize("answer", list(TRICKY))
def test_parsers_on_tricky_answers(answer):
    want_pope, want_opera, want_vcd_yes, want_vcd_no, want_strict = TRICKY[answer]
    assert pope.parse_pope(answer) == want_pope
    assert pope.parse_opera(answer) == want_opera
    assert pope.parse_vcd(answer, "yes") == want_vcd_yes
    assert pope.parse_vcd(answer, "no") == want_vcd_no
    assert pope.parse_strict(answer) == want_strict


def test_unknown_parser_and_split_are_clear_errors():
    with pytest.raises(ValueError, match="unknown POPE parser 'llava'; choose from pope, opera, vcd, strict"):
        pope.get_parser("llava")
    with pytest.raises(ValueError, match="unknown POPE split 'hard'"):
        pope.check_splits(["random", "hard"])
    with pytest.raises(ValueError, match="needs the question's label"):
        pope.parse_vcd("yes", None)


def _counts(pairs):
    return sum(pope.count_vector(label, pred) for label, pred in pairs)


def test_metrics_match_a_hand_computed_confusion_matrix():
    # TP=3, FN=1, FP=2, TN=4 -> 10 answers
    pairs = [("yes", "yes")] * 3 + [("yes", "no")] + [("no", "yes")] * 2 + [("no", "no")] * 4
    m = pope.metrics_from_counts(_counts(pairs))
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4))
    assert m["yes_ratio"] == pytest.approx(5 / 10)  # predicted yes, not labelled yes (which is 4/10)


def test_metrics_with_unreadable_answers_and_empty_classes():
    # strict parser: 2 unreadable answers (one per label) count wrong, and are not predicted yes
    pairs = [("yes", "yes"), ("yes", None), ("no", None), ("no", "no")]
    m = pope.metrics_from_counts(_counts(pairs))
    assert m["accuracy"] == pytest.approx(2 / 4)
    assert m["precision"] == pytest.approx(1.0)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["yes_ratio"] == pytest.approx(1 / 4)
    never_yes = pope.metrics_from_counts(_counts([("yes", "no"), ("no", "no")]))
    assert never_yes["precision"] == 0.0 and never_yes["f1"] == 0.0 and never_yes["accuracy"] == 0.5


def test_mean_f1_is_the_mean_over_splits_and_vectorises():
    a = _counts([("yes", "yes"), ("no", "no")])  # f1 = 1
    b = _counts([("yes", "no"), ("no", "yes")])  # f1 = 0
    summary = pope.summarize({"random": a, "popular": b})
    assert summary["mean_f1"] == pytest.approx(0.5)
    stacked = pope.summarize({"random": np.stack([a, b]), "popular": np.stack([b, b])})
    assert stacked["mean_f1"].tolist() == pytest.approx([0.5, 0.0])


OBJECTS = {
    1: ["person", "car", "dog"],
    2: ["person", "car", "dog"],
    3: ["person", "car", "chair"],
    4: ["person", "car", "chair"],
    5: ["person", "dog", "cup"],
    6: ["person", "umbrella", "bird"],
    7: ["dog", "cup"],  # 2 categories: never a POPE image
    8: ["bird", "bird", "bird", "cup"],  # 4 instances, 2 categories: excluded too
}
NAMES = {i: f"COCO_val2014_{i:012d}.jpg" for i in OBJECTS}


def _by_image(questions):
    out = {}
    for q in questions:
        out.setdefault(q.image, []).append(q)
    return out


def _built(tmp_path, seed):
    """The splits built from a fixture ``instances_val2014.json``, per split."""
    task = PopeTask(CocoData(write_coco(tmp_path, OBJECTS)), seed=seed)
    out = {}
    for q in task.docs():
        out.setdefault(q.split, []).append(q)
    return out


@pytest.mark.parametrize("split", pope.SPLITS)
def test_building_follows_the_sampling_rules(tmp_path, split):
    built = _built(tmp_path, seed=3)[split]
    per_image = _by_image(built)
    assert set(per_image) == {NAMES[i] for i in range(1, 7)}  # >= 3 distinct categories only
    assert [q.question_id for q in built] == list(range(1, len(built) + 1))
    for image, qs in per_image.items():
        objs = OBJECTS[int(image[13:25])]
        assert len(qs) == 6
        assert [q.label for q in qs] == ["yes", "no"] * 3
        assert [q.object for q in qs[::2]] == objs[:3]  # the first 3 objects, in order
        negatives = [q.object for q in qs[1::2]]
        assert not set(negatives) & set(objs)  # never present in the image
        assert len(set(negatives)) == 3  # never repeated for one image
        pool = {o for i in range(1, 7) for o in OBJECTS[i]}
        assert set(negatives) <= pool
    texts = {q.object: q.text for q in built}
    if "umbrella" in texts:
        assert texts["umbrella"] == "Is there an umbrella in the image?"


def test_popular_and_adversarial_negatives_by_hand(tmp_path):
    built = _built(tmp_path, seed=0)
    # Counts over the 6 sampled images: person 6, car 4, dog 3, chair 2, cup 1, umbrella 1, bird 1.
    popular = _by_image(built["popular"])
    assert [q.object for q in popular[NAMES[6]]] == ["person", "car", "umbrella", "dog", "bird", "chair"]
    assert [q.object for q in popular[NAMES[5]]][1::2][:2] == ["car", "chair"]
    # Co-occurring with person: car 4, dog 3, chair 2, then cup/umbrella/bird 1 each.
    adversarial = _by_image(built["adversarial"])
    assert [q.object for q in adversarial[NAMES[1]]][1] == "chair"  # car and dog are in the image
    assert [q.object for q in adversarial[NAMES[6]]][1] == "car"
    # Co-occurring with car: person 4, dog 2, chair 2 -> in image 1 (person, car, dog) chair is used
    # already, so the next in line is taken: nothing else co-occurs with car -> random fallback.
    second = [q.object for q in adversarial[NAMES[1]]][3]
    assert second not in {"person", "car", "dog", "chair"}


def test_building_is_seeded_and_uses_annotation_order(tmp_path):
    data = CocoData(
        write_coco(
            tmp_path,
            {
                1: ["dog", "person", "dog", "car"],
                2: ["cat", "cup", "bus"],
                3: ["bird", "boat", "clock", "chair"],
            },
        )
    )
    assert data.objects()[1] == ["dog", "person", "car"]
    task = PopeTask(data, seed=5)
    again = PopeTask(data, seed=5)
    assert [q.official() for q in task.docs()] == [q.official() for q in again.docs()]
    first = [q.object for q in task.docs() if q.split == "random" and q.image.endswith("000000000001.jpg")]
    assert first[::2] == ["dog", "person", "car"]
    cats = ["person", "car", "dog", "cat", "cup", "bus", "bird", "boat", "clock", "chair"]
    many = {i: [cats[i % 10], cats[(i + 1) % 10], cats[(i + 2) % 10]] for i in range(1, 40)}
    names = {i: f"{i}.jpg" for i in many}
    orders = {
        s: [q.image for q in pope.build_questions(many, names, seed=s, n_images=5)["random"]] for s in (0, 1)
    }
    assert orders[0] != orders[1]


def test_no_negative_left_is_a_clear_error():
    with pytest.raises(ValueError, match="no category left"):
        pope.build_questions({1: ["person", "car", "dog"]}, {1: "a.jpg"})


def _official(n):
    rows = []
    for k in range(n):
        obj = ["person", "car", "umbrella"][k % 3]
        rows.append(
            {
                "question_id": k + 1,
                "image": f"COCO_val2014_{k // 6:012d}.jpg",
                "text": pope.question_text(obj),
                "label": "yes" if k % 2 == 0 else "no",
            }
        )
    return rows


def test_official_files_both_versions_crlf(tmp_path):
    old = write_lines(tmp_path / "coco_pope_random.json", _official(12)[:-2])  # the 2910-style short file
    (tmp_path / "v2").mkdir()
    new = write_lines(tmp_path / "v2" / "coco_pope_popular.json", _official(12), crlf=True)
    a = pope.load_questions(old)
    b = pope.load_questions(new)
    assert (len(a), a[0].split, len(b), b[0].split) == (10, "random", 12, "popular")
    assert b[-1].label == "no" and b[-1].image == "COCO_val2014_000000000001.jpg"
    assert pope.file_digest(old)["questions"] == 10
    bad = tmp_path / "coco_pope_adversarial.json"
    bad.write_text('{"question_id": 1, "image": "x.jpg", "text": "t", "label": "yes"}\n{"question_id": 2,\n')
    with pytest.raises(JsonlError, match=r"coco_pope_adversarial\.json:2: not valid JSON"):
        pope.load_questions(bad)


def test_score_answers_from_several_splits(tmp_path):
    q_random = write_lines(tmp_path / "coco_pope_random.json", _official(4))
    q_popular = write_lines(tmp_path / "coco_pope_popular.json", _official(4))
    # labels: yes, no, yes, no in both files
    answers = [
        {"question_id": 1, "split": "random", "text": "Yes"},
        {"question_id": 2, "split": "random", "text": "No."},
        {"question_id": 3, "split": "random", "text": "No"},
        {"question_id": 4, "split": "random", "text": "Yes, there is."},
        {"question_id": 1, "category": "popular", "text": "yes"},
        {"question_id": 2, "category": "popular", "text": "no"},
        {"question_id": 3, "category": "popular", "text": "yes"},
        {"question_id": 4, "category": "popular", "text": "There is not."},
    ]
    a = write_lines(tmp_path / "answers.jsonl", answers)
    result, records = score_pope([q_random, q_popular], [a], "pope")
    m = result["metrics"]
    # random: TP 1, TN 1, FN 1, FP 1; popular: all right
    assert m["random"] == pytest.approx(
        {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5}
    )
    assert m["popular"]["f1"] == 1.0 and m["mean_f1"] == pytest.approx(0.75)
    assert result["counts"]["random"] == {
        "tp": 1,
        "fp": 1,
        "tn": 1,
        "fn": 1,
        "invalid_yes": 0,
        "invalid_no": 0,
    }
    assert len(records) == 8

    # One answer file per question file, in order, needs no split field.
    plain = [{"question_id": r["question_id"], "text": r["text"]} for r in answers]
    ra = write_lines(tmp_path / "ra.jsonl", plain[:4])
    pa = write_lines(tmp_path / "pa.jsonl", plain[4:])
    assert score_pope([q_random, q_popular], [ra, pa])[0]["metrics"] == m

    ambiguous = write_lines(tmp_path / "amb.jsonl", plain)
    with pytest.raises(JsonlError, match=r"amb\.jsonl:1: question_id 1 is in several question files"):
        score_pope([q_random, q_popular], [ambiguous])
    with pytest.raises(ValueError, match=r"4 question\(s\) have no answer, e\.g\. popular/1"):
        score_pope([q_random, q_popular], [write_lines(tmp_path / "half.jsonl", answers[:4])])
    twice = write_lines(tmp_path / "twice.jsonl", plain[:4] + plain[:1])
    with pytest.raises(JsonlError, match=r"twice\.jsonl:5: a second answer to question 1"):
        score_pope([q_random], [twice])
