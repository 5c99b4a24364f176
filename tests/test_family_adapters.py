"""What each family's adapter knows, checked against the family itself: image spans and their markers,
the image-free twin (it must equal the prompt the chat template writes without the image), the twin's
positions and masks end to end (PAI's contrast against the two prompts generated separately), Qwen's
``rope_deltas`` across an extra prefill, Gemma 4's one-row prefill in its key/value-sharing layers,
InternVL's CLS-to-token map, and the inputs and models that are refused."""

from __future__ import annotations

import family_kit as fk
import pytest
import torch

from mitigate import ConfigError, MitigationError, UnsupportedModelError, apply_mitigation, mitigated
from mitigate.patches.adapters import find_adapter

#: families whose processor takes a row without an image (the twin can be compared with it)
TEXT_ROWS = [f for f in fk.FAMILIES if f.text_only_rows]


def layout_of(model, batch):
    return find_adapter(model).layout(batch["input_ids"], None, batch["attention_mask"])


@pytest.mark.parametrize("images", [1, 2], ids=["one-image", "two-images"])
@pytest.mark.parametrize("family", TEXT_ROWS, ids=[f.name for f in TEXT_ROWS])
def test_twin_is_the_text_only_prompt(family, images):
    """Dropping the adapter's image span from a prompt gives exactly the chat template's prompt without the
    image; the span's markers are neither prefix nor query."""
    if family.needs:
        pytest.importorskip(family.needs)
    model, processor = fk.tiny(family.name)
    pictures = [fk.wide_image(), fk.small_image()][:images]
    with_image = fk.encode(processor, [(fk.kit.PROMPTS[1], pictures)])
    text_only = fk.encode(processor, [(fk.kit.PROMPTS[1], [])])
    layout = layout_of(model, with_image)
    ids = with_image["input_ids"][0]
    span = layout.image_span[0]
    assert torch.equal(ids[~span], text_only["input_ids"][0])
    markers = span & ~layout.image[0]
    assert not (markers & (layout.prefix[0] | layout.query[0])).any()
    if images == 1:  # one image: every token is prefix, span or query
        parts = layout.prefix[0].int() + span.int() + layout.query[0].int()
        assert parts.tolist() == [1] * ids.shape[0]


def test_paligemma_twin_keeps_bos_and_the_query_leaves_it_out():
    model, processor = fk.tiny("paligemma")
    batch = fk.encode(processor, [(fk.kit.PROMPTS[1], [fk.small_image()])])
    layout = layout_of(model, batch)
    ids = batch["input_ids"][0]
    bos = processor.tokenizer.bos_token_id
    twin = ids[~layout.image_span[0]]
    assert twin[0] == bos and (twin != model.config.image_token_id).all()
    assert not layout.query[0][ids == bos].any()
    assert layout.query[0].sum() == twin.shape[0] - 1


def test_idefics3_span_covers_the_tile_row_newlines():
    """The tiny tokenizer drops newlines; the real one keeps the one after each row of tiles and the two
    before the global view: they belong to the image, user text after the closing marker does not."""
    model, _ = fk.tiny("idefics3")
    img, fake, r11, r12, glob, nl, word = model.config.image_token_id, 101, 102, 103, 104, 105, 106
    run = [img] * 3
    ids = [word, fake, r11, *run, fake, r12, *run, nl, nl, fake, glob, *run, fake, nl, word, word]
    inputs = torch.tensor([ids])
    layout = find_adapter(model).layout(inputs, None, torch.ones_like(inputs))
    span = layout.image_span[0].tolist()
    first, last = 1, len(ids) - 4
    assert span == [first <= i <= last for i in range(len(ids))]


def contrast_parts(model, inputs, steps: int, forced: list[int]):
    """Vanilla raw logits of ``inputs`` with the given tokens forced at each step."""

    def allowed(batch_id, sequence):
        return [forced[min(len(sequence) - inputs["input_ids"].shape[1], len(forced) - 1)]]

    out = model.generate(
        **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
        return_dict_in_generate=True, prefix_allowed_tokens_fn=allowed,
    )  # fmt: skip
    return [torch.log_softmax(x[0].float(), -1) for x in out.logits]


def text_only_inputs(family, processor, prompt, batch, model):
    if family.text_only_rows:
        return fk.encode(processor, [(prompt, [])])
    ids = batch["input_ids"][0]
    keep = ids != model.config.image_token_id  # PaliGemma: no markers; <bos> stays
    twin = ids[keep][None]
    zeros, ones = torch.zeros_like(twin), torch.ones_like(twin)
    return {"input_ids": twin, "attention_mask": ones, "token_type_ids": zeros}


CONTRAST = [f for f in fk.FAMILIES if f.name != "paligemma2"]  # refused


@pytest.mark.slow
@pytest.mark.parametrize("family", CONTRAST, ids=[f.name for f in CONTRAST])
def test_contrast_equals_the_prompt_and_its_text_only_prompt(family):
    """PAI's contrast with no logit edit (alpha 0): each step's scores are
    ``gamma*(log p - log q) + log q`` of the prompt and of the prompt the template writes without the image,
    each generated on its own with the same tokens: the twin's tokens, positions (M-RoPE, PaliGemma's count
    from 1) and masks (prefix-LM, image blocks) are the family's."""
    if family.needs:
        pytest.importorskip(family.needs)
    model, processor = fk.tiny(family.name)
    prompt = fk.kit.PROMPTS[0]
    batch = fk.encode(processor, [(prompt, [fk.wide_image()])])
    gamma, steps = 1.5, 3
    with mitigated(model, {"pai": {"alpha": 0.0, "cfg_gamma": gamma}}):
        out = fk.generate(model, batch, steps)
    forced = out.sequences[0, -steps:].tolist()
    cond = contrast_parts(model, batch, steps, forced)
    uncond = contrast_parts(model, text_only_inputs(family, processor, prompt, batch, model), steps, forced)
    for got, p, q in zip(out.logits, cond, uncond, strict=True):
        assert (got[0].float() - (gamma * (p - q) + q)).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["qwen2-vl", "qwen3.5"])
