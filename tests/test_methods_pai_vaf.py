"""PAI and VAF on the tiny LLaVA against independent implementations of their formulas (tests/oracles.py):
prefill plus five greedy decode steps at 1e-4 in fp32, every kernel, a left-padded batch with a text-only
row, ``model.generate``, and removal restoring bit-identical logits; PAI's image-free contrast against a
two-branch greedy decoder written here."""

import contextlib
import math

import kit
import pytest
import torch
from oracles import PAIOracle, VAFOracle

from mitigate import mitigated

PAI = {"alpha": 2.0, "layers": [1, 2, 3]}
VAF = {"image_scale": 1.8, "system_scale": 0.5, "layers": [1, 2]}


@pytest.fixture(params=kit.KERNELS)
def kernel(request, monkeypatch):
    return kit.use_kernel(request.param, monkeypatch)


def oracle_trace(oracle, model, inputs):
    with oracle:
        return kit.greedy_trace(model, inputs)


def check_against(model, inputs, oracle, spec, kernel, **params):
    """The mitigated trace equals the oracle's, the edit matters, and remove() restores the model."""
    vanilla = kit.greedy_trace(model, inputs)
    expected = oracle_trace(oracle, model, inputs)
    got, _, after = kit.mitigated_trace(model, inputs, spec, kernel=kernel, **params)
    valid = inputs["attention_mask"].bool()
    assert kit.max_diff(expected, vanilla, valid) > 1e-3, "the edit must change the logits"
    assert kit.max_diff(got, expected, valid) <= 1e-4
    kit.assert_identical(after, vanilla)
    assert model.config.text_config._attn_implementation == "sdpa"


def test_pai_matches_independent_formula(tiny, single, kernel):
    model, _ = tiny
    oracle = PAIOracle(model, model.config.image_token_id, **PAI)
    check_against(model, single, oracle, "pai", kernel, **PAI)


def test_pai_default_preset_matches_formula(tiny, single):
    """The shipped preset (alpha 0.5, layers 2..last) is the formula with those values."""
    model, _ = tiny
    oracle = PAIOracle(model, model.config.image_token_id, alpha=0.5, layers=[2, 3])
    with mitigated(model, "pai") as handle:
        assert handle.methods["pai"]["alpha"] == 0.5 and handle.methods["pai"]["layers"] == [2, 3]
    check_against(model, single, oracle, "pai", "torch")


def test_pai_padded_batch_matches_formula(tiny, padded, kernel):
    model, _ = tiny
    oracle = PAIOracle(model, model.config.image_token_id, **PAI)
    check_against(model, padded, oracle, "pai", kernel, **PAI)


@pytest.mark.parametrize("rows", ["all", "after_image"])
def test_vaf_matches_independent_formula(tiny, single, kernel, rows):
    model, _ = tiny
    oracle = VAFOracle(model, model.config.image_token_id, rows=rows, **VAF)
    check_against(model, single, oracle, "vaf", kernel, rows=rows, **VAF)


def test_vaf_rows_setting_matters(tiny, single):
    """Editing the prompt's image rows too ("all") differs from editing only rows after it."""
    model, _ = tiny
    image = model.config.image_token_id
    every = oracle_trace(VAFOracle(model, image, rows="all", **VAF), model, single)
    after = oracle_trace(VAFOracle(model, image, rows="after_image", **VAF), model, single)
    assert kit.max_diff(every, after) > 1e-3


@pytest.mark.parametrize("rows", ["all", "after_image"])
def test_vaf_padded_batch_matches_formula(tiny, padded, rows):
    model, _ = tiny
    oracle = VAFOracle(model, model.config.image_token_id, rows=rows, **VAF)
    check_against(model, padded, oracle, "vaf", "torch", rows=rows, **VAF)


def test_vaf_default_preset_matches_formula(tiny, single):
    """The shipped preset: x1.15 image, x0.95 prefix, every row, layers 9..14 of 32 scaled to this depth."""
    model, _ = tiny
    with mitigated(model, "vaf") as handle:
        params = handle.methods["vaf"]
    layers = list(range(round(9 * 4 / 32), round(14 * 4 / 32) + 1))
    assert params["layers"] == layers
    assert (params["image_scale"], params["system_scale"], params["rows"]) == (1.15, 0.95, "all")
    oracle = VAFOracle(model, model.config.image_token_id, image_scale=1.15, system_scale=0.95, layers=layers)
    check_against(model, single, oracle, "vaf", "torch")


