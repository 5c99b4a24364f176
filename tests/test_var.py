"""VAR on the tiny LLaVA: against an independent implementation, removal, batching, state reset."""

import kit
import pytest
import torch
from oracles import VAROracle

from mitigate import apply_mitigation, mitigated
from mitigate.kernels import torch_sdpa

BASE = {"moved_fraction": 0.6, "min_nonsink_ratio": 0.3, "min_image_mass": 0.05}


@pytest.fixture(params=["reference", "torch", "torch-grouped"])
def kernel(request, monkeypatch):
    """Each kernel; ``torch-grouped`` forces tiny row chunks so prefill takes the grouped SDPA path."""
    if request.param == "torch-grouped":
        monkeypatch.setattr(torch_sdpa, "MIN_CHUNK_BYTES", 0)
        monkeypatch.setattr(torch_sdpa, "CHUNK_BYTES", 1)
        monkeypatch.setattr(torch_sdpa, "MAX_CHUNKS", 0)
        return "torch"
    return request.param


def sink_params(model, inputs, layers=(2, 3)):
    """Explicit sink dims and a tau that makes image sinks exist in every edited layer of this input."""
    hidden = kit.layer_inputs(model, inputs)
    valid = inputs["attention_mask"].bool()
    image = (inputs["input_ids"] == model.config.image_token_id) & valid

    def normed(layer):
        h = hidden[layer].float()
        return (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).abs()

    dims = normed(layers[0])[valid].amax(0).topk(2).indices.tolist()
    image_max = min(float(normed(layer)[..., dims].amax(-1)[image].max()) for layer in layers)
    return {"sink_dims": dims, "tau": 0.8 * image_max, "layers": list(layers)}


def oracle_trace(model, inputs, params, steps=5):
    with VAROracle(model, model.config.image_token_id, **params):
        trace = kit.greedy_trace(model, inputs, steps)
    return trace


@pytest.mark.parametrize("layers", [(2, 3), (1, 3)])
def test_var_matches_independent_formula(tiny, single, layers, kernel):
    model, _ = tiny
    params = {**BASE, **sink_params(model, single, layers)}
    vanilla = kit.greedy_trace(model, single)
    expected = oracle_trace(model, single, params)
    with mitigated(model, "var", kernel=kernel, **params):
        got = kit.greedy_trace(model, single)
    assert kit.max_diff(expected, vanilla) > 1e-3, (
        "the edit must change the logits for this test to mean anything"
    )
    assert kit.max_diff(got, expected) <= 1e-4


def test_var_auto_dims_match_independent_formula(tiny, single, kernel):
    model, _ = tiny
    params = {**BASE, "sink_dims": "auto", "tau": 2.0, "layers": [2, 3]}
    vanilla = kit.greedy_trace(model, single)
    expected = oracle_trace(model, single, params)
    with mitigated(model, "var", kernel=kernel, **params):
        got = kit.greedy_trace(model, single)
    assert kit.max_diff(expected, vanilla) > 1e-3
    assert kit.max_diff(got, expected) <= 1e-4


def test_remove_and_context_restore_bit_identical(tiny, single, kernel):
    model, _ = tiny
    params = {**BASE, **sink_params(model, single)}
    before = kit.greedy_trace(model, single)
    generated = model.generate(**single, max_new_tokens=6, do_sample=False)
    handle = apply_mitigation(model, "var", kernel=kernel, **params)
    during = kit.greedy_trace(model, single)
    handle.remove()
    after = kit.greedy_trace(model, single)
    assert kit.max_diff(during, before) > 1e-3
    assert torch.equal(before.prefill, after.prefill)
    assert all(torch.equal(a, b) for a, b in zip(before.steps, after.steps, strict=True))
    with mitigated(model, "var", kernel=kernel, **params):
        pass
    again = kit.greedy_trace(model, single)
    assert torch.equal(before.prefill, again.prefill)
    assert torch.equal(generated, model.generate(**single, max_new_tokens=6, do_sample=False))
    assert model.config.text_config._attn_implementation == "sdpa"


def test_batched_left_padded_equals_one_at_a_time(tiny, padded, kernel):
    model, processor = tiny
    rows = [kit.row_inputs(padded, r, processor) for r in range(3)]
    params = {**BASE, **sink_params(model, rows[0])}
    with mitigated(model, "var", kernel=kernel, **params) as handle:
        batched = kit.greedy_trace(model, padded)
        singles = [kit.greedy_trace(model, row) for row in rows]
        with handle.recording() as stats:
            kit.greedy_trace(model, rows[2])
    assert stats.summary()["var"], "the edit must be active for the comparison to mean anything"
    width = padded["input_ids"].shape[1]
    for r, one in enumerate(singles):
        length = one.prefill.shape[1]
        assert torch.allclose(batched.prefill[r, width - length :], one.prefill[0], atol=1e-4, rtol=0)
        for step_b, step_1 in zip(batched.steps, one.steps, strict=True):
            assert torch.allclose(step_b[r], step_1[0], atol=1e-4, rtol=0)
        assert torch.equal(batched.tokens[r], one.tokens[0])


def test_state_resets_at_every_prefill(tiny, padded):
    model, processor = tiny
    first = kit.row_inputs(padded, 0, processor)
    second = kit.row_inputs(padded, 2, processor)
    params = {**BASE, **sink_params(model, first)}
    with mitigated(model, "var", kernel="reference", **params):
        fresh = kit.greedy_trace(model, second)
    with mitigated(model, "var", kernel="reference", **params):
        kit.greedy_trace(model, first)
        after_other = kit.greedy_trace(model, second)
    assert kit.max_diff(fresh, after_other) == 0.0


def test_text_only_prompt_is_untouched(tiny):
    model, processor = tiny
    inputs = kit.batch(processor, [kit.PROMPTS[0]], [None])
    before = kit.greedy_trace(model, inputs)
    with mitigated(model, "var", kernel="reference", sink_dims="auto", tau=0.5, layers=[1, 2, 3]):
        after = kit.greedy_trace(model, inputs)
    assert kit.max_diff(before, after) <= 1e-5


def test_recording_reports_moved_mass(tiny, single):
    model, _ = tiny
    params = {**BASE, **sink_params(model, single)}
    with mitigated(model, "var", kernel="reference", **params) as handle, handle.recording() as stats:
        model.generate(**single, max_new_tokens=3, do_sample=False)
    summary = stats.summary()["var"]
    assert set(summary) <= {2, 3} and summary
    assert all(v["moved"] >= 0 and v["heads"] <= v["rows"] for v in summary.values())
    assert any(v["moved"] > 0 for v in summary.values())
