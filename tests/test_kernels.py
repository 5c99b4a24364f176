"""Every kernel path against the eager reference, on random shapes, masks and plans (hypothesis).

Paths: the torch kernel's ``run`` (prefill, chunks, decode with a known position), its folded decode
(``prepare`` + ``decode``, the compiled path) and the reference's own decode (position unknown), each
against the reference run with the position known.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mitigate.kernels import KernelCall, get_kernel, torch_sdpa
from mitigate.kernels.reference import probabilities, reference_attention
from mitigate.kernels.torch_decode import DecodePlan
from mitigate.plan import (
    NEVER,
    GiftRule,
    HeadStage,
    LayerPlan,
    LogitStage,
    Rows,
    VarRule,
    edit_logits,
    fold_logits,
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
#: MITIGATE_TEST_DEVICE=cuda runs the same comparisons on a GPU
DEVICE = torch.device(os.environ.get("MITIGATE_TEST_DEVICE", "cpu"))

KINDS = [
    "scale", "abs", "bias", "var", "gift", "head", "scale+abs", "abs+scale", "bias+abs", "abs+var",
    "scale+var", "abs+gift", "var+gift", "var-zero-gate", "all",
]  # fmt: skip


def padded_mask(pad: list[int], nq: int, nk: int, causal: bool, filled: int | None = None) -> torch.Tensor:
    """bool ``[B, 1, Nq, Nk]`` as ``sdpa_mask`` builds it for a left-padded batch (True = attend); with
    ``filled``, key slots from there on are empty (a static cache)."""
    keys = torch.arange(nk)[None, :] >= torch.tensor(pad)[:, None]  # [B, Nk]
    if filled is not None:
        keys = keys & (torch.arange(nk)[None, :] < filled)
    mask = keys[:, None, None, :].expand(-1, 1, nq, -1)
    if causal:
        last = (filled if filled is not None else nk) - nq
        mask = mask & (torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + last)
    return mask


def random_rows(gen, bsz: int, prompt: int, style: str) -> Rows:
    on = torch.rand(bsz, generator=gen) < 0.8
    on[0] = True
    if style == "all":
        start = torch.zeros(bsz, dtype=torch.long)
    elif style == "last":
        start = torch.full((bsz,), prompt - 1)
    else:
        start = torch.randint(0, prompt, (bsz,), generator=gen)
    return Rows.where(on, start)


def make_plan(gen, kind, bsz, heads, prompt, row_style, per_head) -> LayerPlan:
    hc = heads if per_head else 1
    stages = []

    def per_key(lo, hi, width=hc):
        return lo + (hi - lo) * torch.rand(bsz, width, prompt, generator=gen)

    def rows():
        return random_rows(gen, bsz, prompt, row_style)

    parts = kind.split("+") if kind != "all" else ["scale", "abs", "var", "head"]
    for part in parts:
        if part == "scale":
            stages.append(LogitStage("m", rows(), scale=per_key(0.5, 1.5)))
        elif part == "abs":
            stages.append(LogitStage("m", rows(), abs=per_key(0.0, 0.8)))
        elif part == "bias":
            bias = per_key(-1.0, 1.0)
            if kind == "bias" and prompt > 1:  # a dropped key (a later |z| term would make it NaN)
                bias[..., 0] = float("-inf")
            stages.append(LogitStage("m", rows(), bias=bias))
        elif part in ("var", "var-zero-gate"):
            groups = torch.randint(0, 4, (bsz, prompt), generator=gen)
            thresholds = (0.0, 0.0) if part == "var-zero-gate" else (0.3, 0.05)
            stages.append(VarRule("var", rows(), groups, 0.6, *thresholds))
        elif part == "gift":
            groups = torch.randint(0, 3, (bsz, prompt), generator=gen)
            weights = torch.where(
                groups == GiftRule.IMAGE, 1 + 4 * torch.rand(bsz, prompt, generator=gen), 1.0
            )
            # GIFT edits the prompt's last row (and decode rows): earlier rows see only a few keys, where
            # heads tie on their masses up to rounding and any kernel's choice among them is arbitrary
            stages.append(GiftRule("gift", random_rows(gen, bsz, prompt, "last"), groups, weights, 0.5))
        elif part == "head":
            stages.append(HeadStage("vhr", rows(), 1 + torch.rand(bsz, heads, generator=gen)))
    return LayerPlan.of(3, prompt, stages).to(DEVICE)


@st.composite
def cases(draw):
    return dict(
        bsz=draw(st.integers(1, 4)),
        kv_heads=draw(st.sampled_from([1, 2])),
        ratio=draw(st.sampled_from([1, 2, 4])),
        dim=draw(st.sampled_from([8, 16])),
        prompt=draw(st.integers(2, 20)),
        generated=draw(st.integers(0, 6)),
        phase=draw(st.sampled_from(["prefill", "decode", "static", "chunk"])),
        causal=draw(st.booleans()),
        padded=draw(st.booleans()),
        kind=draw(st.sampled_from(KINDS)),
        rows=draw(st.sampled_from(["all", "last", "suffix"])),
        per_head=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        path=draw(st.sampled_from(["whole", "chunked", "grouped"])),
        seed=draw(st.integers(0, 2**16)),
    )


def run_case(case, monkeypatch, kernels=("torch", "reference")):
    gen = torch.Generator().manual_seed(case["seed"])
    bsz, kvh, dim, prompt = case["bsz"], case["kv_heads"], case["dim"], case["prompt"]
    heads = kvh * case["ratio"]
    phase = case["phase"]
    filled = prompt + (case["generated"] + 1 if phase in ("decode", "static") else 0)  # keys in the cache
    nk = filled + (8 if phase == "static" else 0)  # a static cache has empty slots at the end
    nq = {"prefill": prompt, "decode": 1, "static": 1, "chunk": max(1, prompt // 2)}[phase]
    if phase == "chunk":
        filled = nk = prompt
    causal = case["causal"] or phase == "static"
    q = torch.randn(bsz, heads, nq, dim, generator=gen).to(case["dtype"])
    k = (2 * torch.randn(bsz, kvh, nk, dim, generator=gen)).to(case["dtype"])
    # values at the scale of real attention outputs: 2e-2 in bf16 is under one ulp above |x| = 4
    v = (0.5 * torch.randn(bsz, kvh, nk, dim, generator=gen)).to(case["dtype"])
    pad = torch.randint(0, prompt // 2 + 1, (bsz,), generator=gen).tolist() if case["padded"] else [0] * bsz
    static = phase == "static"
    mask = padded_mask(pad, nq, nk, causal, filled if static else None) if case["padded"] or static else None
    plan = make_plan(gen, case["kind"], bsz, heads, prompt, case["rows"], case["per_head"])
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    mask = mask.to(DEVICE) if mask is not None else None
    if case["path"] in ("chunked", "grouped"):  # few rows per chunk: plain SDPA plus edited rows
        monkeypatch.setattr(torch_sdpa, "MIN_CHUNK_BYTES", 0)
        monkeypatch.setattr(torch_sdpa, "CHUNK_BYTES", 4 * 4 * bsz * heads * nk * 2)
    if case["path"] == "grouped":  # grouped partial states wherever the plan allows them
        monkeypatch.setattr(torch_sdpa, "MAX_CHUNKS", 0)
    past = filled - nq
    valid = (torch.arange(nk)[None, :] >= torch.tensor(pad)[:, None]).to(DEVICE)
    known = KernelCall(scaling=0.3, causal=causal, past=past, key_valid=valid, plain_mask=True)
    expected = reference_attention(q, k, v, mask, plan, known)
    got = {
        f"{name}.run": get_kernel(name).run(q, k, v, mask, plan, known)
        for name in kernels
        if name != "reference"
    }
    if phase in ("decode", "static"):
        unknown = KernelCall(scaling=0.3, causal=causal, past=None)
        for name in kernels:
            kernel = get_kernel(name)
            prepared = kernel.prepare(
                plan, length=nk if static else nk + 3, dtype=q.dtype, num_heads=heads, num_kv_heads=kvh,
                scaling=0.3,
            )  # fmt: skip
            got[f"{name}.decode"] = kernel.decode(q, k, v, mask, prepared, unknown)
    # query rows that see no key at all (left padding) are don't-care: transformers never reads them
    seen = torch.ones(bsz, nq, dtype=torch.bool, device=DEVICE) if mask is None else mask.any(-1)[:, 0]
    for name, out in got.items():
        assert out.shape == expected.shape == (bsz, nq, heads, dim), name
        assert out.dtype == case["dtype"], name
        assert torch.isfinite(out[seen]).all(), name
        err = (out.float() - expected.float())[seen].abs().max().item()
        assert err <= TOL[case["dtype"]], f"{name} {case}: max error {err}"


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_kernels_match_reference(case, monkeypatch):
    with monkeypatch.context() as patch:
        run_case(case, patch)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("phase", ["prefill", "decode", "static"])
def test_every_kind_and_phase(kind, phase, monkeypatch):
    """Deterministic coverage of every plan kind in every phase (hypothesis may miss a combination)."""
    for seed, path in enumerate(["whole", "chunked", "grouped"]):
        case = {
            **dict(bsz=3, kv_heads=2, ratio=2, dim=16, prompt=20, generated=3, phase=phase, causal=True),
            **dict(padded=True, kind=kind, rows="suffix", per_head=seed == 1, dtype=torch.float32),
            **dict(path=path, seed=seed),
        }
        with monkeypatch.context() as patch:
            run_case(case, patch)


def real_size_plan(kind: str, bsz: int, prompt: int, image: slice) -> LayerPlan:
    """One method's stage over LLaVA-like image keys, edited on the prompt's last row and decode rows."""
    rows = Rows.where(torch.ones(bsz, dtype=torch.bool), prompt - 1)
    on_image = torch.zeros(bsz, 1, prompt)
    on_image[..., image] = 1.0
    if kind == "abs":  # PAI at alpha = 1
        stage = LogitStage("pai", rows, abs=on_image)
    elif kind == "scale":
        stage = LogitStage("m", rows, scale=1 + 0.5 * on_image)
    elif kind == "bias":
        stage = LogitStage("m", rows, bias=3 * on_image)
    elif kind == "var":
        groups = torch.where(on_image[:, 0] > 0, VarRule.IMAGE, VarRule.OTHER)
        groups[:, 0] = VarRule.TEXT_SINK
        stage = VarRule("var", rows, groups, 0.6, 0.3, 0.05)
    else:
        groups = torch.where(on_image[:, 0] > 0, GiftRule.IMAGE, GiftRule.QUERY)
        weights = torch.where(groups == GiftRule.IMAGE, 1 + torch.arange(prompt) % 5, 1).float()
        stage = GiftRule("gift", rows, groups, weights, 0.5)
    return LayerPlan.of(3, prompt, [stage]).to(DEVICE)


@pytest.mark.parametrize("kind", ["abs", "scale", "bias", "var", "gift"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_decode_at_real_head_size(kind, dtype):
    """Half-precision decode at LLaVA's head size, with logits up to |z| ~ 16 on a 600-token prompt: an
    edit term held in bf16 is off by up to 1/16 there, which the folded step once let through (0.07 at
    PAI's alpha = 1, against 0.008 for plain bf16 SDPA)."""
    gen = torch.Generator().manual_seed(0)
    bsz, heads, dim, prompt = 1, 8, 128, 600
    nk = prompt + 3
    q = (2 * torch.randn(bsz, heads, 1, dim, generator=gen)).to(dtype).to(DEVICE)
    k = (2 * torch.randn(bsz, heads, nk, dim, generator=gen)).to(dtype).to(DEVICE)
    k[:, :, 0] = 0.3 * q[:, :, 0]  # a sink key, with |z| ~ 14
    v = torch.randn(bsz, heads, nk, dim, generator=gen).to(dtype).to(DEVICE)
    plan = real_size_plan(kind, bsz, prompt, slice(20, 596))
    call = KernelCall(scaling=dim**-0.5, causal=True, past=None)
    expected = reference_attention(q, k, v, None, plan, call).float()
    plain = reference_attention(q, k, v, None, None, call).float()
    assert (expected - plain).abs().max() > 0.1, "the edit must matter at this size"
    kernel = get_kernel("torch")
    prepared = kernel.prepare(
        plan, length=nk + 5, dtype=dtype, num_heads=heads, num_kv_heads=heads, scaling=call.scaling
    )
    assert prepared.general is None, "the folded step"
    out = kernel.decode(q, k, v, None, prepared, call)
    assert out.dtype == dtype
    assert (out.float() - expected).abs().max() <= 1e-2


def test_decode_folds_foldable_plans():
    """The folded path is taken for every single method's kind of plan (else the speed is lost), and the
    plans it cannot fold keep their plan for the materialised path."""
    gen = torch.Generator().manual_seed(0)
    kernel = get_kernel("torch")
    sizes = dict(length=30, dtype=torch.float32, num_heads=4, num_kv_heads=2, scaling=0.3)
    for kind in ("scale", "abs", "var", "gift", "head", "scale+abs", "abs+var", "scale+var"):
        prepared = kernel.prepare(make_plan(gen, kind, 2, 4, 20, "last", False), **sizes)
        assert prepared.general is None, kind
    for kind in ("bias+abs", "var+gift", "var-zero-gate"):
        assert kernel.prepare(make_plan(gen, kind, 2, 4, 20, "last", False), **sizes).general is not None


def test_fold_logits_equals_stages_in_turn():
    gen = torch.Generator().manual_seed(3)
    z = 3 * torch.randn(2, 1, 1, 7, generator=gen)
    on = torch.tensor([True, False])
    stages = [
        LogitStage("a", Rows.where(on, 5), scale=0.5 + torch.rand(2, 1, 7, generator=gen)),
        LogitStage(
            "b", Rows.where(torch.ones(2, dtype=torch.bool), 0), abs=torch.rand(2, 1, 7, generator=gen)
        ),
        LogitStage("c", Rows.where(on, 0), scale=0.5 + torch.rand(2, 1, 7, generator=gen)),
    ]
    want = z
    for stage in stages:
        edited = edit_logits(want, stage.scale, stage.abs, stage.bias)
        want = torch.where(stage.rows.decode_on()[:, None, None, None], edited, want)
    assert torch.allclose(edit_logits(z, *fold_logits(stages)), want, atol=1e-6)
    # a bias followed by an |z| term leaves the family
    with_bias = [LogitStage("a", stages[0].rows, bias=torch.ones(2, 1, 7)), stages[1]]
    assert fold_logits(with_bias) is None


def test_refill_keeps_storage():
    gen = torch.Generator().manual_seed(4)
    kernel = get_kernel("torch")
    sizes = dict(length=24, dtype=torch.float32, num_heads=4, num_kv_heads=2, scaling=0.3)
    first = kernel.prepare(make_plan(gen, "abs+var", 2, 4, 20, "last", False), **sizes)
    second = kernel.prepare(make_plan(gen, "abs+var", 2, 4, 20, "last", False), **sizes)
    storage = first.var.values.data_ptr()
    assert first.refill(second)
    assert first.var.values.data_ptr() == storage
    assert torch.equal(first.var.values, second.var.values) and torch.equal(first.abs, second.abs)
    other = kernel.prepare(make_plan(gen, "var", 2, 4, 20, "last", False), **sizes)
    assert not first.refill(other)  # a different structure is never copied into


def test_reference_without_plan_is_sdpa():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 9, 8, generator=gen)
    k, v = torch.randn(2, 2, 9, 8, generator=gen), torch.randn(2, 2, 9, 8, generator=gen)
    mask = padded_mask([0, 3], 9, 9, True)
    ref = reference_attention(q, k, v, mask, None, KernelCall(scaling=0.35))
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask, scale=0.35
    ).transpose(1, 2)
    valid = torch.tensor([[1] * 9, [0] * 3 + [1] * 6], dtype=torch.bool)  # padded query rows are don't-care
    assert (ref - sdpa)[valid].abs().max() <= 1e-6
    assert ref[1, :3].abs().max() == 0  # fully masked rows give zeros, never NaN


