"""Every fast kernel against the eager reference, on random shapes, masks and edits (hypothesis)."""

import os
from dataclasses import fields, replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mitigate.kernels import AttentionEdit, HeadScale, LogitEdit, MassTransfer, combine, torch_sdpa
from mitigate.kernels.edit import Observe, RowEdit
from mitigate.kernels.reference import probabilities, reference_attention
from mitigate.kernels.torch_sdpa import torch_attention
from mitigate.methods.var import var_masses

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
#: MITIGATE_TEST_DEVICE=cuda runs the same comparisons on a GPU
DEVICE = torch.device(os.environ.get("MITIGATE_TEST_DEVICE", "cpu"))


def on_device(edit: AttentionEdit) -> AttentionEdit:
    def move(op):
        moved = {
            f.name: getattr(op, f.name).to(DEVICE) for f in fields(op) if torch.is_tensor(getattr(op, f.name))
        }
        return replace(op, **moved)

    return AttentionEdit([move(op) for op in edit.ops])


KINDS = ["scale", "abs", "bias", "mass", "var", "head", "scale+mass", "two-mass", "row", "observe", "all"]


class Recorder:
    """An observer that keeps what it saw, assembled into ``[B, H, Nq, Nk]`` (NaN where unseen)."""

    def __init__(self):
        self.seen = None

    def __call__(self, p, rows, index):
        if self.seen is None:
            self.seen = {}
        for r, position in enumerate(index.tolist()):
            self.seen[position] = p[:, :, r].clone()

    def dense(self, nq):
        first = next(iter(self.seen.values()))
        out = torch.full(
            (first.shape[0], first.shape[1], nq, first.shape[2]), float("nan"), device=first.device
        )
        for position, value in self.seen.items():
            out[:, :, position] = value
        self.seen = None
        return out


def padded_mask(pad: list[int], nq: int, nk: int, causal: bool) -> torch.Tensor:
    """bool ``[B, 1, Nq, Nk]`` as ``sdpa_mask`` builds it for a left-padded batch (True = attend)."""
    keys = torch.arange(nk)[None, :] >= torch.tensor(pad)[:, None]  # [B, Nk]
    mask = keys[:, None, None, :].expand(-1, 1, nq, -1)
    if causal:
        mask = mask & (torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + nk - nq)
    return mask


def random_rows(gen, bsz, nq, style):
    if style == "all":
        return torch.ones(bsz, nq, dtype=torch.bool)
    if style == "last":
        rows = torch.zeros(bsz, nq, dtype=torch.bool)
        rows[:, -1] = True
        return rows
    if style == "suffix":
        start = torch.randint(0, nq, (bsz,), generator=gen)
        return torch.arange(nq)[None, :] >= start[:, None]
    return torch.rand(bsz, nq, generator=gen) < 0.5


def mass_fn(weights):
    def fn(masses, rows):
        return masses * weights.to(masses)  # row-local, non-negative, not total-preserving

    return fn


def var_fn(masses, rows):
    return var_masses(masses, 0.6, 0.3, 0.05)[0]


def make_edit(gen, kind, bsz, heads, nq, nk, row_style, per_head):
    hc = heads if per_head else 1
    rows = random_rows(gen, bsz, nq, row_style)
    ops = []

    def per_key(lo, hi):
        return lo + (hi - lo) * torch.rand(bsz, hc, nk, generator=gen)

    if kind in ("scale", "scale+mass", "all"):
        ops.append(LogitEdit(rows=rows, scale=per_key(0.5, 1.5)))
    if kind in ("abs", "all"):
        ops.append(LogitEdit(rows=rows, abs=per_key(0.0, 0.8)))
    if kind in ("bias", "all"):
        bias = per_key(-1.0, 1.0)
        bias[..., 0] = float("-inf") if nk > 1 else 0.0  # a dropped key
        ops.append(LogitEdit(rows=rows, bias=bias))
    if kind in ("mass", "scale+mass", "all"):
        groups = torch.randint(0, 3, (bsz, nk), generator=gen)
        ops.append(
            MassTransfer(rows=rows, groups=groups, num_groups=3, fn=mass_fn(torch.tensor([1.0, 0.3, 2.5])))
        )
    if kind == "two-mass":  # composed transfers over different partitions (the grouped path refines them)
        for weights in ([1.0, 3.0], [0.5, 1.0, 2.0]):
            groups = torch.randint(0, len(weights), (bsz, nk), generator=gen)
            fn = mass_fn(torch.tensor(weights))
            ops.append(MassTransfer(rows=rows, groups=groups, num_groups=len(weights), fn=fn))
    if kind == "var":
        groups = torch.randint(0, 4, (bsz, nk), generator=gen)
        ops.append(MassTransfer(rows=rows, groups=groups, num_groups=4, fn=var_fn))
    if kind in ("row", "all"):  # a GIFT-like per-key reweighting, renormalised
        weights = 0.5 + torch.rand(bsz, nk, generator=gen)

        def reweight(p, rows, index, weights=weights):
            edited = p * weights.to(p)[:, None, None, :]
            return edited / edited.sum(-1, keepdim=True).clamp_min(1e-30)

        ops.append(RowEdit(rows=random_rows(gen, bsz, nq, "last"), fn=reweight))
    if kind in ("observe", "all"):
        ops.append(Observe(rows=rows, fn=Recorder()))
    if kind in ("head", "all"):
        ops.append(
            HeadScale(
                rows=random_rows(gen, bsz, nq, "random"), scale=1 + torch.rand(bsz, heads, generator=gen)
            )
        )
    return combine([ops])


