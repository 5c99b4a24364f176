"""Train ``builtin:toy-llava`` on the toy world: ``python -m mitigate.builtin.toy_train --out DIR --seed 0``.

Every image is a fresh scene from a seeded stream (:mod:`.toy_world`), seen once. Per image the model is
taught, with the exact prompts the evaluation uses, to caption it ("Please describe this image in
detail." -> "There is a car, a bicycle and a cat.") and to answer "Is there a {object} in the image?"
with POPE's suffix: yes for every object present, no for as many absent ones, absent partners of present
objects first. Only answer tokens (and the closing ``</s>``) carry loss.

To save compute the tasks of one image share one row: the prefix ``<s> USER: <image>`` is computed once and
each task's tokens attend to it and, causally, to themselves only, with positions that continue after the
prefix. A block mask makes this the same computation as one prompt per task.

Deterministic from ``--seed`` on a given machine and torch build: seeded scenes, ``torch.manual_seed``, a
fixed thread count. The defaults are the recipe of the shipped model.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from . import toy_model, toy_world
from .toy_world import WorldConfig

SUFFIX = "\nAnswer the question using a single word or phrase."  # = mitigate.evals.pope.PROMPT_SUFFIX
MEMBERS = [m for pair in toy_world.PAIRS for m in pair]
CAPTION_PROMPTS = ("Please describe this image in detail.", "Describe this image in detail.")


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 2000
    batch_size: int = 16  # images per step (each with several tasks)
    lr: float = 1.5e-3
    warmup: int = 150
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    threads: int = 2
    device: str = "cpu"  # the shipped model is trained on the CPU; other devices are not bit-reproducible
    log_every: int = 50
    sizes: dict[str, int] = field(default_factory=dict)  # build_config overrides (tests use a tiny model)
    world: WorldConfig = field(default_factory=WorldConfig)


# -- examples ---------------------------------------------------------------------------------------------
def image_tasks(names: list[str], rng: random.Random, max_each: int = 3) -> list[tuple[str, str]]:
    """``(user prompt, answer)`` pairs for one image: a caption, then balanced yes/no questions (at most
    ``max_each`` of each: the questions are most of a row's tokens)."""
    tasks = [(rng.choice(CAPTION_PROMPTS), toy_world.caption(names))]
    count = min(len(names), max_each)
    asked = [(n, "Yes") for n in rng.sample(names, count)]
    asked += [(n, "No") for n in toy_world.negatives(names, rng, count)]
    rng.shuffle(asked)
    tasks += [(toy_world.question(n) + SUFFIX, answer) for n, answer in asked]
    return tasks


class Packer:
    """Token ids of prompts (cached: there are few distinct ones) and packing of an image's tasks in a row."""

    def __init__(self, processor: Any):
        from ..loading import chat_prompt

        self.tokenizer = processor.tokenizer
        self._chat_prompt = lambda text: chat_prompt(processor, text)
        self._cache: dict[str, list[int]] = {}
        ids = self.tokenizer(self._chat_prompt("x"))["input_ids"]
        cut = ids.index(toy_model.IMAGE_ID)
        self.prefix = ids[:cut] + [toy_model.IMAGE_ID] * toy_model.IMAGE_TOKENS

    def _ids(self, text: str, prompt: bool) -> list[int]:
        key = ("P" if prompt else "A") + text
        if key not in self._cache:
            if prompt:
                ids = self.tokenizer(self._chat_prompt(text))["input_ids"]
                ids = ids[ids.index(toy_model.IMAGE_ID) + 1 :]  # the part after the image
            else:
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if toy_model.UNK in ids:
                raise ValueError(f"{text!r} has words outside the toy vocabulary")
            self._cache[key] = ids
        return self._cache[key]

    def row(self, tasks: list[tuple[str, str]]) -> tuple[list[int], list[int], list[int], list[int]]:
        """``(ids, labels, positions, segment)`` of one packed row (segment 0 = shared prefix)."""
        ids, labels = list(self.prefix), [-100] * len(self.prefix)
        positions, segment = list(range(len(self.prefix))), [0] * len(self.prefix)
        for index, (prompt, answer) in enumerate(tasks, start=1):
            question = self._ids(prompt, True)
            reply = [*self._ids(answer, False), toy_model.EOS]
            ids += question + reply
            labels += [-100] * len(question) + reply
            positions += range(len(self.prefix), len(self.prefix) + len(question) + len(reply))
            segment += [index] * (len(question) + len(reply))
        return ids, labels, positions, segment


def collate(rows: list[tuple[list[int], list[int], list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Right-padded tensors and the ``[B, 1, T, T]`` block mask (True = may attend)."""
    length = max(len(r[0]) for r in rows)
    out = {
        "input_ids": torch.full((len(rows), length), toy_model.PAD),
        "labels": torch.full((len(rows), length), -100),
        "position_ids": torch.zeros((len(rows), length), dtype=torch.long),
    }
    segment = torch.full((len(rows), length), -1)  # padding: its own segment, ignored by the loss
    for i, (ids, labels, positions, seg) in enumerate(rows):
        n = len(ids)
        out["input_ids"][i, :n] = torch.tensor(ids)
        out["labels"][i, :n] = torch.tensor(labels)
        out["position_ids"][i, :n] = torch.tensor(positions)
        segment[i, :n] = torch.tensor(seg)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = (segment[:, :, None] == segment[:, None, :]) | (segment[:, None, :] == 0)
    out["attention_mask"] = (causal & same)[:, None]
    return out


class Stream:
    """The seeded stream of training batches: scenes, images, tasks."""

    def __init__(self, processor: Any, seed: int, world: WorldConfig):
        self.rng = random.Random(f"toy-train:{seed}")
        self.world = world
        self.packer = Packer(processor)
        self.image_processor = processor.image_processor

    def batch(self, size: int) -> dict[str, torch.Tensor]:
        scenes = [toy_world.sample_scene(self.rng, self.world) for _ in range(size)]
        images = [toy_world.jpeg_roundtrip(toy_world.render(s, self.world)) for s in scenes]
        rows = [self.packer.row(image_tasks(s.names, self.rng)) for s in scenes]
        out = collate(rows)
        out["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
        return out


# -- a quick probe (teacher-forced yes/no; the real metrics come from `mitigate eval`) ---------------------
@torch.no_grad()
def probe(
    model: Any, processor: Any, *, scenes: int = 200, captions: int | None = None, seed: int = 12345
) -> dict[str, float]:
    """Yes-rates on fresh scenes, from the yes/no logits at the answer position: on present objects, on
    random absent ones, and on the absent partner of a lone pair member (every other scene has one)."""
    rng = random.Random(f"toy-probe:{seed}")
    packer = Packer(processor)
    yes, no = packer._ids("Yes", False)[0], packer._ids("No", False)[0]
    counts = {"present": [0, 0], "absent_random": [0, 0], "absent_partner": [0, 0]}
    for start in range(0, scenes, 16):
        batch_scenes, kinds, rows = [], [], []
        for i in range(start, min(scenes, start + 16)):
            lone = (MEMBERS[i // 2 % len(MEMBERS)],) if i % 2 else ()
            scene = toy_world.sample_scene(rng, lone=lone)
            names = scene.names
            partners = {toy_world.PARTNER[n] for n in toy_world.lone_members(names)}
            absent = [n for n in toy_world.NAMES if n not in names and n not in partners]
            asked = [(n, "present") for n in names] + [(rng.choice(absent), "absent_random")]
            asked += [(n, "absent_partner") for n in sorted(partners)]
            batch_scenes.append(scene)
            kinds.append([k for _, k in asked])
            rows.append(packer.row([(toy_world.question(n) + SUFFIX, "Yes") for n, _ in asked]))
        inputs = collate(rows)
        images = [toy_world.jpeg_roundtrip(toy_world.render(s)) for s in batch_scenes]
        inputs["pixel_values"] = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        for b, row_kinds in enumerate(kinds):
            # the answer token of each task: the first labelled position of each segment
            answer_positions = [t for t in range(1, labels.shape[1]) if labels[b, t] == yes]
            for kind, t in zip(row_kinds, answer_positions, strict=True):
                counts[kind][0] += int(logits[b, t - 1, yes] > logits[b, t - 1, no])
                counts[kind][1] += 1
    out = {f"yes_rate_{k}": round(c[0] / max(1, c[1]), 4) for k, c in counts.items()}
    captions = max(16, scenes // 4) if captions is None else captions
    return out | caption_probe(model, processor, scenes=captions, seed=seed)


@torch.no_grad()
def caption_probe(model: Any, processor: Any, *, scenes: int = 64, seed: int = 12345) -> dict[str, float]:
    """Greedy captions of fresh scenes (every other one with a lone pair member): the share of object
    mentions that are not in the image (CHAIR_i without synonyms) and the share of objects mentioned."""
    from ..loading import chat_prompt

    rng = random.Random(f"toy-caption-probe:{seed}")
    mentions = wrong = found = total = 0
    prompt = chat_prompt(processor, CAPTION_PROMPTS[0])
    for start in range(0, scenes, 16):
        batch = [
            toy_world.sample_scene(rng, lone=(MEMBERS[i // 2 % len(MEMBERS)],) if i % 2 else ())
            for i in range(start, min(scenes, start + 16))
        ]
        images = [toy_world.jpeg_roundtrip(toy_world.render(s)) for s in batch]
        inputs = processor(images=images, text=[prompt] * len(batch), return_tensors="pt", padding=True)
        ids = model.generate(**inputs, max_new_tokens=40, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        for scene, text in zip(
            batch, processor.tokenizer.batch_decode(ids, skip_special_tokens=True), strict=True
        ):
            said = [w for w in text.split() if w in toy_world.BY_NAME]
            mentions += len(said)
            wrong += sum(1 for w in said if w not in scene.names)
            found += len(set(said) & set(scene.names))
            total += len(scene.names)
    return {
        "caption_hallucinated": round(wrong / max(1, mentions), 4),
        "caption_recall": round(found / total, 4),
    }


# -- training ---------------------------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    done = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done)))


def optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def train(cfg: TrainConfig, *, log=print, checkpoint=None) -> tuple[Any, Any, dict[str, Any]]:
    """Train a model from scratch; returns ``(model, processor, log summary)``."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    processor = toy_model.build_processor()
    model = toy_model.new_model(cfg.seed, **cfg.sizes).to(cfg.device)
    model.train()
    opt = optimizer(model, cfg)
    stream = Stream(processor, cfg.seed, cfg.world)
    started, losses, history = time.time(), [], []
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = {k: v.to(cfg.device) for k, v in stream.batch(cfg.batch_size).items()}
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            mean = sum(losses[-cfg.log_every :]) / len(losses[-cfg.log_every :])
            elapsed = time.time() - started
            history.append({"step": step + 1, "loss": round(mean, 4), "seconds": round(elapsed, 1)})
            log(f"step {step + 1}/{cfg.steps}  loss {mean:.4f}  lr {lr_at(step, cfg):.2e}  {elapsed:.0f}s")
        if checkpoint is not None:
            checkpoint(step + 1, model, processor)
    model = model.cpu().eval()
    summary = {
        "final_loss": history[-1]["loss"] if history else None,
        "seconds": round(time.time() - started, 1),
        "history": history,
    }
    return model, processor, summary


def save(model: Any, processor: Any, out: Path, cfg: TrainConfig, summary: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    toy_model.finish(model)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    record = {
        "recipe": {**asdict(cfg), "world": asdict(cfg.world)},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        **summary,
    }
    (out / "toy_training.json").write_text(json.dumps(record, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model into")
    defaults = TrainConfig()
    for name in ("seed", "steps", "batch_size", "warmup", "threads", "log_every"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--probe", type=int, default=0, help="after training, probe on N fresh scenes")
    parser.add_argument("--save-every", type=int, default=0, help="also save DIR/step-N every N steps")
    parser.add_argument("--sizes", type=json.loads, default={}, help='JSON, e.g. {"text_layers": 2}')
    parser.add_argument("--world", type=json.loads, default={}, help="JSON overrides of WorldConfig")
    args = parser.parse_args(argv)
    world = WorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.world.items()})
    cfg = TrainConfig(
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        threads=args.threads,
        log_every=args.log_every,
        device=args.device,
        sizes=args.sizes,
        world=world,
    )

    def checkpoint(step: int, model: Any, processor: Any) -> None:
        if args.save_every and step % args.save_every == 0 and step < cfg.steps:
            model.save_pretrained(args.out / f"step-{step}")
            processor.save_pretrained(args.out / f"step-{step}")

    model, processor, summary = train(cfg, log=lambda line: print(line, flush=True), checkpoint=checkpoint)
    if args.probe:
        summary["probe"] = probe(model, processor, scenes=args.probe)
        print("probe:", summary["probe"], flush=True)
    save(model, processor, args.out, cfg, summary)
    print(f"saved to {args.out} ({summary['seconds']:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