def test_reference_stages_do_what_they_say():
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 1, 1, 4, generator=gen), torch.randn(1, 1, 3, 4, generator=gen)
    z = 0.5 * (q @ k.transpose(-1, -2))
    on = torch.ones(1, dtype=torch.bool)
    call = KernelCall(scaling=0.5, causal=False, past=0)
    stage = LogitStage(
        "m", Rows.where(on, 0), scale=torch.tensor([[[2.0, 1.0, 1.0]]]), abs=torch.tensor([[[0.0, 0.5, 0.0]]])
    )
    expected = torch.softmax(z * torch.tensor([2.0, 1, 1]) + torch.tensor([0, 0.5, 0]) * z.abs(), -1)
    assert torch.allclose(probabilities(q, k, None, LayerPlan.of(0, 3, [stage]), call), expected, atol=1e-7)
    # VAR: key 0 other, key 1 a text sink, key 2 image; the head is image-centric (no image sink)
    rule = VarRule("var", Rows.where(on, 0), torch.tensor([[0, 1, 3]]), 0.5, 0.5, 0.1)
    p = torch.softmax(z, -1)
    got = probabilities(q, k, None, LayerPlan.of(0, 3, [rule]), call)
    moved = 0.5 * p[..., 1]
    want = torch.stack((p[..., 0], p[..., 1] - moved, p[..., 2] + moved), -1)
    if p[..., 2] >= 0.1:
        assert torch.allclose(got, want, atol=1e-7)
    # a row outside the rule's rows is untouched
    off = VarRule("var", Rows.where(on, NEVER), torch.tensor([[0, 1, 3]]), 0.5, 0.5, 0.1)
    assert torch.equal(probabilities(q, k, None, LayerPlan.of(0, 3, [off]), call), p)


