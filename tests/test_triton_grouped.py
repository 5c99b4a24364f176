"""The fused grouped-state Triton kernel against its torch reference (interpreted on CPU, real on a GPU).

Shapes are small: the interpreter costs ~10 ms per (program x key tile), and its tiles are 64 x 64, so a
text prefix of 70 keys puts a group's first key after a row's first tile (KERNELS.md lesson 1).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from mitigate.kernels import triton_grouped as tg
from mitigate.kernels.grouped_reference import grouped_reference, merge_sets

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL_O = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
TOL_LSE = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}
INF = math.inf


@pytest.fixture(autouse=True)
def _fixed_configs(monkeypatch):
    # On a GPU, autotuning every constexpr combination would dominate the run; one test below autotunes.
    monkeypatch.setenv("MITIGATE_TRITON_AUTOTUNE", "0")


def qkv(batch, heads, kv_heads, nq, nk, dim=32, dim_v=None, dtype=torch.float32, seed=0, layout="bhnd"):
    gen = torch.Generator().manual_seed(seed)

    def draw(h, n, d):
        if layout == "bnhd":  # transformers' projections are [B, N, H, D] before the transpose
            return torch.randn(batch, n, h, d, generator=gen).to(DEVICE, dtype).transpose(1, 2)
        return torch.randn(batch, h, n, d, generator=gen).to(DEVICE, dtype)

    return draw(heads, nq, dim), draw(kv_heads, nk, dim), draw(kv_heads, nk, dim_v or dim)


def vlm_groups(batch, nk, prefix=70, image=40, sinks=(3, 17, 31), num_groups=3):
    """text prefix (0) | image (1) with sparse sinks (2) | text after (0, or 3 when G = 4)."""
    g = torch.zeros(batch, nk, dtype=torch.long)
    g[:, prefix : prefix + image] = 1
    for s in sinks:
        if prefix + s < min(nk, prefix + image):
            g[:, prefix + s] = 2
    if num_groups == 4:
        g[:, prefix + image :] = 3
    return g.to(DEVICE)


def rand(*shape, low=0.0, high=1.0, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(*shape, generator=gen)).to(DEVICE)


def check(q, k, v, **kw):
    """Kernel == reference: o within TOL_O, finite lse within TOL_LSE, the same empty sets (o = 0)."""
    o, lse = tg.grouped_attention(q, k, v, **kw)
    ref_o, ref_lse = grouped_reference(q, k, v, **kw)
    assert o.shape == ref_o.shape and lse.shape == ref_lse.shape
    assert o.dtype == lse.dtype == torch.float32
    assert torch.isfinite(o).all(), "NaN/inf in o"
    assert not lse.isnan().any() and not (lse == INF).any(), "NaN/+inf in lse"
    empty = ref_lse == -INF
    assert torch.equal(lse == -INF, empty), "empty sets differ"
    assert (o[empty] == 0).all()
    err_o = (o - ref_o).abs().max().item()
    assert err_o <= TOL_O[q.dtype], f"o differs by {err_o}"
    if (~empty).any():
        err_lse = (lse - ref_lse)[~empty].abs().max().item()
        assert err_lse <= TOL_LSE[q.dtype], f"lse differs by {err_lse}"
    return o, lse, empty


# --- masks and shapes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq", [130, 40, 3, 1], ids=["prefill", "continue", "decode3", "decode1"])
def test_masks_and_row_counts(causal, nq):
    q, k, v = qkv(2, 2, 2, nq, 130)
    check(q, k, v, scaling=32**-0.5, causal=causal)


def test_absent_group_and_group_after_first_tile():
    """Group 1 starts at key 70 (after the 64-key first tile), group 3 never appears."""
    q, k, v = qkv(1, 2, 2, 130, 130, seed=2)
    g = torch.zeros(1, 130, dtype=torch.long, device=DEVICE)
    g[:, 70:] = 1
    g[:, 100:105] = 2
    bias = torch.zeros(1, 1, 130, device=DEVICE)
    bias[..., 70:] = 4.0  # group 1 outweighs the prefix once it appears
    _, _, empty = check(q, k, v, scaling=32**-0.5, groups=g, num_groups=4, logit_bias=bias)
    assert empty[..., 3].all()  # absent group: lse -inf, o 0
    assert empty[0, :70, :, 1].all() and not empty[0, 70:, :, 1].any()  # causal rows before group 1


@pytest.mark.parametrize("nq", [40, 1], ids=["prefill", "decode"])
def test_left_padding_and_fully_masked_rows(nq):
    q, k, v = qkv(2, 2, 2, nq, 100, seed=3)
    valid = torch.ones(2, 100, dtype=torch.bool, device=DEVICE)
    valid[1, :75] = False  # row 1 left-padded: its first query rows (prefill) see no key at all
    valid[0, 10] = False
    o, _, empty = check(q, k, v, scaling=0.2, key_valid=valid, groups=vlm_groups(2, 100), num_groups=3)
    if nq == 40:
        assert empty[1, :15].all() and (o[1, :15] == 0).all()


def test_dropped_keys_by_group():
    q, k, v = qkv(2, 2, 2, 70, 70, seed=4)
    g = torch.randint(-1, 2, (2, 70), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    check(q, k, v, scaling=0.2, groups=g, num_groups=2)


@pytest.mark.parametrize("ratio", [1, 2, 4])
@pytest.mark.parametrize("nq", [90, 3, 1], ids=["prefill", "decode3", "decode1"])
def test_gqa(ratio, nq):
    q, k, v = qkv(1, 4, 4 // ratio, nq, 90, seed=5)
    scale = rand(1, 4, 90, low=0.5, high=1.5)  # per head: packed decode rows read their own head
    check(q, k, v, scaling=0.2, groups=vlm_groups(1, 90, image=15), num_groups=3, logit_scale=scale)


@pytest.mark.parametrize("dim,dim_v", [(16, 16), (64, 64), (80, 80), (96, 96), (256, 256), (80, 48)])
@pytest.mark.parametrize("nq", [70, 1], ids=["prefill", "decode"])
def test_head_dims(dim, dim_v, nq):
    q, k, v = qkv(1, 2, 1, nq, 70, dim=dim, dim_v=dim_v, seed=6)
    check(q, k, v, scaling=dim**-0.5, groups=vlm_groups(1, 70, prefix=20), num_groups=3)


def test_strided_inputs():
    """transformers' layout: [B, N, H, D] tensors transposed to [B, H, N, D], not contiguous."""
    q, k, v = qkv(2, 4, 2, 70, 70, layout="bnhd", seed=7)
    assert not q.is_contiguous()
    check(q, k, v, scaling=0.2, groups=vlm_groups(2, 70, prefix=20), num_groups=3)
    check(q[:, :, -1:], k, v, scaling=0.2, groups=vlm_groups(2, 70, prefix=20), num_groups=3)


