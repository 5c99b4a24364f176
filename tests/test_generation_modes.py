"""Generation modes beyond greedy on a fresh cache: chunked prefill and cached prefixes are refused with a
clear error (the methods read the whole prompt at its prefill); beam search works with PAI's contrast."""

import kit
import pytest
import torch

from mitigate import MitigationError, mitigated


def test_chunked_prefill_is_refused(tiny, single):
    model, _ = tiny
    with mitigated(model, "pai"), pytest.raises(MitigationError, match="chunked prefill"):
        model.generate(**single, max_new_tokens=2, do_sample=False, prefill_chunk_size=8)
    # nothing is left behind: the plain model generates as before
    model.generate(**single, max_new_tokens=2, do_sample=False)


def test_prompt_continued_from_a_cached_prefix_is_refused(tiny, single):
    model, _ = tiny
    with mitigated(model, "var-tiny"), torch.no_grad():
        out = model(**single, use_cache=True)
        more = torch.tensor([[5, 6, 7]])
        mask = torch.cat([single["attention_mask"], torch.ones_like(more)], dim=1)
        with pytest.raises(MitigationError, match="cached prompt"):
            model(input_ids=more, attention_mask=mask, cache=out.cache, use_cache=True)


def test_beam_search_with_contrast(tiny, padded):
    """PAI's image-free contrast doubles the batch inside the model; beam search reorders the cache by beam,
    and the image-free rows must follow their prompt rows."""
    model, processor = tiny
    settings = {"max_new_tokens": 4, "do_sample": False}
    with mitigated(model, "pai-released", processor=processor):
        greedy = model.generate(**padded, **settings)
        one_beam = model.generate(**padded, num_beams=1, **settings)
        beams = model.generate(**padded, num_beams=3, num_return_sequences=3, **settings)
        singles = [
            model.generate(
                **kit.row_inputs(padded, r, processor), num_beams=3, num_return_sequences=3, **settings
            )
            for r in range(padded["input_ids"].shape[0])
        ]
    assert torch.equal(greedy, one_beam)
    assert beams.shape[0] == 3 * padded["input_ids"].shape[0]
    new = beams[:, padded["input_ids"].shape[1] :]
    for r, alone in enumerate(singles):  # each prompt's beams equal its beams searched alone
        assert torch.equal(new[3 * r : 3 * r + 3], alone[:, -new.shape[1] :])


def test_decode_after_an_unmitigated_prefill_is_refused(tiny, single):
    """A prompt prefilled inside ``disabled()`` has no plans of its own: decoding it mitigated would apply
    another prompt's plans or none, so it is refused (the first release fell back to plain attention).
    Interleaving a mitigated generation with a disabled one stays possible (each keeps its own cache)."""
    model, _ = tiny
    with mitigated(model, "pai") as handle, torch.no_grad():
        model.generate(**single, max_new_tokens=2, do_sample=False)  # plans of an earlier prompt exist
        with handle.disabled():
            out = model(**single, use_cache=True)
        token = out.logits[:, -1].argmax(-1)[:, None]
        mask = torch.cat([single["attention_mask"], torch.ones_like(token)], dim=1)
        with pytest.raises(MitigationError, match="not prefilled under this mitigation"):
            model(input_ids=token, attention_mask=mask, cache=out.cache, use_cache=True)
        # a whole generation inside the block is plain, and one after it is mitigated again
        with handle.disabled():
            plain = model.generate(**single, max_new_tokens=2, do_sample=False)
        model.generate(**single, max_new_tokens=2, do_sample=False)
    assert torch.equal(plain, model.generate(**single, max_new_tokens=2, do_sample=False))


def test_long_dynamic_generation_grows_the_folded_plans_once(tiny, padded):
    """A dynamic cache outgrows the folded decode plans (prompt + 64 keys): they grow once per step, to
    twice the length (not once per edited layer), and the grown plans give the reference's logits."""
    model, _ = tiny
    settings = {"max_new_tokens": 80, "min_new_tokens": 80, "do_sample": False}
    settings |= {"output_logits": True, "return_dict_in_generate": True}
    prompt = padded["input_ids"].shape[1]
    outputs = {}
    for kernel in ("torch", "reference"):
        with mitigated(model, ["pai", "var-tiny"], kernel=kernel) as handle:
            outputs[kernel] = model.generate(**padded, **settings)
            grown = handle._session.decode_length
    assert grown == 2 * (prompt + 64)
    diff = max(
        float((a - b).abs().max())
        for a, b in zip(outputs["torch"].logits, outputs["reference"].logits, strict=True)
    )
    assert diff <= 1e-4


@pytest.mark.parametrize("spec", ["pai", "gift", "paint"])
def test_generation_without_a_cache_is_refused(tiny, single, spec):
    """Without a cache every step runs the whole sequence again, which the methods would re-plan as a
    longer prompt (GIFT and VHR changed tokens, PAINT failed on a missing vision pass); a single forward
    without a cache stays a prefill, and generation with the cache works after the refusal."""
    model, processor = tiny
    with mitigated(model, spec, processor=processor):
        with pytest.raises(MitigationError, match="use_cache=False"):
            model.generate(**single, max_new_tokens=3, do_sample=False, use_cache=False)
        with torch.no_grad():
            once = model(**single, use_cache=False).logits
            assert torch.equal(once, model(**single, use_cache=False).logits)
        model.generate(**single, max_new_tokens=3, do_sample=False)