@st.composite
def cases(draw):
    return dict(
        bsz=draw(st.integers(1, 4)),
        kv_heads=draw(st.sampled_from([1, 2])),
        ratio=draw(st.sampled_from([1, 2, 4])),
        dim=draw(st.sampled_from([8, 16])),
        nk=draw(st.integers(2, 24)),
        phase=draw(st.sampled_from(["prefill", "decode", "chunk"])),
        causal=draw(st.booleans()),
        padded=draw(st.booleans()),
        kind=draw(st.sampled_from(KINDS)),
        rows=draw(st.sampled_from(["all", "last", "suffix", "random"])),
        per_head=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        path=draw(st.sampled_from(["whole", "chunked", "grouped"])),
        seed=draw(st.integers(0, 2**16)),
    )


def run_case(case, monkeypatch):
    gen = torch.Generator().manual_seed(case["seed"])
    bsz, kvh, dim, nk = case["bsz"], case["kv_heads"], case["dim"], case["nk"]
    heads = kvh * case["ratio"]
    nq = {"prefill": nk, "decode": 1, "chunk": max(1, nk // 2)}[case["phase"]]
    q = torch.randn(bsz, heads, nq, dim, generator=gen).to(case["dtype"])
    k = (2 * torch.randn(bsz, kvh, nk, dim, generator=gen)).to(case["dtype"])
    # values at the scale of real attention outputs: 2e-2 in bf16 is under one ulp above |x| = 4
    v = (0.5 * torch.randn(bsz, kvh, nk, dim, generator=gen)).to(case["dtype"])
    causal = case["causal"]
    if case["padded"]:
        pad = torch.randint(0, nk // 2 + 1, (bsz,), generator=gen).tolist()
        mask = padded_mask(pad, nq, nk, causal)
    else:
        mask = None
    edit = on_device(make_edit(gen, case["kind"], bsz, heads, nq, nk, case["rows"], case["per_head"]))
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    mask = mask.to(DEVICE) if mask is not None else None
    if case["path"] in ("chunked", "grouped"):  # few rows per chunk: plain SDPA plus edited rows
        monkeypatch.setattr(torch_sdpa, "MIN_CHUNK_BYTES", 0)
        monkeypatch.setattr(torch_sdpa, "CHUNK_BYTES", 4 * 4 * bsz * heads * nk * 2)
    if case["path"] == "grouped":  # grouped partial states wherever the ops allow them
        monkeypatch.setattr(torch_sdpa, "MAX_CHUNKS", 0)
    recorder = next((op.fn for op in edit.ops if isinstance(op, Observe)), None)
    expected = reference_attention(q, k, v, mask, edit, 0.3, causal)
    seen_ref = recorder.dense(nq) if recorder and recorder.seen is not None else None
    got = torch_attention(q, k, v, mask, edit, 0.3, causal)
    observed = next((op.rows for op in edit.ops if isinstance(op, Observe)), None)
    if recorder and recorder.seen is None:  # a kernel may skip an observer that has no row to see
        assert not observed.any()
    elif recorder:  # the torch kernel showed the observer the same probabilities, on at least its rows
        seen = recorder.dense(nq)
        both = observed[:, None, :, None].expand_as(seen)
        assert not seen[both].isnan().any()
        if both.any():
            assert (seen[both] - seen_ref[both]).abs().max() <= TOL[case["dtype"]]
    assert got.shape == expected.shape == (bsz, nq, heads, dim)
    assert got.dtype == case["dtype"]
    # query rows that see no key at all (left padding) are don't-care: transformers never reads them
    seen = torch.ones(bsz, nq, dtype=torch.bool, device=DEVICE) if mask is None else mask.any(-1)[:, 0]
    assert torch.isfinite(got[seen]).all()
    err = (got.float() - expected.float())[seen].abs().max().item()
    assert err <= TOL[case["dtype"]], f"{case}: max error {err}"


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_torch_kernel_matches_reference(case, monkeypatch):
    with monkeypatch.context() as patch:
        run_case(case, patch)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["whole", "chunked", "grouped"])
def test_every_kind_and_path(kind, path, monkeypatch):
    """Deterministic coverage of every edit kind on both paths (hypothesis may miss a combination)."""
    for seed in range(3):
        case = {
            **dict(bsz=3, kv_heads=2, ratio=2, dim=16, nk=20, phase="prefill", causal=True, padded=True),
            **dict(kind=kind, rows="suffix", per_head=True, dtype=torch.float32, path=path, seed=seed),
        }
        with monkeypatch.context() as patch:
            run_case(case, patch)


def test_grouped_path_is_used_for_many_rows(monkeypatch):
    """Mass transfers on many rows must go through the grouped SDPA path, not materialise rows."""
    calls = []
    monkeypatch.setattr(torch_sdpa, "_materialised", lambda *a, **k: calls.append("rows") or 1 / 0)
    monkeypatch.setattr(torch_sdpa, "MIN_CHUNK_BYTES", 0)
    monkeypatch.setattr(torch_sdpa, "CHUNK_BYTES", 1)  # one row per chunk: 128 chunks would be too many
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 128, 8, generator=gen) for _ in range(3))
    edit = make_edit(gen, "var", 2, 4, 128, 128, "all", False)
    got = torch_attention(q, k, v, None, edit, 0.5, True)
    assert not calls
    assert (got - reference_attention(q, k, v, None, edit, 0.5, True)).abs().max() <= 1e-5