def test_grouped_path_is_used_for_many_rows(monkeypatch):
    """A VAR rule on many rows goes through the grouped SDPA path, not materialised rows."""
    calls = []
    monkeypatch.setattr(torch_sdpa, "_materialised", lambda *a, **k: calls.append("rows") or 1 / 0)
    monkeypatch.setattr(torch_sdpa, "MIN_CHUNK_BYTES", 0)
    monkeypatch.setattr(torch_sdpa, "CHUNK_BYTES", 1)  # one row per chunk: 128 chunks would be too many
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 128, 8, generator=gen) for _ in range(3))
    plan = make_plan(gen, "var", 2, 4, 128, "all", False)
    call = KernelCall(scaling=0.5, past=0)
    got = get_kernel("torch").run(q, k, v, None, plan, call)
    assert not calls
    assert (got - reference_attention(q, k, v, None, plan, call)).abs().max() <= 1e-5


def test_decode_plan_covers_generated_keys():
    """Keys generated after the prompt take the identity edits and group 0 (no mask, no error)."""
    plan = make_plan(torch.Generator().manual_seed(5), "abs+var", 1, 2, 6, "all", False)
    prepared = get_kernel("torch").prepare(
        plan, length=16, dtype=torch.float32, num_heads=2, num_kv_heads=2, scaling=0.3
    )
    assert isinstance(prepared, DecodePlan) and prepared.abs.shape[-1] == 16
    assert (prepared.abs[..., 6:] == 0).all() and (prepared.var.values[..., 6:, 0] == 1).all()