# --- logit edits ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("edit", ["s", "a", "b", "sab"])
@pytest.mark.parametrize("hc", ["1", "H"])
@pytest.mark.parametrize("nq", [90, 1], ids=["prefill", "decode"])
def test_logit_edits(edit, hc, nq):
    heads = 4
    q, k, v = qkv(2, heads, 2, nq, 90, seed=8)
    h = 1 if hc == "1" else heads
    kw = {}
    if "s" in edit:
        kw["logit_scale"] = rand(2, h, 90, low=-0.5, high=2.0, seed=11)
    if "a" in edit:
        kw["logit_abs"] = rand(2, h, 90, low=-0.5, high=1.0, seed=12)
    if "b" in edit:
        kw["logit_bias"] = rand(2, h, 90, low=-3.0, high=3.0, seed=13)
    check(q, k, v, scaling=0.3, groups=vlm_groups(2, 90, prefix=30), num_groups=3, **kw)


def test_mixed_coefficient_head_counts():
    q, k, v = qkv(1, 4, 1, 1, 90, seed=9)
    kw = dict(
        logit_scale=rand(1, 4, 90, low=0.5, high=2.0), logit_abs=rand(1, 1, 90), logit_bias=rand(1, 4, 90)
    )
    check(q, k, v, scaling=0.3, groups=vlm_groups(1, 90, prefix=30), num_groups=3, **kw)


