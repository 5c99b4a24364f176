"""GIFT on the tiny LLaVA against an independent implementation (tests/oracles.py): the saliency from the
query rows' positive attention change, informative-token filter, head selection, clamp and min-max, then
the last row's enhancement, over prefill plus five decode steps at 1e-4, every kernel; batched equals one
at a time; no extra forward pass; the command line."""

import kit
import pytest
import torch
from oracles import GIFTOracle
from typer.testing import CliRunner

from mitigate import apply_mitigation, mitigated
from mitigate.cli import app

GIFT = {"enhance_layers": [2, 3], "alpha": 5.0, "head_fraction": 0.5}
#: the informative words (nouns, proper nouns, verbs, adjectives, adverbs, numbers) of the prompts used
#: here, by hand: "describe this image in detail ." and "is there a red circle in the image ?"
INFORMATIVE = {"describe", "image", "detail", "red", "circle"}


@pytest.fixture(params=kit.KERNELS)
def kernel(request, monkeypatch):
    return kit.use_kernel(request.param, monkeypatch)


def make_oracle(model, processor, saliency_layers, pos_filter, params=GIFT):
    return GIFTOracle(
        model,
        model.config.image_token_id,
        tokenizer=processor.tokenizer,
        saliency_layers=saliency_layers,
        informative=INFORMATIVE if pos_filter else None,
        **params,
    )


def check_gift(model, processor, inputs, kernel, saliency_layers, pos_filter, params=GIFT):
    oracle = make_oracle(model, processor, saliency_layers, pos_filter, params)
    vanilla = kit.greedy_trace(model, inputs)
    with oracle:
        expected = kit.greedy_trace(model, inputs)
    got, state, after = kit.mitigated_trace(
        model,
        inputs,
        "gift",
        kernel=kernel,
        processor=processor,
        saliency_layers=saliency_layers,
        pos_filter=pos_filter,
        **params,
    )
    assert state[0]["kept"] == oracle.kept, "the saliency must read the same query tokens"
    assert any(s is not None for s in oracle.saliency), "some row must be enhanced"
    valid = inputs["attention_mask"].bool()
    assert kit.max_diff(expected, vanilla, valid) > 1e-3, "the edit must change the logits"
    assert kit.max_diff(got, expected, valid) <= 1e-4
    kit.assert_identical(after, vanilla)
    return oracle, got


@pytest.mark.parametrize("pos_filter", [True, False], ids=["pos", "all-tokens"])
@pytest.mark.parametrize("saliency_layers", [[1], [0, 1]], ids=["sal1", "sal01"])
def test_gift_matches_independent_formula(tiny, single, kernel, pos_filter, saliency_layers):
    model, processor = tiny
    oracle, _ = check_gift(model, processor, single, kernel, saliency_layers, pos_filter)
    words = processor.tokenizer.convert_ids_to_tokens(single["input_ids"][0, oracle.kept[0]].tolist())
    if pos_filter:
        assert words == ["describe", "image", "detail"]
    else:
        assert words == ["describe", "this", "image", "in", "detail", "."]


def test_gift_filter_changes_the_saliency(tiny, single):
    model, processor = tiny
    maps = []
    for pos_filter in (True, False):
        oracle = make_oracle(model, processor, [1], pos_filter)
        with oracle:
            kit.greedy_trace(model, single, steps=1)
        maps.append(oracle.saliency[0])
    assert (maps[0] - maps[1]).abs().max() > 1e-2


def test_gift_default_preset_matches_formula(tiny, single):
    """The shipped preset on a 4-layer model: saliency layer 1, enhance 2..3 (11 and 12..22 of 32), alpha 5,
    half the heads, the informative filter on."""
    model, processor = tiny
    with mitigated(model, "gift", processor=processor) as handle:
        params = handle.methods["gift"]
    assert (params["saliency_layers"], params["enhance_layers"]) == ([1], [2, 3])
    assert (params["alpha"], params["head_fraction"], params["pos_filter"]) == (5.0, 0.5, True)
    oracle = make_oracle(model, processor, [1], True)
    vanilla = kit.greedy_trace(model, single)
    with oracle:
        expected = kit.greedy_trace(model, single)
    with mitigated(model, "gift", processor=processor):
        got = kit.greedy_trace(model, single)
    assert kit.max_diff(expected, vanilla) > 1e-3
    assert kit.max_diff(got, expected) <= 1e-4


