"""Every attention method on families whose attention is not LLaVA's, against the independent oracles of
tests/oracles.py run on each family's own eager masks, with every kernel: Qwen2-VL (3-D M-RoPE positions,
``<|vision_start|>``/``<|vision_end|>`` markers), PaliGemma (a prefix-LM: the prompt attends
bidirectionally, ``is_causal=False``), Gemma 3 and Gemma 4 (sliding-window layers whose decode keys are the
last ones only, bidirectional image blocks, Gemma 4's key/value-sharing layers) and Qwen3.5 (hybrid
layers: only the full-attention ones are edited). Greedy ``generate`` on a left-padded batch, every step's
logits within 1e-4; the oracle itself must move the logits, and removal restores them bit for bit. The
Triton kernel (interpreted on CPU, slow) runs one family per method, its fused decode step included."""

from functools import cache

import family_kit as fk
import kit
import pytest
import torch
from oracles import GIFTOracle, PAINTOracle, PAIOracle, VAFOracle, VAROracle, VHROracle, marker_ids

from mitigate import ConfigError, apply_mitigation, mitigated

VAR = {"sink_dims": "auto", "tau": 1.5, "moved_fraction": 0.6, "min_nonsink_ratio": 0.3,
       "min_image_mass": 0.05}  # fmt: skip
PAI = {"alpha": 0.5}
VAF = {"image_scale": 1.5, "system_scale": 0.5}
GIFT = {"alpha": 5.0, "head_fraction": 0.5}
VHR = {"alpha": 2.0, "outlier_filter": False}
#: the layers edited: every full-attention layer from 1 on (Qwen3.5's are 1 and 3)
LAYERS = {"qwen2-vl": [1, 2, 3], "paligemma": [1, 2, 3], "gemma3": [1, 2, 3], "gemma4": [1, 2, 3],
          "qwen3.5": [1, 3]}  # fmt: skip
#: GIFT's saliency layer (a full-attention layer that sees every prompt row: not one of Gemma 4's
#: key/value-sharing layers 2 and 3) and the layers after it that it enhances (sliding ones included)
GIFT_LAYERS = {family: ([1], [layer for layer in layers if layer > 1]) for family, layers in LAYERS.items()}
#: VAR reads every prompt row, so it refuses Gemma 4's key/value-sharing layers (one row at prefill)
VAR_LAYERS = {**LAYERS, "gemma4": [1]}
#: the chat template's generation prompt after the user's text, as the tiny tokenizers spell it
GENERATION_PROMPT = {
    "qwen2-vl": ("<|im_end|>", "<|im_start|>", "assistant"),
    "qwen3.5": ("<|im_end|>", "<|im_start|>", "assistant", "<think>", "</think>"),
    "gemma3": ("<end_of_turn>", "<start_of_turn>", "model"),
    "gemma4": ("<turn|>", "<|turn>", "model"),
    "paligemma": (),
}
METHODS = ["var", "pai", "vaf", "gift", "vhr"]
FAMILIES = list(LAYERS)
KERNELS = [*kit.KERNELS, "triton"]
#: the Triton interpreter is slow: two methods per family, each method on two families (VHR's head scaling
#: never reaches the fused kernel: it runs on the torch kernel's path)
TRITON = {"qwen2-vl": ("var", "gift"), "paligemma": ("pai", "vaf"), "gemma3": ("vaf", "gift"),
          "gemma4": ("pai", "gift"), "qwen3.5": ("var", "pai")}  # fmt: skip
#: families whose prefill masks the fused kernel rebuilds (causal, padding); the others' prefill (prefix-LM,
#: bidirectional image blocks, windows) runs on the torch kernel, their decode rows on the fused one
PLAIN_PREFILL = {"qwen2-vl", "qwen3.5"}


def case(family, method, kernel):
    marks = [pytest.mark.slow] if kernel == "triton" else []
    return pytest.param(family, method, kernel, marks=marks, id=f"{family}-{method}-{kernel}")


CASES = [case(f, m, k) for f in FAMILIES for m in METHODS for k in KERNELS if k != "triton" or m in TRITON[f]]


def params_of(family: str, method: str) -> dict:
    if method == "gift":
        saliency, enhance = GIFT_LAYERS[family]
        return {**GIFT, "saliency_layers": saliency, "enhance_layers": enhance}
    if method == "var":
        return {**VAR, "layers": VAR_LAYERS[family]}
    return {**{"pai": PAI, "vaf": VAF, "vhr": VHR}[method], "layers": LAYERS[family]}


def oracle_of(family: str, method: str, model, processor):
    image, params = model.config.image_token_id, params_of(family, method)
    markers = marker_ids(model.config)
    if method == "var":
        return VAROracle(model, image, mask="eager", **params)
    if method == "pai":
        return PAIOracle(model, image, mask="eager", **params)
    if method == "vaf":
        return VAFOracle(model, image, mask="eager", markers=markers, **params)
    if method == "vhr":
        return VHROracle(model, image, mask="eager", markers=markers, **params)
    bos = processor.tokenizer.bos_token_id
    return GIFTOracle(
        model,
        image,
        mask="eager",
        tokenizer=processor.tokenizer,
        informative=None,
        generation_prompt=GENERATION_PROMPT[family],
        markers=markers,
        not_query=(bos,) if family == "paligemma" else (),  # its <bos> follows the image: text, not query
        **params,
    )