def test_reference_without_edit_is_sdpa():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 9, 8, generator=gen)
    k, v = torch.randn(2, 2, 9, 8, generator=gen), torch.randn(2, 2, 9, 8, generator=gen)
    mask = padded_mask([0, 3], 9, 9, True)
    ref = reference_attention(q, k, v, mask, None, 0.35, True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask, scale=0.35
    ).transpose(1, 2)
    valid = torch.tensor([[1] * 9, [0] * 3 + [1] * 6], dtype=torch.bool)  # padded query rows are don't-care
    assert (ref - sdpa)[valid].abs().max() <= 1e-6
    assert ref[1, :3].abs().max() == 0  # fully masked rows give zeros, never NaN


def test_reference_ops_do_what_they_say():
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 1, 1, 4, generator=gen), torch.randn(1, 1, 3, 4, generator=gen)
    rows = torch.ones(1, 1, dtype=torch.bool)
    z = 0.5 * (q @ k.transpose(-1, -2))
    edit = AttentionEdit(
        [LogitEdit(rows=rows, scale=torch.tensor([[[2.0, 1.0, 1.0]]]), abs=torch.tensor([[[0.0, 0.5, 0.0]]]))]
    )
    expected = torch.softmax(z * torch.tensor([2.0, 1, 1]) + torch.tensor([0, 0.5, 0]) * z.abs(), -1)
    assert torch.allclose(probabilities(q, k, None, 0.5, False, edit), expected, atol=1e-7)
    # mass transfer: groups {0}, {1, 2}; group 1 doubled then renormalised
    p = torch.softmax(z, -1)
    op = MassTransfer(
        rows=rows,
        groups=torch.tensor([[0, 1, 1]]),
        num_groups=2,
        fn=lambda m, r: m * torch.tensor([1.0, 2.0]),
    )
    got = probabilities(q, k, None, 0.5, False, AttentionEdit([op]))
    want = p * torch.tensor([1.0, 2.0, 2.0])
    assert torch.allclose(got, want / want.sum(-1, keepdim=True), atol=1e-7)
