"""The tiny offline builders of the newer families: each builds without a download, lays out its image tokens
as the real family does, runs batched left-padded greedy generation under SDPA, and that equals generating
each prompt on its own; the image changes the logits."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import kit
import pytest
import torch

from mitigate.builtin import shapes_image

STEPS = 4
GENERATE = {
    "max_new_tokens": STEPS,
    "min_new_tokens": STEPS,  # eos is masked to -inf, so every row runs all steps
    "do_sample": False,
    "output_logits": True,
    "return_dict_in_generate": True,
}


def wide_image(seed: int = 1):
    """Not square, so tiling families cut it into several tiles."""
    return shapes_image(seed, size=64)[0].resize((72, 40))


def small_image(seed: int = 2):
    return shapes_image(seed, size=40)[0]


def tokens(processor, ids: torch.Tensor, token: str) -> int:
    return int((ids == processor.tokenizer.convert_tokens_to_ids(token)).sum())


@dataclass
class Family:
    module: str
    model_class: str
    text_only_rows: bool = True  # can a batch row have no image?
    build: dict = field(default_factory=dict)
    attn: str = "sdpa"
    needs: str | None = None  # a package the processor insists on


FAMILIES = {
    "llava-onevision": Family("tiny_llava_onevision", "LlavaOnevisionForConditionalGeneration"),
    "qwen2-vl": Family("tiny_qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "qwen2.5-vl": Family("tiny_qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3-vl": Family("tiny_qwen3_vl", "Qwen3VLForConditionalGeneration"),
    "qwen3.5": Family("tiny_qwen3_5", "Qwen3_5ForConditionalGeneration"),
    "gemma4": Family("tiny_gemma4", "Gemma4ForConditionalGeneration"),
    "internvl": Family("tiny_internvl", "InternVLForConditionalGeneration"),
    "smolvlm": Family("tiny_smolvlm", "SmolVLMForConditionalGeneration", needs="num2words"),
    "idefics3": Family("tiny_idefics3", "Idefics3ForConditionalGeneration"),
    "paligemma": Family("tiny_paligemma", "PaliGemmaForConditionalGeneration", text_only_rows=False),
    "paligemma2": Family(
        "tiny_paligemma",
        "PaliGemmaForConditionalGeneration",
        text_only_rows=False,
        build={"version": 2},
        attn="eager",
    ),
    "mistral3": Family("tiny_mistral3", "Mistral3ForConditionalGeneration"),
}


def chat(processor, prompt: str, images: int) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def encode(processor, rows: list[tuple[str, list]]) -> dict[str, torch.Tensor]:
    """A left-padded batch of ``(prompt, images)`` rows, images given per row."""
    texts = [chat(processor, prompt, len(images)) for prompt, images in rows]
    kwargs = {"images": [list(images) for _, images in rows]} if any(images for _, images in rows) else {}
    batch = dict(processor(text=texts, return_tensors="pt", padding=True, **kwargs))
    batch.pop("labels", None)  # PaliGemma's training labels
    return batch


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def family(request):
    spec = FAMILIES[request.param]
    if spec.needs:
        pytest.importorskip(spec.needs, reason=f"{request.param}'s processor refuses to build without it")
    module = importlib.import_module(f"mitigate.builtin.{spec.module}")
    model, processor = module.build_model(**spec.build), module.build_processor()
    second = [] if spec.text_only_rows else [small_image()]
    rows = [(kit.PROMPTS[0], [wide_image()]), (kit.PROMPTS[2], second)]
    return request.param, spec, model, processor, rows


def test_builds_offline_as_the_family(family):
    name, spec, model, processor, rows = family
    assert type(model).__name__ == spec.model_class
    assert model.config.get_text_config()._attn_implementation == spec.attn
    assert processor.tokenizer.padding_side == "left"
    batch = encode(processor, rows)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    image_id = model.config.image_token_id
    counts = (ids == image_id).sum(-1).tolist()
    assert counts[0] > 0 and (counts[1] == 0) == spec.text_only_rows
    assert mask[:, 0].tolist() != mask[:, -1].tolist()  # the shorter row is padded, on the left
    assert mask[:, -1].all()
    check_layout(name, model, processor, batch)


def check_layout(name: str, model, processor, batch) -> None:
    """What each tiny config must exercise (the features the adapters have to handle)."""
    ids = batch["input_ids"]
    text = model.config.get_text_config()
    if name.startswith("qwen"):
        assert batch["image_grid_thw"].shape == (1, 3) and "mm_token_type_ids" in batch
        assert tokens(processor, ids, "<|vision_start|>") == tokens(processor, ids, "<|vision_end|>") == 1
        assert text.num_key_value_heads < text.num_attention_heads
    if name == "qwen3.5":
        kinds = text.layer_types
        assert kinds.count("linear_attention") >= 1 and kinds.count("full_attention") >= 2
    if name == "gemma4":
        assert text.use_bidirectional_attention == "vision" and "mm_token_type_ids" in batch
        assert text.sliding_window < ids.shape[1]
        assert set(text.layer_types) == {"sliding_attention", "full_attention"}
        assert text.num_kv_shared_layers > 0
        assert tokens(processor, ids, "<|image>") == tokens(processor, ids, "<image|>") == 1
    if name.startswith("paligemma"):
        assert batch["token_type_ids"].shape == ids.shape
    if name == "paligemma2":
        assert text.sliding_window < ids.shape[1]
    if name == "internvl":
        tiles = batch["pixel_values"].shape[0]
        assert tiles > 1  # the wide image is cut into tiles plus a thumbnail
        assert tokens(processor, ids, "<img>") == tokens(processor, ids, "</img>") == 1
    if name in ("smolvlm", "idefics3"):
        assert tokens(processor, ids, "<row_1_col_2>") == 1 and tokens(processor, ids, "<global-img>") == 1
    if name == "llava-onevision":
        base = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
        # tiles and row newlines past the base view
        assert (ids[0] == model.config.image_token_id).sum() > base
    if name == "mistral3":
        assert tokens(processor, ids, "[IMG_BREAK]") > 0 and tokens(processor, ids, "[IMG_END]") == 1


@torch.no_grad()
def test_image_changes_the_logits(family):
    _, _, model, processor, rows = family
    prompt = rows[0][0]
    a = model(**encode(processor, [(prompt, [wide_image(1)])])).logits[0, -1]
    b = model(**encode(processor, [(prompt, [wide_image(5)])])).logits[0, -1]
    assert (a - b).abs().max() > 1e-2


@torch.no_grad()
def test_batched_left_padded_generation_equals_one_at_a_time(family):
    _, _, model, processor, rows = family
    batched = model.generate(**encode(processor, rows), **GENERATE)
    for r, row in enumerate(rows):
        alone = model.generate(**encode(processor, [row]), **GENERATE)
        assert torch.equal(batched.sequences[r, -STEPS:], alone.sequences[0, -STEPS:]), f"row {r}"
        for step_b, step_1 in zip(batched.logits, alone.logits, strict=True):
            finite = torch.isfinite(step_1[0])
            assert torch.equal(finite, torch.isfinite(step_b[r]))
            assert (step_b[r][finite] - step_1[0][finite]).abs().max() <= 1e-4, f"row {r}"


@torch.no_grad()
def test_internvl_tower_has_a_peaked_cls_query():
    """InternVL is the one family here whose tower has a CLS token (PAINT reads its attention to patches):
    the tiny tower's CLS attention at the first layer is not uniform."""
    from mitigate.builtin import tiny_internvl

    model, processor = tiny_internvl.build_model(), tiny_internvl.build_processor()
    pixels = encode(processor, [(kit.PROMPTS[0], [small_image()])])["pixel_values"]
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "eager"})
    out = model.model.vision_tower(pixel_values=pixels, output_attentions=True)
    patches = (tiny_internvl.IMAGE_SIZE // tiny_internvl.PATCH_SIZE) ** 2
    assert out.last_hidden_state.shape[1] == 1 + patches  # CLS first
    cls = out.attentions[0][0, :, 0, 1:].sum(0)
    assert cls.max() > 2 * cls.mean()
