"""Test kit: tiny offline models, batches, greedy logit traces, and hidden-state probes.

Nothing here downloads anything. Models come from :mod:`mitigate.builtin.tiny_llava` (random, built from
configs with a word-level tokenizer); images are drawn with PIL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from mitigate.builtin import shapes_image
from mitigate.builtin.tiny_llava import build_model, build_processor

PROMPTS = [
    "Is there a red circle in the image?",
    "Describe this image in detail.",
    "What color is the square on the left of the picture?",
    "How many objects are there?",
]


def tiny(seed: int = 0, **config_kwargs):
    return build_model(seed, **config_kwargs), build_processor()


def image(seed: int = 0) -> Image.Image:
    return shapes_image(seed=seed, count=2)[0]


def chat(processor, prompt: str, with_image: bool = True) -> str:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def batch(processor, prompts: list[str], images: list[Image.Image | None]) -> dict[str, torch.Tensor]:
    """A left-padded batch; a ``None`` image makes a text-only row."""
    texts = [chat(processor, p, img is not None) for p, img in zip(prompts, images, strict=True)]
    imgs = [img for img in images if img is not None]
    return dict(processor(images=imgs or None, text=texts, return_tensors="pt", padding=True))


@dataclass
class Trace:
    prefill: torch.Tensor  # [B, T, V] logits at every prompt position
    steps: list[torch.Tensor]  # [B, V] logits at each greedy decode step
    tokens: torch.Tensor  # [B, steps] the greedy tokens fed back


@torch.no_grad()
def greedy_trace(model, inputs: dict[str, torch.Tensor], steps: int = 5) -> Trace:
    """Prefill, then ``steps`` greedy decode steps with a cache (positions from the mask, as generate)."""
    mask = inputs["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    out = model(**inputs, position_ids=positions, use_cache=True)
    prefill = out.logits.float()
    cache = out.cache
    token = prefill[:, -1].argmax(-1)
    logits, tokens = [], []
    last = positions[:, -1:]
    for _ in range(steps):
        tokens.append(token)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        last = last + 1
        out = model(
            input_ids=token[:, None], attention_mask=mask, position_ids=last, cache=cache, use_cache=True
        )
        cache = out.cache
        step = out.logits[:, -1].float()
        logits.append(step)
        token = step.argmax(-1)
    return Trace(prefill=prefill, steps=logits, tokens=torch.stack(tokens, dim=1))


def max_diff(a: Trace, b: Trace, valid: torch.Tensor | None = None) -> float:
    """Largest absolute logit difference over the prompt (valid positions) and every decode step."""
    pre = (a.prefill - b.prefill).abs()
    if valid is not None:
        pre = pre * valid[..., None]
    diffs = [pre.max()] + [(x - y).abs().max() for x, y in zip(a.steps, b.steps, strict=True)]
    return float(torch.stack(diffs).max())


def row_inputs(inputs: dict[str, torch.Tensor], row: int, processor) -> dict[str, torch.Tensor]:
    """Row ``row`` of a left-padded batch on its own, padding stripped: per-token inputs (``[B, T]``, e.g.
    ``token_type_ids``) cut by the mask, per-image ones (``pixel_values``, ``image_sizes``) picked by image
    order. For LLaVA's processors (one pixel tensor per image); tests/family_kit.py encodes each row of
    the other families again instead."""
    mask = inputs["attention_mask"][row].bool()
    ids = inputs["input_ids"]
    out = {
        key: value[row][mask][None]
        for key, value in inputs.items()
        if torch.is_tensor(value) and value.shape == ids.shape and key != "attention_mask"
    }
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    has_image = (ids == image_id).any(dim=1)
    if has_image[row]:
        index = int(has_image[:row].sum())
        for key in ("pixel_values", "image_sizes"):
            if key in inputs:
                out[key] = inputs[key][index : index + 1]
    return out


GENERATE = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}


def check_batched_equals_single(model, batch, spec, processor, steps: int = 4) -> None:
    """Mitigated generation on a left-padded batch changes the logits, equals each row generated alone
    (same tokens, same -inf pattern, logits within 1e-4), and leaves nothing behind when it ends."""
    from mitigate import mitigated

    settings = {**GENERATE, "max_new_tokens": steps}
    vanilla = model.generate(**batch, **settings)
    rows = batch["input_ids"].shape[0]
    with mitigated(model, spec, processor=processor):
        batched = model.generate(**batch, **settings)
        singles = [model.generate(**row_inputs(batch, r, processor), **settings) for r in range(rows)]
    changed = max((a - b).abs().max() for a, b in zip(batched.logits, vanilla.logits, strict=True))
    assert changed > 1e-3, f"{spec} did not change the logits"
    for r, one in enumerate(singles):
        assert torch.equal(batched.sequences[r, -steps:], one.sequences[0, -steps:])
        for step_b, step_1 in zip(batched.logits, one.logits, strict=True):
            finite = torch.isfinite(step_1[0])
            assert torch.equal(finite, torch.isfinite(step_b[r]))
            assert (step_b[r][finite] - step_1[0][finite]).abs().max() <= 1e-4
    assert torch.equal(model.generate(**batch, **settings).sequences, vanilla.sequences)


def count_language_forwards(model, inputs, steps: int = 4) -> list[tuple[int, int] | None]:
    """``(rows, tokens)`` of each language-model forward during a greedy generation of ``steps`` tokens."""
    calls = []

    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        calls.append(tuple(embeds.shape[:2]) if embeds is not None else None)

    handle = model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    finally:
        handle.remove()
    return calls


@torch.no_grad()
def layer_inputs(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Hidden states entering each decoder layer at prefill (index i = input of layer i)."""
    return model(**inputs, output_hidden_states=True).hidden_states


