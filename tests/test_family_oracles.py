"""VAR and PAI on three families whose attention is not LLaVA's, against the independent oracles of
tests/oracles.py run on each family's own eager masks: Qwen2-VL (3-D M-RoPE positions), PaliGemma (a
prefix-LM: the prompt attends bidirectionally, ``is_causal=False``) and Qwen3.5 (hybrid layers: only the
full-attention ones are edited). Greedy ``generate`` on a left-padded batch, every step's logits within
1e-4; the oracle itself must move the logits, and removal restores them bit for bit."""

import family_kit as fk
import pytest
import torch
from oracles import PAIOracle, VAROracle

from mitigate import ConfigError, apply_mitigation, mitigated

VAR = {"sink_dims": "auto", "tau": 1.5, "moved_fraction": 0.6, "min_nonsink_ratio": 0.3,
       "min_image_mass": 0.05}  # fmt: skip
PAI = {"alpha": 0.5}
#: the layers edited: every full-attention layer from 1 on (Qwen3.5's are 1 and 3)
LAYERS = {"qwen2-vl": [1, 2, 3], "paligemma": [1, 2, 3], "qwen3.5": [1, 3]}
KERNELS = {"qwen2-vl": ["reference", "torch"], "paligemma": ["reference", "torch"], "qwen3.5": ["torch"]}
CASES = [(family, kernel) for family, kernels in KERNELS.items() for kernel in kernels]


def batch_of(name: str):
    model, processor = fk.tiny(name)
    return model, processor, fk.encode(processor, fk.rows_of(fk.BY_NAME[name]))


@pytest.mark.parametrize("method", ["var", "pai"])
@pytest.mark.parametrize(("family", "kernel"), CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_matches_the_oracle_on_the_familys_own_masks(family, kernel, method):
    model, _, batch = batch_of(family)
    params = {**(VAR if method == "var" else PAI), "layers": LAYERS[family]}
    oracle_class = VAROracle if method == "var" else PAIOracle
    vanilla = fk.generate(model, batch)
    with oracle_class(model, model.config.image_token_id, mask="eager", **params):
        expected = fk.generate(model, batch)
    with mitigated(model, method, kernel=kernel, **params):
        got = fk.generate(model, batch)
    assert fk.logit_diff(expected, vanilla) > 1e-3, "the oracle's edit must change the logits"
    assert torch.equal(got.sequences, expected.sequences)
    assert fk.logit_diff(got, expected) <= 1e-4
    after = fk.generate(model, batch)
    assert all(torch.equal(a, b) for a, b in zip(after.logits, vanilla.logits, strict=True))


def test_paligemma_prefix_is_bidirectional_without_a_mask():
    """A prompt with no padding and no token_type_ids reaches the attention with ``mask=None`` while the
    modules are not causal: every prompt row then sees every key. mitigate keeps that (PAI there equals its
    oracle, which reads ``module.is_causal``); treating it as causal would change the logits."""
    model, processor = fk.tiny("paligemma")
    typed = fk.encode(processor, [(fk.kit.PROMPTS[1], [fk.small_image()])])
    one = {k: v for k, v in typed.items() if k != "token_type_ids"}
    params = {**PAI, "layers": LAYERS["paligemma"]}
    with PAIOracle(model, model.config.image_token_id, **params):
        expected = fk.generate(model, one)
    with mitigated(model, "pai", **params):
        got = fk.generate(model, one)
        prefix_lm = fk.generate(model, typed)  # token_type_ids: the family's materialised prefix-LM mask
    assert fk.logit_diff(got, expected) <= 1e-4
    assert fk.logit_diff(got, prefix_lm) <= 1e-4


def test_qwen3_5_layer_numbering():
    """Methods number Qwen3.5's layers as the model does; only full-attention layers are editable, default
    ranges are kept to them, and a linear-attention layer is refused naming the valid ones."""
    model, processor = fk.tiny("qwen3.5")
    kinds = model.config.text_config.layer_types
    assert [i for i, kind in enumerate(kinds) if kind == "full_attention"] == [1, 3]
    with mitigated(model, ["pai", "vaf"]) as handle:
        assert handle.methods["pai"]["layers"] == [3]  # 2..3 of 4
        assert handle.methods["vaf"]["layers"] == [1]  # 9..14 of 32 -> 1..2 of 4
    with pytest.raises(ConfigError, match=r"\[2\].*linear-attention.*\[1, 3\]"):
        apply_mitigation(model, "pai", layers=[2, 3])
    with pytest.raises(ConfigError, match=r"saliency_layers \[0\].*\[1, 3\]"):
        apply_mitigation(model, "gift", processor=processor, saliency_layers=[0], enhance_layers=[3])
