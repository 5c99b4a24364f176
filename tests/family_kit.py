"""Test kit for the model families: each family's tiny built-in model, its prompts (chat template, images per
row, left padding), one row on its own, and greedy generation through ``model.generate`` (which builds each
family's positions, M-RoPE included, and per-token inputs itself: nothing here knows a family's inputs)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import kit
import torch

from mitigate.builtin import TINY, load_model, shapes_image

STEPS = 4
GENERATE = {
    "max_new_tokens": STEPS,
    "min_new_tokens": STEPS,  # eos is masked to -inf, so every row runs all steps
    "do_sample": False,
    "output_logits": True,
    "return_dict_in_generate": True,
}


@dataclass(frozen=True)
class Family:
    name: str  # the adapter's family name; the built-in model is builtin:tiny-<name>
    text_only_rows: bool = True  # can a batch row have no image (PaliGemma's processor refuses)
    needs: str | None = None  # a package the processor insists on


FAMILIES = [
    Family("llava"),
    Family("llava-next"),
    Family("llava-onevision"),
    Family("qwen2-vl"),
    Family("qwen2.5-vl"),
    Family("qwen3-vl"),
    Family("qwen3.5"),
    Family("gemma3"),
    Family("gemma4"),
    Family("internvl"),
    Family("smolvlm", needs="num2words"),
    Family("idefics3"),
    Family("paligemma", text_only_rows=False),
    Family("paligemma2", text_only_rows=False),
    Family("mistral3"),
]
BY_NAME = {f.name: f for f in FAMILIES}
assert {f"tiny-{f.name}" for f in FAMILIES} == set(TINY), "a family without a test entry, or the reverse"


@cache
def tiny(name: str):
    """``(model, processor)`` of ``builtin:tiny-<name>``, built once per test session."""
    return load_model(f"builtin:tiny-{name}")


def wide_image(seed: int = 1):
    """Not square, so tiling families cut it into several tiles."""
    return shapes_image(seed, size=64)[0].resize((72, 40))


def small_image(seed: int = 2):
    return shapes_image(seed, size=40)[0]


def chat(processor, prompt: str, images: int) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def encode(processor, rows: list[tuple[str, list]]) -> dict[str, torch.Tensor]:
    """A left-padded batch of ``(prompt, images)`` rows, images given per row, as the processor returns it
    (minus PaliGemma's training ``labels``)."""
    texts = [chat(processor, prompt, len(images)) for prompt, images in rows]
    kwargs = {"images": [list(images) for _, images in rows]} if any(images for _, images in rows) else {}
    batch = dict(processor(text=texts, return_tensors="pt", padding=True, **kwargs))
    batch.pop("labels", None)
    return batch


def rows_of(family: Family) -> list[tuple[str, list]]:
    """Two prompts of different lengths: a wide image, then a text-only row (or a small image where the
    family needs an image in every row)."""
    second = [] if family.text_only_rows else [small_image()]
    return [(kit.PROMPTS[0], [wide_image()]), (kit.PROMPTS[2], second)]


@torch.no_grad()
def generate(model, inputs: dict[str, torch.Tensor], steps: int = STEPS):
    return model.generate(**inputs, **{**GENERATE, "max_new_tokens": steps, "min_new_tokens": steps})


def logit_diff(a, b) -> float:
    """Largest difference of two generations' step logits; equal entries (-inf included) count as 0."""
    diffs = [torch.where(x == y, 0.0, (x - y).abs()).max() for x, y in zip(a.logits, b.logits, strict=True)]
    return float(torch.stack(diffs).max().nan_to_num(float("inf")))


def assert_rows_equal(batched, singles, atol: float = 1e-4) -> None:
    """Each row of a batched generation equals that prompt generated alone: tokens, -inf pattern, logits."""
    steps = len(batched.logits)
    for r, one in enumerate(singles):
        assert torch.equal(batched.sequences[r, -steps:], one.sequences[0, -steps:]), f"row {r} tokens"
        for step_b, step_1 in zip(batched.logits, one.logits, strict=True):
            finite = torch.isfinite(step_1[0])
            assert torch.equal(finite, torch.isfinite(step_b[r])), f"row {r}"
            assert (step_b[r][finite] - step_1[0][finite]).abs().max() <= atol, f"row {r}"