def test_gift_batched_equals_one_at_a_time(tiny, padded, kernel):
    """Left-padded rows (two images, one text-only row) equal each prompt alone, and the oracle."""
    model, processor = tiny
    _, batched = check_gift(model, processor, padded, kernel, [0, 1], True)
    params = {"saliency_layers": [0, 1], "pos_filter": True, **GIFT}
    rows = [kit.row_inputs(padded, r, processor) for r in range(3)]
    with mitigated(model, "gift", kernel=kernel, processor=processor, **params) as handle:
        singles = [kit.greedy_trace(model, row) for row in rows]
        assert handle._session.state[0]["enhanced"].tolist() == [True]
    kit.assert_rows_match(batched, singles)


def test_gift_without_informative_tokens_is_untouched(tiny):
    """A query with no informative word gets no enhancement (and no NaN)."""
    model, processor = tiny
    inputs = kit.batch(processor, ["Is it this?"], [kit.image(0)])
    before = kit.greedy_trace(model, inputs)
    with mitigated(model, "gift", processor=processor, saliency_layers=[1], pos_filter=True, **GIFT):
        after = kit.greedy_trace(model, inputs)
    assert torch.isfinite(after.prefill).all()
    assert kit.max_diff(before, after) <= 1e-5


def test_gift_adds_no_forward_pass(tiny, padded):
    model, processor = tiny
    vanilla = kit.count_language_forwards(model, padded)
    handle = apply_mitigation(model, "gift", kernel="torch", processor=processor, saliency_layers=[1], **GIFT)
    try:
        with handle.recording() as stats:
            mitigated_calls = kit.count_language_forwards(model, padded)
    finally:
        handle.remove()
    assert stats.summary()["gift"], "the edit must run"
    assert len(vanilla) == 4
    assert mitigated_calls == vanilla


def test_cli_run_gift_on_builtin_default():
    result = CliRunner().invoke(app, ["run", "--method", "gift", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "vanilla" in result.output and "gift" in result.output
    assert "saliency_layers=[1]" in result.output


def test_query_span_drops_the_template_suffix_however_it_is_tokenised(tiny, monkeypatch):
    """GIFT's query ends before the chat template's generation suffix (`` ASSISTANT:``). Found by its
    token ids alone, a tokeniser that cuts the suffix otherwise inside the prompt than on its own (a
    SentencePiece word-start marker) would leave it in the query, where "assistant" reads as a noun; the
    suffix is then found in the decoded text."""
    from mitigate.methods import text

    _, processor = tiny
    inputs = kit.batch(processor, [kit.PROMPTS[1]], [kit.image(0)])
    ids = inputs["input_ids"]
    query = torch.zeros_like(ids, dtype=torch.bool)
    image = int((ids[0] == processor.tokenizer.convert_tokens_to_ids("<image>")).nonzero().max())
    query[0, image + 1 :] = True
    suffix = text._suffix_text(processor)
    assert suffix.strip(), "the tiny chat template has a generation suffix"
    expected = text.query_spans(ids, query, processor)[0]
    words = processor.tokenizer.decode(ids[0, expected[0] : expected[1] + 1].tolist())
    assert suffix.strip() not in words and words.strip()
    # the same suffix as a standalone tokenisation that does not match the prompt's ids
    text._suffix_ids.cache_clear()
    monkeypatch.setattr(text, "_suffix_ids", lambda tokenizer, owner: (0, *ids[0, -3:].tolist()))
    assert text.query_spans(ids, query, processor)[0] == expected