def test_qwen_probe_keeps_rope_deltas(name):
    """A bare forward stores per-row M-RoPE offsets on ``model.model.rope_deltas`` for its later cached
    steps; VHR's probe (prompt + twins, another batch size) must leave them as the real prefill set them."""
    model, processor = fk.tiny(name)
    batch = fk.encode(processor, fk.rows_of(fk.BY_NAME[name]))
    with torch.no_grad():
        model(**batch)
        expected = model.model.rope_deltas.clone()
        model.model.rope_deltas = None
        with mitigated(model, "vhr"):
            model(**batch)
    assert torch.equal(model.model.rope_deltas, expected)


def test_qwen_without_mm_token_type_ids_is_refused():
    model, processor = fk.tiny("qwen2.5-vl")
    batch = fk.encode(processor, fk.rows_of(fk.BY_NAME["qwen2.5-vl"]))
    batch.pop("mm_token_type_ids")
    with mitigated(model, "pai"), pytest.raises(MitigationError, match="mm_token_type_ids"):
        fk.generate(model, batch)


def test_gemma4_shared_layers_get_the_last_row_at_prefill():
    """Under generate, Gemma 4's key/value-sharing layers (2 and 3 of the tiny model) see one query row at
    prefill; last-row edits run there, methods that read every row are kept off them."""
    model, processor = fk.tiny("gemma4")
    batch = fk.encode(processor, fk.rows_of(fk.BY_NAME["gemma4"]))
    rows: list[int] = []
    layer = model.get_decoder().layers[3].self_attn
    hook = layer.register_forward_pre_hook(lambda m, args, kw: rows.append(kw["hidden_states"].shape[1]),
                                           with_kwargs=True)  # fmt: skip
    try:
        vanilla = fk.generate(model, batch, 1)
        with mitigated(model, "pai", layers=[3]):
            edited = fk.generate(model, batch, 1)
    finally:
        hook.remove()
    assert rows == [1, 1]
    assert fk.logit_diff(edited, vanilla) > 1e-3
    with pytest.raises(ConfigError, match=r"var: layers \[2\].*last row.*\[0, 1\]"):
        apply_mitigation(model, "var", layers=[2])
    with mitigated(model, "var") as handle:
        assert handle.methods["var"]["layers"] == [1]


def test_internvl_cls_attention_per_token_is_the_sum_over_its_2x2_patches():
    model, _ = fk.tiny("internvl")
    adapter = find_adapter(model)
    side = 8  # the tiny tower: 32 px / 4 px patches
    cls = torch.rand(3, 2, 1 + side * side)
    tokens = adapter.cls_to_features(cls)
    grid = cls[..., 1:].reshape(3, 2, side // 2, 2, side // 2, 2)  # (row block, row, col block, col)
    expected = grid.sum(dim=(3, 5)).reshape(3, 2, -1)
    assert torch.allclose(tokens, expected)


def test_internvl_paint_sets_come_from_its_tiles():
    """PAINT on InternVL: the CLS row captured in the tower, folded per image token, over every tile."""
    from oracles import paint_sets

    model, processor = fk.tiny("internvl")
    batch = fk.encode(processor, [(fk.kit.PROMPTS[1], [fk.wide_image()])])
    with mitigated(model, "paint") as handle:
        fk.generate(model, batch, 1)
        state = handle._session.state[0]
        local, summary = state["local"], state["summary"]
    previous = model.config.vision_config._attn_implementation
    model.set_attn_implementation({"vision_config": "eager"})
    try:
        with torch.no_grad():
            attentions = model.model.vision_tower(batch["pixel_values"], output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"vision_config": previous})
    first, last = (a[:, :, 0].sum(1) for a in (attentions[0], attentions[-1]))  # CLS row, over heads
    fold = find_adapter(model).cls_to_features
    want_local, want_summary = paint_sets(fold(first[:, None])[:, 0], fold(last[:, None])[:, 0], 0.25)
    assert local.shape[0] == batch["pixel_values"].shape[0] > 1  # tiles and the thumbnail
    assert [set(r.nonzero().squeeze(1).tolist()) for r in local] == want_local
    assert [set(r.nonzero().squeeze(1).tolist()) for r in summary] == want_summary


def test_paligemma2_soft_capping_is_refused():
    model, _ = fk.tiny("paligemma2")
    with pytest.raises(UnsupportedModelError, match="soft-caps attention logits"):
        apply_mitigation(model, "vhr")
    assert model.config.get_text_config()._attn_implementation == "eager"


def test_video_tokens_are_refused():
    """The methods and the twins know image spans only: a prompt with video tokens is refused at prefill,
    never run as if the video were text."""
    model, processor = fk.tiny("qwen2-vl")
    batch = fk.encode(processor, [(fk.kit.PROMPTS[1], [])])
    batch["input_ids"][0, 3] = model.config.video_token_id
    with mitigated(model, "pai"), pytest.raises(MitigationError, match="video tokens"):
        fk.generate(model, batch, 1)
