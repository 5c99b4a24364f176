"""PAINT on the tiny LLaVA against an independent implementation: the CLS attention recomputed from the
vision tower's weights, the local/summary token sets derived here (top share; Q3 + 1.5 IQR with numpy
percentiles; local minus summary) and compared with the sets the method stored, then the last row's
``alpha*|z|`` / ``beta*|z|`` logit boosts over prefill plus five decode steps at 1e-4, every kernel."""

import kit
import pytest
import torch
from oracles import PAINTOracle, paint_sets, vision_cls_attention

from mitigate import mitigated

PAINT = {"alpha": 2.0, "beta": 1.0, "local_ratio": 0.25, "layers": [1, 2, 3]}


@pytest.fixture(params=kit.KERNELS)
def kernel(request, monkeypatch):
    return kit.use_kernel(request.param, monkeypatch)


@pytest.fixture
def outlier_image(tiny):
    """A prompt whose image has a summary (IQR-outlier) patch in the tiny tower (image 0 has none)."""
    _, processor = tiny
    return kit.batch(processor, [kit.PROMPTS[1]], [kit.image(2)])


def stored_sets(state) -> tuple[list[set[int]], list[set[int]]]:
    as_sets = [[set(row.nonzero().squeeze(1).tolist()) for row in state[key]] for key in ("local", "summary")]
    return as_sets[0], as_sets[1]


def check_paint(model, inputs, kernel, params=PAINT):
    oracle = PAINTOracle(model, model.config.image_token_id, **params)
    vanilla = kit.greedy_trace(model, inputs)
    with oracle:
        expected = kit.greedy_trace(model, inputs)
    got, state, after = kit.mitigated_trace(model, inputs, "paint", kernel=kernel, **params)
    assert any(oracle.local) and any(oracle.summary), "both token streams must be exercised"
    assert stored_sets(state[0]) == (oracle.local, oracle.summary)
    valid = inputs["attention_mask"].bool()
    assert kit.max_diff(expected, vanilla, valid) > 1e-3, "the edit must change the logits"
    assert kit.max_diff(got, expected, valid) <= 1e-4
    kit.assert_identical(after, vanilla)
    assert model.config.vision_config._attn_implementation == "sdpa"
    return oracle


def test_paint_matches_independent_formula(tiny, outlier_image, kernel):
    model, _ = tiny
    check_paint(model, outlier_image, kernel)


def test_paint_sets_from_first_and_feature_layer(tiny, outlier_image):
    """With features from the tower's last layer (vision_feature_layer -1), local still comes from layer 0
    and summary from layer 1; the sets differ from taking both from layer 0."""
    model, _ = tiny
    model.config.vision_feature_layer = -1
    oracle = check_paint(model, outlier_image, "torch")
    first, last = vision_cls_attention(model, outlier_image["pixel_values"])
    assert (oracle.local, oracle.summary) != paint_sets(first, first, PAINT["local_ratio"])
    assert oracle.summary != paint_sets(first, first, PAINT["local_ratio"])[1]
    assert (oracle.local, oracle.summary) == paint_sets(first, last, PAINT["local_ratio"])


def test_paint_padded_batch_matches_formula(tiny, padded, kernel):
    """Two images in different rows (patch r of image k maps to that row's r-th image token) and a
    text-only row, left-padded."""
    model, _ = tiny
    oracle = check_paint(model, padded, kernel)
    assert len(oracle.local) == 2


def test_paint_default_preset_matches_formula(tiny, outlier_image):
    model, _ = tiny
    with mitigated(model, "paint") as handle:
        params = handle.methods["paint"]
    assert params == {"alpha": 0.7, "beta": 0.4, "local_ratio": 0.25, "layers": [2, 3]}
    check_paint(model, outlier_image, "torch", params)


def test_paint_generate_equals_oracle(tiny, padded):
    """Through ``model.generate``, whose vision tower call order differs from a plain forward."""
    model, processor = tiny
    oracle = PAINTOracle(model, model.config.image_token_id, **PAINT)
    with oracle:
        expected = kit.next_token_logits(kit.greedy_trace(model, padded, steps=3))
    with mitigated(model, "paint", **PAINT):
        got = kit.generate_logits(model, padded, len(expected))
        second = kit.generate_logits(model, kit.row_inputs(padded, 0, processor), len(expected))
    for a, b in zip(got, expected, strict=True):
        assert (a - b).abs().max() <= 1e-4
    for a, b in zip(second, expected, strict=True):  # a later prompt gets its own image's sets
        assert (a[0] - b[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("local_ratio", [0.25, 0.3, 0.6])
def test_token_sets_match_on_random_attention(local_ratio):
    """The set rule alone, on many heavy-tailed random CLS maps (576 patches as in LLaVA-1.5, and 16):
    the tiny tower's few images cannot tell a fence of 1.5 IQR from a nearby one, these can."""
    from mitigate.methods.paint import token_sets

    gen = torch.Generator().manual_seed(0)
    for patches in (16, 576):
        first = torch.randn(64, patches, generator=gen).exp()
        feature = torch.randn(64, patches, generator=gen).mul(0.7).exp()
        local, summary = token_sets(first, feature, local_ratio)
        mine = paint_sets(first, feature, local_ratio)
        assert stored_sets({"local": local, "summary": summary}) == mine
        assert sum(map(len, mine[1])) > 0