@pytest.mark.parametrize("kind", KINDS)
def test_triton_kernel_every_kind(kind, monkeypatch):
    """The fused kernel's executor (interpreted on CPU: TRITON_INTERPRET=1, see conftest) against the
    reference: prefill (run), and decode with a dynamic and a static cache (prepare + decode)."""
    pytest.importorskip("triton")
    from mitigate.kernels import triton_plan

    monkeypatch.setattr(triton_plan, "EAGER_DECODE", "fused")
    for seed, phase in enumerate(["prefill", "decode", "static"]):
        case = {
            **dict(bsz=2, kv_heads=2, ratio=2, dim=16, prompt=20, generated=2, phase=phase, causal=True),
            **dict(padded=True, kind=kind, rows="suffix", per_head=seed == 1, dtype=torch.float32),
            **dict(path="whole", seed=seed),
        }
        with monkeypatch.context() as patch:
            run_case(case, patch, kernels=("triton",))


def test_triton_kernel_takes_the_fused_path(monkeypatch):
    """Plans the fused kernel can express never fall back to the torch kernel."""
    pytest.importorskip("triton")
    from mitigate.kernels import triton_plan

    monkeypatch.setattr(triton_plan, "EAGER_DECODE", "fused")
    monkeypatch.setattr(triton_plan, "torch_attention", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(triton_plan, "torch_decode", lambda *a, **k: 1 / 0)
    for kind in ("abs", "var", "gift", "abs+var", "scale"):
        case = dict(bsz=2, kv_heads=2, ratio=2, dim=16, prompt=20, generated=2, causal=True, padded=True)
        for phase in ("prefill", "decode"):
            case.update(phase=phase, kind=kind, rows="suffix", per_head=False, dtype=torch.float32)
            run_case({**case, "path": "whole", "seed": 1}, monkeypatch, kernels=("triton",))


def test_triton_eager_decode_auto_picks_by_precision(monkeypatch):
    """By default an eager fp32 decode step takes the torch kernel's folded step (fewer launches), and a
    half-precision one the fused kernel (the torch step would cast the cache to fp32 at every step)."""
    pytest.importorskip("triton")
    from mitigate.kernels import triton_plan

    monkeypatch.setattr(triton_plan, "EAGER_DECODE", "auto")
    folded = []
    torch_step = triton_plan.torch_decode
    monkeypatch.setattr(triton_plan, "torch_decode", lambda *a, **k: folded.append(1) or torch_step(*a, **k))
    for dtype, expected in ((torch.float32, 1), (torch.bfloat16, 0)):
        folded.clear()
        case = dict(bsz=2, kv_heads=2, ratio=2, dim=16, prompt=20, generated=2, causal=True, padded=True)
        case.update(phase="decode", kind="abs+var", rows="suffix", per_head=False, dtype=dtype)
        run_case({**case, "path": "whole", "seed": 1}, monkeypatch, kernels=("triton",))
        assert len(folded) == expected, dtype