@pytest.mark.parametrize("nq", [90, 1], ids=["prefill", "decode"])
def test_minus_inf_bias(nq):
    q, k, v = qkv(2, 2, 2, nq, 90, seed=10)
    g = vlm_groups(2, 90, prefix=30)
    bias = rand(2, 2, 90, low=-1, high=1)
    bias[:, :, ::7] = -INF
    bias[:, 0][g[:, None, :].expand(2, 2, 90)[:, 0] == 2] = -INF  # head 0: every sink dropped
    _, _, empty = check(q, k, v, scaling=0.3, groups=g, num_groups=3, logit_bias=bias)
    assert empty[:, :, 0, 2].all()


@pytest.mark.parametrize("nq", [90, 3], ids=["prefill", "decode3"])
def test_edit_row_start(nq):
    q, k, v = qkv(3, 2, 2, nq, 90, seed=14)
    kw = dict(logit_scale=rand(3, 2, 90, low=0.2, high=3.0), logit_bias=rand(3, 1, 90, low=-2, high=2))
    start = torch.tensor([60, 2**40, 89], device=DEVICE)  # mid-prompt, no row edited, the last row only
    o, lse, _ = check(
        q, k, v, scaling=0.3, groups=vlm_groups(3, 90, prefix=30), num_groups=3, edit_row_start=start, **kw
    )
    plain_o, plain_lse = tg.grouped_attention(
        q, k, v, scaling=0.3, groups=vlm_groups(3, 90, prefix=30), num_groups=3
    )
    assert torch.equal(lse[1], plain_lse[1])  # "no row edited" is the unedited call
    assert not torch.allclose(o[2, -1], plain_o[2, -1])  # the edit does act where asked


@pytest.mark.parametrize("nq", [90, 1], ids=["prefill", "decode"])
def test_extra_set(nq):
    q, k, v = qkv(2, 2, 1, nq, 90, seed=15)
    g = vlm_groups(2, 90, prefix=30)
    extra = rand(2, 90, low=-2, high=2)
    extra[:, 35:40] = -INF
    kw = dict(scaling=0.3, groups=g, num_groups=3, extra_group=1, extra_bias=extra)
    o, _, _ = check(
        q, k, v, **kw, logit_abs=rand(2, 1, 90), edit_row_start=torch.tensor([50, 0], device=DEVICE)
    )
    assert o.shape[3] == 4
    zero = tg.grouped_attention(q, k, v, **{**kw, "extra_bias": torch.zeros_like(extra)})
    torch.testing.assert_close(zero[0][..., 3, :], zero[0][..., 1, :], rtol=0, atol=1e-6)
    torch.testing.assert_close(zero[1][..., 3], zero[1][..., 1], rtol=0, atol=1e-6)


# --- windows, splits, caches ----------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq", [200, 1], ids=["prefill", "decode"])
def test_sliding_window(causal, nq):
    q, k, v = qkv(1, 2, 2, nq, 200, seed=16)
    check(q, k, v, scaling=0.3, groups=vlm_groups(1, 200), num_groups=3, causal=causal, sliding_window=20)


def test_sliding_window_convention():
    """transformers: the row at position p sees keys p - W < j <= p, i.e. itself and W - 1 before."""
    q, k, v = qkv(1, 1, 1, 1, 10, seed=17)
    _, lse_w = tg.grouped_attention(q, k, v, scaling=0.3, sliding_window=3)
    _, lse_cut = tg.grouped_attention(q, k[:, :, 7:], v[:, :, 7:], scaling=0.3)
    torch.testing.assert_close(lse_w, lse_cut, rtol=0, atol=1e-6)


