"""Other model families through the same code: LLaVA-NeXT (any-resolution tiles and row-end tokens)."""

import kit
import pytest
from oracles import VAROracle

from mitigate import UnsupportedModelError, apply_mitigation, mitigated
from mitigate.builtin import shapes_image, tiny_llava_next
from mitigate.builtin.tiny_llava import IMAGE_TOKEN, VOCAB

IMAGE_ID = VOCAB.index(IMAGE_TOKEN)

SPECS = ["var-tiny", "gift", "vhr", "pai", "pai-released", "vaf", "vaf-released", ["pai", "var-tiny", "vhr"]]


@pytest.fixture(scope="module")
def next_model():
    return tiny_llava_next.build_model(), tiny_llava_next.build_processor()


@pytest.fixture(scope="module")
def next_batch(next_model):
    """Left-padded rows with images of different shapes (different tile counts) and a text-only row."""
    _, processor = next_model
    images = [shapes_image(1, size=40)[0], None, shapes_image(2, size=64)[0].resize((64, 32))]
    return kit.batch(processor, [kit.PROMPTS[0], kit.PROMPTS[2], kit.PROMPTS[1]], images)


def test_tiles_give_different_image_lengths(next_model, next_batch):
    model, _ = next_model
    counts = (next_batch["input_ids"] == model.config.image_token_id).sum(-1).tolist()
    assert counts[1] == 0 and counts[0] != counts[2] and min(counts[0], counts[2]) > 16


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_generate_batched_equals_single(next_model, next_batch, spec):
    model, processor = next_model
    kit.check_batched_equals_single(model, next_batch, spec, processor)


@pytest.mark.parametrize("kernel", ["reference", "torch"])
def test_var_matches_independent_formula(next_model, next_batch, kernel):
    model, _ = next_model
    params = {"sink_dims": "auto", "tau": 2.0, "moved_fraction": 0.6, "min_nonsink_ratio": 0.3,
              "min_image_mass": 0.05, "layers": [2, 3]}  # fmt: skip
    vanilla = kit.greedy_trace(model, next_batch)
    with VAROracle(model, model.config.image_token_id, **params):
        expected = kit.greedy_trace(model, next_batch)
    with mitigated(model, "var", kernel=kernel, **params):
        got = kit.greedy_trace(model, next_batch)
    valid = next_batch["attention_mask"].bool()
    assert kit.max_diff(expected, vanilla, valid) > 1e-3
    assert kit.max_diff(got, expected, valid) <= 1e-4


def test_paint_explains_why_not(next_model):
    model, _ = next_model
    with pytest.raises(UnsupportedModelError, match="tiles"):
        apply_mitigation(model, "paint")


@pytest.fixture(scope="module")
def sliding_model():
    """LLaVA with a Mistral language model whose sliding window (12) is shorter than the prompts: at
    decode the cache keeps only the latest 12 keys, so key index and position differ."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, MistralConfig

    from mitigate.builtin.tiny_llava import build_config, build_processor, finish

    base = build_config()
    text = MistralConfig(
        vocab_size=base.text_config.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=12, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    config = LlavaConfig(
        text_config=text, vision_config=base.vision_config, image_token_id=base.image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=0,
    )  # fmt: skip
    return finish(LlavaForConditionalGeneration, config, "sliding-llava", 0, 0.15), build_processor()


@pytest.mark.parametrize("kernel", ["reference", "torch"])
def test_var_with_a_sliding_window_cache(sliding_model, kernel):
    model, processor = sliding_model
    batch = kit.batch(processor, [kit.PROMPTS[0], kit.PROMPTS[1]], [kit.image(1), kit.image(2)])
    params = {"sink_dims": "auto", "tau": 2.0, "moved_fraction": 0.6, "min_nonsink_ratio": 0.3,
              "min_image_mass": 0.05, "layers": [1, 2, 3]}  # fmt: skip
    vanilla = kit.greedy_trace(model, batch)
    with VAROracle(model, model.config.image_token_id, **params):
        expected = kit.greedy_trace(model, batch)
    with mitigated(model, "var", kernel=kernel, **params):
        got = kit.greedy_trace(model, batch)
    valid = batch["attention_mask"].bool()
    assert kit.max_diff(expected, vanilla, valid) > 1e-3
    assert kit.max_diff(got, expected, valid) <= 1e-4


@pytest.mark.parametrize("spec", ["pai", "vaf", "gift", "vhr"])
def test_sliding_window_generate_batched_equals_single(sliding_model, spec):
    model, processor = sliding_model
    batch = kit.batch(
        processor, [kit.PROMPTS[0], kit.PROMPTS[2], kit.PROMPTS[1]], [kit.image(1), None, kit.image(2)]
    )
    kit.check_batched_equals_single(model, batch, spec, processor, steps=6)
