"""The toy model's training loop on a tiny config: packing is exact, a few steps run, are deterministic, and
the saved folder loads back as builtin:toy-llava."""

from __future__ import annotations

import random

import pytest
import torch

from mitigate.builtin import toy_model, toy_train, toy_world
from mitigate.loading import chat_prompt

TINY = {"text_hidden": 32, "text_layers": 2, "text_heads": 2, "vision_hidden": 32, "vision_layers": 2}


def test_image_tasks_are_balanced_and_right():
    rng = random.Random(0)
    names = ["car", "cat", "apple", "dog"]
    tasks = toy_train.image_tasks(names, rng)
    assert tasks[0][0] in toy_train.CAPTION_PROMPTS and tasks[0][1] == toy_world.caption(names)
    answers = {}
    for prompt, answer in tasks[1:]:
        assert prompt.endswith(toy_train.SUFFIX)
        name = prompt.split()[3]
        answers[name] = answer
    assert list(answers.values()).count("Yes") == list(answers.values()).count("No") == 3
    assert all((answers[n] == "Yes") == (n in names) for n in answers)
    assert answers.get("bicycle") == "No"  # the absent partner of a present anchor is always asked


def test_packed_row_equals_one_prompt_per_task():
    """The block mask and positions make each task see exactly what it sees alone at evaluation."""
    processor = toy_model.build_processor()
    model = toy_model.new_model(0, **TINY).eval()
    rng = random.Random(3)
    scene = toy_world.sample_scene(rng)
    image = toy_world.jpeg_roundtrip(toy_world.render(scene))
    tasks = toy_train.image_tasks(scene.names, rng)[:3]
    row = toy_train.Packer(processor).row(tasks)
    batch = toy_train.collate([row])
    batch.pop("labels")
    batch["pixel_values"] = processor.image_processor([image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        packed = model(**batch).logits[0]
        segment = torch.tensor(row[3])
        prefix = int((segment == 0).sum())
        for index, (prompt, answer) in enumerate(tasks, start=1):
            text = chat_prompt(processor, prompt) + f" {answer}</s>"
            alone = processor(images=[image], text=[text], return_tensors="pt")
            logits = model(**alone).logits[0]
            where = torch.cat([torch.arange(prefix), (segment == index).nonzero()[:, 0]])
            assert torch.equal(alone["input_ids"][0], batch["input_ids"][0, where])
            torch.testing.assert_close(logits, packed[where], atol=1e-5, rtol=1e-5)


def test_a_few_steps_train_deterministically_and_save(tmp_path):
    cfg = toy_train.TrainConfig(steps=2, batch_size=2, warmup=1, log_every=1, sizes=TINY)
    model, processor, summary = toy_train.train(cfg, log=lambda line: None)
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)
    _, _, again = toy_train.train(cfg, log=lambda line: None)
    assert [h["loss"] for h in again["history"]] == losses

    toy_train.save(model, processor, tmp_path, cfg, summary)
    loaded, loaded_processor = toy_model.load_folder(tmp_path)
    assert loaded.config._name_or_path == toy_model.NAME
    assert loaded_processor.tokenizer.padding_side == "left"
    for name, param in model.state_dict().items():
        assert torch.equal(param, loaded.state_dict()[name]), name
    assert (tmp_path / "toy_training.json").is_file()


def test_probe_reports_rates():
    processor = toy_model.build_processor()
    model = toy_model.new_model(0, **TINY).eval()
    out = toy_train.probe(model, processor, scenes=4, captions=2)
    assert set(out) == {
        "yes_rate_present",
        "yes_rate_absent_random",
        "yes_rate_absent_partner",
        "caption_hallucinated",
        "caption_recall",
    }
    assert all(0 <= v <= 1 for v in out.values())


def test_unknown_words_are_refused():
    packer = toy_train.Packer(toy_model.build_processor())
    with pytest.raises(ValueError, match="outside the toy vocabulary"):
        packer.row([("Is there a giraffe in the image?", "No")])