# -- helpers for the method tests (oracle comparisons, kernels, removal) ------------------------------
KERNELS = ("reference", "torch", "torch-grouped")


def use_kernel(name: str, monkeypatch) -> str:
    """The kernel to pass to mitigate for a test parameter; ``torch-grouped`` forces one-row chunks and
    no materialised budget, so prefill takes the torch kernel's grouped or chunked paths."""
    if name == "torch-grouped":
        from mitigate.kernels import torch_sdpa

        monkeypatch.setattr(torch_sdpa, "MIN_CHUNK_BYTES", 0)
        monkeypatch.setattr(torch_sdpa, "CHUNK_BYTES", 1)
        monkeypatch.setattr(torch_sdpa, "MAX_CHUNKS", 0)
        return "torch"
    return name


def mitigated_trace(model, inputs, spec, *, steps: int = 5, **kwargs):
    """``(trace under the mitigation, per-method state after it, trace after remove())``."""
    from mitigate import apply_mitigation

    handle = apply_mitigation(model, spec, **kwargs)
    try:
        trace = greedy_trace(model, inputs, steps)
        state = [dict(s) for s in handle._session.state]
    finally:
        handle.remove()
    return trace, state, greedy_trace(model, inputs, steps)


def assert_identical(a: Trace, b: Trace) -> None:
    """Bit-identical logits and tokens."""
    assert torch.equal(a.prefill, b.prefill)
    assert all(torch.equal(x, y) for x, y in zip(a.steps, b.steps, strict=True))
    assert torch.equal(a.tokens, b.tokens)


def assert_rows_match(batched: Trace, singles: list[Trace], atol: float = 1e-4) -> None:
    """Each row of a left-padded batched trace equals the one-row trace of that prompt."""
    width = batched.prefill.shape[1]
    for r, one in enumerate(singles):
        length = one.prefill.shape[1]
        assert (batched.prefill[r, width - length :] - one.prefill[0]).abs().max() <= atol, f"row {r}"
        for step_b, step_1 in zip(batched.steps, one.steps, strict=True):
            assert (step_b[r] - step_1[0]).abs().max() <= atol, f"row {r}"
        assert torch.equal(batched.tokens[r], one.tokens[0])


@torch.no_grad()
def generate_logits(model, inputs: dict[str, torch.Tensor], steps: int) -> list[torch.Tensor]:
    """The raw next-token logits ``model.generate`` saw at each greedy step ``[B, V]``."""
    out = model.generate(
        **inputs,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return [x.float() for x in out.logits]


def next_token_logits(trace: Trace) -> list[torch.Tensor]:
    """A trace's logits for each generated token, as ``generate`` reports them: the prompt's last position,
    then every decode step."""
    return [trace.prefill[:, -1], *trace.steps]
