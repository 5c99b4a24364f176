"""VHR on the tiny LLaVA against an independent implementation (tests/oracles.py): heads chosen the slow
way (per listed layer, one forward of the prompt and one of the prompt without its image tokens, earlier
layers already reinforced; vhd, the mean + std outlier filter, above the median), then the chosen heads'
outputs scaled at every position, over prefill plus five decode steps at 1e-4, every kernel; batched
equals one at a time; exactly one extra prefill; the command line."""

import kit
import pytest
import torch
from oracles import VHROracle
from typer.testing import CliRunner

from mitigate import apply_mitigation, mitigated
from mitigate.cli import app

VHR = {"alpha": 2.0, "layers": [1, 2, 3]}


@pytest.fixture(params=kit.KERNELS)
def kernel(request, monkeypatch):
    return kit.use_kernel(request.param, monkeypatch)


@pytest.fixture
def filtered(tiny):
    """A prompt on which the outlier filter changes the chosen heads of the tiny model."""
    _, processor = tiny
    return kit.batch(processor, [kit.PROMPTS[0]], [kit.image(1)])


def choose(model, rows, outlier_filter, params=VHR):
    oracle = VHROracle(model, model.config.image_token_id, outlier_filter=outlier_filter, **params)
    with oracle:
        oracle.choose(rows)
    return oracle


def check_vhr(model, inputs, rows, kernel, outlier_filter, params=VHR):
    oracle = choose(model, rows, outlier_filter, params)
    vanilla = kit.greedy_trace(model, inputs)
    with oracle:
        expected = kit.greedy_trace(model, inputs)
    got, state, after = kit.mitigated_trace(
        model, inputs, "vhr", kernel=kernel, outlier_filter=outlier_filter, **params
    )
    assert {k: v.tolist() for k, v in state[0]["heads"].items()} == {
        k: v.tolist() for k, v in oracle.heads.items()
    }
    valid = inputs["attention_mask"].bool()
    assert kit.max_diff(expected, vanilla, valid) > 1e-3, "the edit must change the logits"
    assert kit.max_diff(got, expected, valid) <= 1e-4
    kit.assert_identical(after, vanilla)
    return oracle, got


@pytest.mark.parametrize("outlier_filter", [True, False], ids=["filter", "no-filter"])
def test_vhr_matches_independent_formula(tiny, filtered, kernel, outlier_filter):
    model, _ = tiny
    check_vhr(model, filtered, [filtered], kernel, outlier_filter)


def test_vhr_outlier_filter_matters_here(tiny, filtered):
    model, _ = tiny
    on, off = (choose(model, [filtered], f).heads for f in (True, False))
    assert any(not torch.equal(on[layer], off[layer]) for layer in VHR["layers"])
    assert all(int(on[layer].sum()) == 2 for layer in VHR["layers"]), "half of the 4 heads, above the median"


def test_vhr_default_preset_matches_formula(tiny, filtered):
    """The shipped preset on a 4-layer model: alpha 2, layer 1 and the last 14/32 of the depth, filter on."""
    model, _ = tiny
    with mitigated(model, "vhr") as handle:
        params = handle.methods["vhr"]
    assert params == {"alpha": 2.0, "layers": [1, 2, 3], "outlier_filter": True}
    check_vhr(model, filtered, [filtered], "torch", True, {"alpha": 2.0, "layers": [1, 2, 3]})


def test_vhr_batched_equals_one_at_a_time(tiny, padded, kernel):
    """Left-padded rows (two images, one text-only row that gets no head) equal each prompt alone, and
    the oracle's per-prompt choice."""
    model, processor = tiny
    rows = [kit.row_inputs(padded, r, processor) for r in range(3)]
    oracle, batched = check_vhr(model, padded, rows, kernel, True)
    assert not any(oracle.heads[layer][1].any() for layer in VHR["layers"])
    with mitigated(model, "vhr", kernel=kernel, **VHR):
        singles = [kit.greedy_trace(model, row) for row in rows]
    kit.assert_rows_match(batched, singles)


def test_vhr_heads_are_chosen_again_for_each_prompt(tiny, padded):
    model, processor = tiny
    first, second = kit.row_inputs(padded, 0, processor), kit.row_inputs(padded, 2, processor)
    heads = choose(model, [first, second], True).heads
    assert any(not torch.equal(heads[layer][0], heads[layer][1]) for layer in VHR["layers"])
    with mitigated(model, "vhr", **VHR):
        fresh = kit.greedy_trace(model, second)
    with mitigated(model, "vhr", **VHR):
        kit.greedy_trace(model, first)
        after_other = kit.greedy_trace(model, second)
    assert kit.max_diff(fresh, after_other) == 0.0


def test_vhr_adds_exactly_one_prefill(tiny, padded):
    model, _ = tiny
    bsz, length = padded["input_ids"].shape
    vanilla = kit.count_language_forwards(model, padded)
    handle = apply_mitigation(model, "vhr", **VHR)
    try:
        calls = kit.count_language_forwards(model, padded)
    finally:
        handle.remove()
    assert len(vanilla) == 4 and vanilla[0] == (bsz, length)
    assert calls == [(2 * bsz, length), *vanilla], "one probe prefill of the prompts and their twins"


def test_cli_run_vhr_on_builtin_default():
    result = CliRunner().invoke(app, ["run", "--method", "vhr", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "vanilla" in result.output and "vhr" in result.output
    assert "outlier_filter=True" in result.output


@pytest.mark.parametrize("heads", [4, 32])
def test_head_rule_matches_on_random_outputs(heads):
    """The selection rule alone on many random head outputs, with some heads made outliers in both vhd and
    ta so that the filter fires (a 4-layer model shows it on few layers)."""
    from mitigate.methods.vhr import choose_heads

    gen = torch.Generator().manual_seed(0)
    fired = 0
    for outlier_filter in (True, False):
        oracle = VHROracle(None, 0, alpha=2.0, layers=[], outlier_filter=outlier_filter)
        scale = torch.randn(100, heads, 1, generator=gen).exp()
        o_txt = torch.randn(100, heads, 8, generator=gen) * scale
        o_img = o_txt + torch.randn(100, heads, 8, generator=gen) * scale
        got = choose_heads(o_img, o_txt, outlier_filter)
        for b in range(100):
            mine = oracle._decide(o_img[b], o_txt[b])
            assert got[b].tolist() == mine
            if outlier_filter:
                fired += mine != VHROracle(None, 0, alpha=2.0, layers=[], outlier_filter=False)._decide(
                    o_img[b], o_txt[b]
                )
    assert fired > 5, fired
