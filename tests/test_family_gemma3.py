"""Gemma 3 through the same code: a SigLIP tower (no CLS), pooled image tokens between markers, image
blocks that attend bidirectionally, and sliding-window layers shorter than the prompts."""

import kit
import pytest
import torch
from oracles import VAROracle

from mitigate import UnsupportedModelError, apply_mitigation, mitigated
from mitigate.builtin import shapes_image, tiny_gemma3

VAR = {"sink_dims": "auto", "tau": 1.5, "moved_fraction": 0.6, "min_nonsink_ratio": 0.3,
       "min_image_mass": 0.05, "layers": [1, 2, 3]}  # fmt: skip
SPECS = [{"var": VAR}, "gift", "vhr", "pai", "pai-released", "vaf", "vaf-released", {"pai": {}, "var": VAR}]


@pytest.fixture(scope="module")
def gemma():
    return tiny_gemma3.build_model(), tiny_gemma3.build_processor()


@pytest.fixture(scope="module")
def gemma_batch(gemma):
    """Left-padded rows: two with an image, one text-only (Gemma's processor takes images per row)."""
    _, processor = gemma
    images = [shapes_image(1, size=40)[0], None, shapes_image(2, size=64)[0]]
    prompts = [kit.PROMPTS[0], kit.PROMPTS[2], kit.PROMPTS[1]]
    texts = [kit.chat(processor, p, img is not None) for p, img in zip(prompts, images, strict=True)]
    nested = [[img] if img is not None else [] for img in images]
    return dict(processor(images=nested, text=texts, return_tensors="pt", padding=True))


def test_layout_is_gemmas(gemma, gemma_batch):
    model, _ = gemma
    ids = gemma_batch["input_ids"]
    counts = (ids == model.config.image_token_id).sum(-1).tolist()
    assert counts == [tiny_gemma3.IMAGE_TOKENS, 0, tiny_gemma3.IMAGE_TOKENS]
    assert ids.shape[1] > tiny_gemma3.SLIDING_WINDOW  # sliding layers really drop keys
    assert set(model.config.text_config.layer_types) == {"sliding_attention", "full_attention"}


@pytest.mark.parametrize("kernel", ["reference", "torch"])
def test_var_matches_independent_formula(gemma, gemma_batch, kernel):
    model, _ = gemma
    vanilla = kit.greedy_trace(model, gemma_batch)
    with VAROracle(model, model.config.image_token_id, **VAR):
        expected = kit.greedy_trace(model, gemma_batch)
    with mitigated(model, "var", kernel=kernel, **VAR):
        got = kit.greedy_trace(model, gemma_batch)
    valid = gemma_batch["attention_mask"].bool()
    assert kit.max_diff(expected, vanilla, valid) > 1e-3
    assert kit.max_diff(got, expected, valid) <= 1e-4
    again = kit.greedy_trace(model, gemma_batch)  # removed: bit-identical to before
    assert torch.equal(again.prefill, vanilla.prefill)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_generate_batched_equals_single(gemma, gemma_batch, spec):
    model, processor = gemma
    kit.check_batched_equals_single(model, gemma_batch, spec, processor)


def test_paint_explains_why_not(gemma):
    model, _ = gemma
    with pytest.raises(UnsupportedModelError, match="CLS"):
        apply_mitigation(model, "paint")
