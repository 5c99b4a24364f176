"""GIFT's released Qwen2-VL setting puts its saliency layer (14) after enhanced layers (5..18): the
saliency is then read in one prefill probe before the generating pass, as the released code's extra
eager pass does. On the tiny LLaVA (saliency 2, enhance 1..3) it matches the oracle fed with a separate
vanilla pass's probabilities; exactly one extra prefill runs, of the prompt rows only, and VHR in the
same composition shares it (one probe of the prompts and their twins). On Qwen2-VL, batched equals one
at a time."""

import family_kit as fk
import kit
import pytest
import torch
from oracles import GIFTOracle
from test_methods_gift import GIFT, INFORMATIVE

from mitigate import ConfigError, apply_mitigation, mitigated

PROBED = {**GIFT, "saliency_layers": [2], "enhance_layers": [1, 2, 3], "pos_filter": True}


def oracle(model, processor, saliency_from=None, enhance=(1, 2, 3)):
    params = {**GIFT, "enhance_layers": list(enhance)}
    return GIFTOracle(
        model, model.config.image_token_id, tokenizer=processor.tokenizer, saliency_layers=[2],
        informative=INFORMATIVE, saliency_from=saliency_from, **params,
    )  # fmt: skip


@pytest.mark.parametrize("kernel", ["reference", "torch"])
def test_probed_saliency_matches_an_oracle_with_a_separate_pass(tiny, padded, kernel):
    model, processor = tiny
    vanilla = kit.generate_logits(model, padded, 4)
    observer = oracle(model, processor, enhance=())
    with observer:  # the separate pass: plain attention, the saliency layer's probabilities recorded
        kit.generate_logits(model, padded, 1)
    with oracle(model, processor, saliency_from=observer.seen) as expected_oracle:
        expected = kit.generate_logits(model, padded, 4)
    with mitigated(model, "gift", kernel=kernel, processor=processor, **PROBED) as handle:
        got = kit.generate_logits(model, padded, 4)
        state = handle._session.state[0]
    assert any(s is not None for s in expected_oracle.saliency), "some row must be enhanced"
    assert state["kept"] == expected_oracle.kept
    assert max((a - b).abs().max() for a, b in zip(expected, vanilla, strict=True)) > 1e-3
    assert max((a - b).abs().max() for a, b in zip(got, expected, strict=True)) <= 1e-4


def test_one_probe_of_the_prompt_rows_and_vhr_shares_it(tiny, padded):
    model, processor = tiny
    rows, length = padded["input_ids"].shape
    vanilla = kit.count_language_forwards(model, padded)
    with mitigated(model, "gift", processor=processor, **PROBED) as handle:
        assert handle.methods["gift"]["saliency_layers"] == [2]
        alone = kit.count_language_forwards(model, padded)
    with mitigated(model, {"gift": PROBED, "vhr": {}}, processor=processor):
        shared = kit.count_language_forwards(model, padded)
    assert alone == [(rows, length), *vanilla]
    assert shared == [(2 * rows, length), *vanilla]


def test_composed_with_vhr_batched_equals_single(tiny, padded):
    model, processor = tiny
    kit.check_batched_equals_single(model, padded, {"gift": PROBED, "vhr": {}}, processor)


def test_qwen2_vl_released_layout_batched_equals_single():
    model, processor = fk.tiny("qwen2-vl")
    rows = fk.rows_of(fk.BY_NAME["qwen2-vl"])
    batch = fk.encode(processor, rows)
    vanilla = fk.generate(model, batch)
    params = {"saliency_layers": [2], "enhance_layers": [1, 2, 3], "alpha": 4.0}
    with mitigated(model, "gift-qwen2vl", processor=processor, **params) as handle:
        assert handle._session.methods[0].probed
        edited = fk.generate(model, batch)
        alone = [fk.generate(model, fk.encode(processor, [row])) for row in rows]
    assert fk.logit_diff(edited, vanilla) > 1e-3
    fk.assert_rows_equal(edited, alone)
    after = fk.generate(model, batch)
    assert all(torch.equal(a, b) for a, b in zip(after.logits, vanilla.logits, strict=True))


def test_gift_qwen2vl_preset_needs_its_depth(tiny):
    """The preset's layers are Qwen2-VL-7B's (28 layers): on a 4-layer model they are out of range."""
    model, processor = tiny
    with pytest.raises(ConfigError, match=r"out of range"):
        apply_mitigation(model, "gift-qwen2vl", processor=processor)