@cache
def expected(family: str, method: str):
    """The family's batch, its vanilla generation, the oracle's, and the oracle's choices (VHR's heads,
    GIFT's query tokens)."""
    model, processor = fk.tiny(family)
    rows = fk.rows_of(fk.BY_NAME[family])
    batch = fk.encode(processor, rows)
    oracle = oracle_of(family, method, model, processor)
    if method == "vhr":
        with oracle:
            oracle.choose([fk.encode(processor, [row]) for row in rows])
    vanilla = fk.generate(model, batch)
    with oracle:
        generated = fk.generate(model, batch)
    choices = {"vhr": lambda: {k: v.tolist() for k, v in oracle.heads.items()}, "gift": lambda: oracle.kept}
    return batch, vanilla, generated, choices.get(method, lambda: None)()


def fused_calls(kernel: str, monkeypatch) -> list[int]:
    """For ``triton``: the query rows of each call of the fused kernel, filled as it runs."""
    rows = []
    if kernel == "triton":
        pytest.importorskip("triton")
        from mitigate.kernels import triton_plan

        monkeypatch.setattr(triton_plan, "EAGER_DECODE", "fused")  # fp32 decode steps in the kernel too
        fused = triton_plan.grouped

        def counted(query, *args, **kwargs):
            rows.append(query.shape[2])
            return fused(query, *args, **kwargs)

        monkeypatch.setattr(triton_plan, "grouped", counted)
    return rows


@pytest.mark.parametrize(("family", "method", "kernel"), CASES)
def test_matches_the_oracle_on_the_familys_own_masks(family, method, kernel, monkeypatch):
    rows = fused_calls(kernel, monkeypatch)
    model, processor = fk.tiny(family)
    batch, vanilla, oracle, choices = expected(family, method)
    extra = {"processor": processor, "pos_filter": False} if method == "gift" else {}
    with mitigated(
        model, method, kernel=kit.use_kernel(kernel, monkeypatch), **extra, **params_of(family, method)
    ) as handle:
        got = fk.generate(model, batch)
        state = handle._session.state[0]
    assert fk.logit_diff(oracle, vanilla) > 1e-3, "the oracle's edit must change the logits"
    if method == "vhr":
        assert {k: v.tolist() for k, v in state["heads"].items()} == choices, "the same heads"
    if method == "gift":
        assert state["kept"] == choices, "the saliency must read the same query tokens"
    assert torch.equal(got.sequences, oracle.sequences)
    assert fk.logit_diff(got, oracle) <= 1e-4
    if kernel == "triton":
        assert 1 in rows, "decode steps must run in the fused kernel"
        assert (max(rows) > 1) == (family in PLAIN_PREFILL), "prefill: the fused kernel where masks are plain"
    after = fk.generate(model, batch)
    assert all(torch.equal(a, b) for a, b in zip(after.logits, vanilla.logits, strict=True))


PAINT = {"alpha": 2.0, "beta": 1.0, "local_ratio": 0.25, "layers": [1, 2, 3]}
PAINT_CASES = [pytest.param("llava", k, id=f"llava-{k}") for k in kit.KERNELS] + [
    pytest.param("internvl", k, marks=[pytest.mark.slow] if k == "triton" else [], id=f"internvl-{k}")
    for k in KERNELS
]


@cache
def paint_expected(family: str):
    model, processor = fk.tiny(family)
    # wide_image(2) has a summary (IQR-outlier) token in both tiny towers; InternVL tiles it (3 tower images)
    batch = fk.encode(processor, [(kit.PROMPTS[0], [fk.wide_image(2)]), (kit.PROMPTS[2], [])])
    oracle = PAINTOracle(model, model.config.image_token_id, **PAINT)
    vanilla = fk.generate(model, batch)
    with oracle:
        generated = fk.generate(model, batch)
    assert any(oracle.local) and any(oracle.summary), "both token streams must be exercised"
    return batch, vanilla, generated, (oracle.local, oracle.summary)


@pytest.mark.parametrize(("family", "kernel"), PAINT_CASES)
def test_paint_matches_the_oracle(family, kernel, monkeypatch):
    """PAINT where the tower has a CLS token: LLaVA, and InternVL, whose projector folds each 2x2 square
    of patches into one token (the CLS attention summed over it) and whose wide image is several tiles."""
    rows = fused_calls(kernel, monkeypatch)
    model, _ = fk.tiny(family)
    batch, vanilla, oracle, sets = paint_expected(family)
    with mitigated(model, "paint", kernel=kit.use_kernel(kernel, monkeypatch), **PAINT) as handle:
        got = fk.generate(model, batch)
        state = handle._session.state[0]
    stored = tuple(
        [set(row.nonzero().squeeze(1).tolist()) for row in state[key]] for key in ("local", "summary")
    )
    assert stored == sets, "the same local and summary tokens"
    assert fk.logit_diff(oracle, vanilla) > 1e-3, "the oracle's edit must change the logits"
    assert torch.equal(got.sequences, oracle.sequences)
    assert fk.logit_diff(got, oracle) <= 1e-4
    if kernel == "triton":
        assert 1 in rows and max(rows) > 1, "prefill and decode in the fused kernel"
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