@pytest.mark.parametrize(("spec", "make"), [("pai", "pai"), ("vaf", "vaf")])
def test_generate_equals_oracle(tiny, single, spec, make):
    """``model.generate`` (its own positions, cache and stopping logic) sees the oracle's logits."""
    model, _ = tiny
    image = model.config.image_token_id
    oracle, params = (
        (PAIOracle(model, image, **PAI), PAI) if make == "pai" else (VAFOracle(model, image, **VAF), VAF)
    )
    expected = kit.next_token_logits(oracle_trace(oracle, model, single))
    with mitigated(model, spec, **params):
        got = kit.generate_logits(model, single, len(expected))
    for a, b in zip(got, expected, strict=True):
        assert (a - b).abs().max() <= 1e-4


# -- PAI's image-free contrast (cfg_gamma) ----------------------------------------------------------------
def contrast_oracle(model, inputs, *, alpha, layers, gamma, cutoff=None, steps=5):
    """Greedy decoding on ``gamma*(logp - logq) + logq``: ``logp`` from the prompt under PAI's edit,
    ``logq`` from the same prompt without its image tokens (no edit: it has no image), each with its own
    cache; the chosen token is fed to both. With ``cutoff``, tokens with ``p < cutoff * max p`` get ``-inf``.
    Returns the contrasted scores of every generated token."""
    image = model.config.image_token_id
    oracle = PAIOracle(model, image, alpha=alpha, layers=layers)
    ids = inputs["input_ids"][0]
    text = ids[ids != image][None]
    branches = [dict(inputs), {"input_ids": text, "attention_mask": torch.ones_like(text)}]
    caches, last = [None, None], [None, None]
    scores = []
    with torch.no_grad():
        for _ in range(steps + 1):
            for i, branch in enumerate(branches):
                length = branch["attention_mask"].shape[1]
                positions = torch.arange(length - branch["input_ids"].shape[1], length)[None]
                with oracle if i == 0 else contextlib.nullcontext():
                    out = model(**branch, position_ids=positions, cache=caches[i], use_cache=True)
                caches[i], last[i] = out.cache, out.logits[0, -1].float()
            logp, logq = torch.log_softmax(last[0], -1), torch.log_softmax(last[1], -1)
            score = gamma * (logp - logq) + logq
            if cutoff is not None:
                score[logp < logp.max() + math.log(cutoff)] = float("-inf")
            scores.append(score)
            token = scores[-1].argmax()[None, None]
            for branch in branches:
                mask = branch["attention_mask"]
                branch.update(input_ids=token, attention_mask=torch.cat([mask, mask[:, :1]], dim=1))
                branch.pop("pixel_values", None)
    return scores


def assert_scores_match(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for a, b in zip(got, expected, strict=True):
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a[0]), finite)
        assert (a[0][finite] - b[finite]).abs().max() <= 1e-4


@pytest.mark.parametrize("cutoff", [None, 0.1])
def test_pai_contrast_matches_independent_formula(tiny, single, cutoff):
    model, _ = tiny
    params = {"alpha": PAI["alpha"], "layers": PAI["layers"], "cutoff": cutoff}
    expected = contrast_oracle(model, single, gamma=1.5, **params)
    plain = contrast_oracle(model, single, gamma=1.0, **params)
    finite = torch.isfinite(plain[0])
    assert (expected[0][finite] - plain[0][finite]).abs().max() > 1e-3, "the contrast must matter"
    if cutoff is not None:
        assert not finite.all(), "the cutoff must drop some tokens"
    with mitigated(model, "pai", cfg_gamma=1.5, cfg_cutoff=cutoff, **PAI):
        trace = kit.greedy_trace(model, single)
        got = kit.generate_logits(model, single, len(expected))
    assert_scores_match(kit.next_token_logits(trace), expected)
    assert_scores_match(got, expected)