@pytest.mark.parametrize("splits", [1, 3, 4])
@pytest.mark.parametrize("ratio", [1, 4])
def test_decode_splits(splits, ratio):
    q, k, v = qkv(2, 4, 4 // ratio, 1, 300, seed=18)
    valid = torch.ones(2, 300, dtype=torch.bool, device=DEVICE)
    valid[1, :200] = False  # row 1's first splits are empty
    g = vlm_groups(2, 300, prefix=150, image=100, sinks=(5, 50), num_groups=4)
    check(q, k, v, scaling=0.2, groups=g, num_groups=4, key_valid=valid, num_splits=splits)


def test_prefill_splits():
    q, k, v = qkv(1, 2, 2, 40, 200, seed=19)
    check(q, k, v, scaling=0.2, groups=vlm_groups(1, 200), num_groups=3, num_splits=2)


@pytest.mark.parametrize("nq", [1, 3, 40])
def test_kv_len(nq):
    """Static caches: kv_len filled slots; the rest (garbage here) is never read."""
    q, k, v = qkv(2, 2, 2, nq, 130, seed=20)
    k[1, :, 100:] = 1e4  # unfilled slots
    kv_len = torch.tensor([130, 100], device=DEVICE)
    g = vlm_groups(2, 130)
    check(q, k, v, scaling=0.2, groups=g, num_groups=3, kv_len=kv_len, sliding_window=50)
    o, lse = tg.grouped_attention(q, k, v, scaling=0.2, groups=g, num_groups=3, kv_len=kv_len)
    o_cut, lse_cut = tg.grouped_attention(
        q[1:], k[1:, :, :100], v[1:, :, :100], scaling=0.2, groups=g[1:, :100], num_groups=3
    )
    torch.testing.assert_close(o[1:], o_cut, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse[1:], lse_cut, rtol=0, atol=1e-5)


# --- dtypes and a VLM-like layout -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nq", [110, 3, 1], ids=["prefill", "decode3", "decode1"])
def test_half_precision(dtype, nq):
    q, k, v = qkv(1, 4, 2, nq, 110, dtype=dtype, seed=21)
    kw = dict(logit_scale=rand(1, 4, 110, low=0.5, high=2.0), logit_abs=rand(1, 1, 110) * 0.2)
    check(q, k, v, scaling=0.2, groups=vlm_groups(1, 110, num_groups=4), num_groups=4, **kw)


@pytest.mark.parametrize("nq", [120, 1], ids=["prefill", "decode"])
def test_vlm_layout(nq):
    """text prefix | image span with sparse sink keys in their own group | text, VAR-like edits, padding."""
    q, k, v = qkv(2, 4, 4, nq, 120, seed=22)
    g = vlm_groups(2, 120, prefix=70, image=40, sinks=(2, 21, 33))
    valid = torch.ones(2, 120, dtype=torch.bool, device=DEVICE)
    valid[1, :6] = False
    bias = torch.zeros(2, 4, 120, device=DEVICE)
    bias[:, :, 72] = 6.0  # a sink far above the rest
    check(
        q,
        k,
        v,
        scaling=0.25,
        groups=g,
        num_groups=3,
        key_valid=valid,
        logit_bias=bias,
        logit_scale=rand(2, 1, 120, low=0.9, high=1.3),
        edit_row_start=torch.tensor([110, 115], device=DEVICE),
        extra_group=1,
        extra_bias=rand(2, 120, low=0.0, high=1.0),
    )


def test_set_far_below_row_max_keeps_its_mass():
    """A set ~200 nats below the row's best key: a shared max would underflow it to l = 0."""
    q, k, v = qkv(1, 1, 1, 1, 80, seed=23)
    g = torch.zeros(1, 80, dtype=torch.long, device=DEVICE)
    g[:, 40:] = 1
    bias = torch.zeros(1, 1, 80, device=DEVICE)
    bias[..., :40] = 200.0
    _, lse, empty = check(q, k, v, scaling=0.2, groups=g, num_groups=2, logit_bias=bias)
    assert not empty.any() and (lse[..., 0] - lse[..., 1] > 150).all()


# --- the caller's side: merging sets is plain attention ------------------------------------------------


@pytest.mark.parametrize("nq", [100, 1], ids=["prefill", "decode"])
def test_merged_sets_are_plain_attention(nq):
    q, k, v = qkv(2, 4, 2, nq, 100, seed=24)
    g = torch.randint(0, 3, (2, 100), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    g[:, :70] = 0
    extra = rand(2, 100, low=-5, high=5)
    o, lse = tg.grouped_attention(
        q, k, v, scaling=0.2, groups=g, num_groups=3, extra_group=2, extra_bias=extra, num_splits=2
    )
    out = merge_sets(o, lse, sets=3)  # [B, Nq, H, Dv]; the extra set is not part of the partition
    rep = 2
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q,
        k.repeat_interleave(rep, 1),
        v.repeat_interleave(rep, 1),
        is_causal=False,
        attn_mask=torch.ones(nq, 100, dtype=torch.bool, device=DEVICE).tril(100 - nq),
        scale=0.2,
    )
    torch.testing.assert_close(out, sdpa.transpose(1, 2), rtol=0, atol=1e-5)


# --- a random mix of everything -------------------------------------------------------------------------


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_mix(data):
    draw = data.draw
    ratio = draw(st.sampled_from([1, 2]))
    nk = draw(st.integers(1, 140))
    nq = draw(st.sampled_from([1, 2, 3, min(nk, 20), nk]))
    g_count = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    q, k, v = qkv(2, 2, 2 // ratio, nq, nk, dim=draw(st.sampled_from([16, 24])), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    # logits of moderate size: at |z| ~ 100 fp32 rounding alone (an ulp is 8e-6) would exceed 1e-5
    kw = dict(scaling=draw(st.floats(0.05, 0.5)), num_groups=g_count, causal=draw(st.booleans()))
    kw["groups"] = torch.randint(-1, g_count, (2, nk), generator=gen).to(DEVICE)
    for name in ("logit_scale", "logit_abs", "logit_bias"):
        if draw(st.booleans()):
            kw[name] = (torch.rand(2, draw(st.sampled_from([1, 2])), nk, generator=gen) * 2 - 0.5).to(DEVICE)
    if g_count < 4 and draw(st.booleans()):
        kw["extra_group"] = draw(st.integers(0, g_count - 1))
        kw["extra_bias"] = (torch.randn(2, nk, generator=gen) * 2).to(DEVICE)
    if draw(st.booleans()):
        kw["key_valid"] = (torch.rand(2, nk, generator=gen) > 0.2).to(DEVICE)
    if draw(st.booleans()):
        kw["edit_row_start"] = torch.randint(0, nk + 1, (2,), generator=gen).to(DEVICE)
    if draw(st.booleans()):
        kw["sliding_window"] = draw(st.integers(1, nk + 1))
    if nq <= tg.DECODE_MAX_ROWS:
        kw["num_splits"] = draw(st.integers(1, 4))
    check(q, k, v, **kw)


# --- input checks ---------------------------------------------------------------------------------------


def _bad(match, q=None, k=None, v=None, **kw):
    base_q, base_k, base_v = qkv(1, 2, 1, 4, 8, dim=16)
    kw.setdefault("scaling", 0.1)
    for fn in (tg.grouped_attention, grouped_reference):
        with pytest.raises(ValueError, match=match):
            fn(base_q if q is None else q, base_k if k is None else k, base_v if v is None else v, **kw)


def test_input_validation():
    q, k, v = qkv(1, 2, 1, 4, 8, dim=16)
    g = torch.zeros(1, 8, dtype=torch.long, device=DEVICE)
    _bad("num_groups must be an int in 1..4", num_groups=5)
    _bad("num_groups must be an int in 1..4", num_groups=0)
    _bad(
        "plus the extra set exceeds 4",
        num_groups=4,
        extra_group=0,
        extra_bias=torch.zeros(1, 8, device=DEVICE),
    )
    _bad("extra_group needs extra_bias", num_groups=2, extra_group=1)
    _bad("extra_bias is given without extra_group", extra_bias=torch.zeros(1, 8, device=DEVICE))
    _bad("4-D", q=q[0])
    kv3 = torch.randn(1, 2, 8, 16, device=DEVICE)
    _bad("multiple of key/value heads", q=torch.randn(1, 3, 4, 16, device=DEVICE), k=kv3, v=kv3)
    _bad("head dim 8 differs", k=k[..., :8])
    _bad("share a dtype", q=q.half())
    _bad(r"groups must have shape \[B, Nk\]", groups=g[:, :7])
    _bad(r"groups values must lie in \[-1, 2\)", groups=g + 2, num_groups=2)
    _bad("groups must be an integer tensor", groups=g.float())
    _bad(
        r"logit_bias must have shape \[B, Hc, Nk\] with Hc in \(1, 2\)",
        logit_bias=torch.zeros(1, 3, 8, device=DEVICE),
    )
    nan = torch.zeros(1, 1, 8, device=DEVICE)
    nan[..., 3] = math.nan
    _bad("logit_bias holds non-finite values", logit_bias=nan)
    _bad("logit_bias holds non-finite values", logit_bias=torch.full((1, 1, 8), INF, device=DEVICE))
    _bad("logit_scale holds non-finite values", logit_scale=torch.full((1, 1, 8), -INF, device=DEVICE))
    _bad("extra_bias holds NaN or \\+inf", num_groups=2, extra_group=0, extra_bias=nan[0])
    _bad("key_valid must be a bool tensor", key_valid=torch.ones(1, 8, device=DEVICE))
    _bad("sliding_window must be a positive int", sliding_window=0)
    _bad(r"kv_len values must lie in \[0, Nk=8\]", kv_len=torch.tensor([9], device=DEVICE))
    _bad("scaling must be finite", scaling=math.nan)
    with pytest.raises(ValueError, match=r"num_splits must be an int in 1\.\.16"):
        tg.grouped_attention(q, k, v, scaling=0.1, num_splits=0)
    # -inf biases are allowed; value checks can be switched off (e.g. inside a CUDA graph)
    tg.grouped_attention(q, k, v, scaling=0.1, logit_bias=torch.full((1, 1, 8), -INF, device=DEVICE))
    tg.grouped_attention(q, k, v, scaling=0.1, logit_bias=nan, validate=False)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(tg, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tg.grouped_attention(*(t.cpu() for t in qkv(1, 1, 1, 1, 4, dim=16)), scaling=0.1)


def test_split_heuristic():
    assert tg.split_heuristic(programs=32, num_keys=1100, sms=132) == 4  # LLaVA-1.5 decode, batch 1
    assert tg.split_heuristic(programs=256, num_keys=8192, sms=132) == 1  # batch 8: enough programs
    assert tg.split_heuristic(programs=32, num_keys=100, sms=132) == 1  # too few keys to split


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autotuning needs a GPU")
def test_autotuned_configs_on_gpu(monkeypatch):
    monkeypatch.setenv("MITIGATE_TRITON_AUTOTUNE", "1")
    for nq in (300, 1):
        q, k, v = qkv(1, 4, 4, nq, 300, dim=128, dtype=torch.bfloat16, seed=25)
        check(q, k, v, scaling=128**-0.5, groups=vlm_groups(1, 300), num_groups=3)
