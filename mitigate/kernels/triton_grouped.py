# ruff: noqa: E741, SIM102, SIM108  (FA names O/l; Triton constexpr branches stay plain if-blocks)
"""Fused grouped-state attention (forward only) in Triton.

Contract
--------
:func:`grouped_attention` runs one pass over the keys of ``query [B, H, Nq, D]``, ``key [B, Hkv, Nk, D]``,
``value [B, Hkv, Nk, Dv]`` (GQA: head ``h`` reads kv head ``h // (H // Hkv)``; any strides) and keeps an
online softmax per *state set*:

- sets ``0..G-1`` (``G = num_groups <= 4``) partition the keys by ``groups [B, Nk]`` (``-1`` drops a key;
  ``None`` puts every key in group 0);
- an optional extra set holds the keys of group ``extra_group`` again, with logits ``+ extra_bias [B, Nk]``
  (fp32, ``-inf`` allowed) on every row: the same keys re-weighted by ``exp(extra_bias)``. It overlaps its
  group and is not part of the partition. ``S = G + (extra set) <= 4``.

Logits: ``z = scaling * q.k``, edited to ``z' = s*z + a*|z| + b`` (``logit_scale``, ``logit_abs``,
``logit_bias``: fp32 ``[B, Hc, Nk]``, ``Hc`` in ``{1, H}``, any of them ``None``) on the query rows whose
absolute position is ``>= edit_row_start[b]`` (all rows when ``None``). Masks come after the edit: a key is
dropped by ``groups == -1``, ``key_valid == False``, ``j >= kv_len[b]``, causality (row at position ``p``
sees ``j <= p``) and the sliding window (``j > p - sliding_window``, transformers' convention: the row sees
itself and the ``sliding_window - 1`` keys before it). Query row ``i`` has absolute position
``i + L - Nq`` with ``L = kv_len[b]`` if given, else ``Nk`` (bottom-right alignment; keys are positions
``0..Nk-1``). ``b = -inf`` is allowed; NaN/+inf in ``b`` and non-finite ``s``/``a`` are rejected when
values are checked (``validate``; skipped by default while capturing a CUDA graph or compiling).

Returns ``o [B, Nq, H, S, Dv]`` (fp32, each set's normalised output ``sum_j p_j v_j / sum_j p_j``, 0 when
the set is empty) and ``lse [B, Nq, H, S]`` (fp32, natural-log log-sum-exp of the set's edited logits,
``-inf`` when empty). The caller recovers the row's softmax and any redistribution between sets:
``mass_g = exp(lse_g - logsumexp_g lse)``, and ``sum_g mass_g o_g`` over the partition is plain attention
(:func:`~mitigate.kernels.grouped_reference.merge_sets`).

Numerics
--------
Logits are fp32 and carried in exp2 units (``log2(e)*scaling`` folded into one multiply, ``log2(e)`` into
``b``; ``|c*x| = c*|x|`` for ``c > 0`` keeps the edit exact). Every set keeps its *own* running max: with a
max shared across the row, a set more than ~87 nats below the row's best key would underflow to
``l = 0`` and lose its ``lse`` and ``o``, yet the caller may amplify exactly that set. Per tile: the new
maxima of the sets present, then one ``exp2`` per element against its own set's max (selected per key),
then each present set is rescaled by its ``alpha`` and accumulates its masked probabilities (sets absent
from a tile skip their row reductions and their PV dot). Empty sets are guarded with
``m_shift = where(m == -inf, 0, m)`` in both ``alpha`` and ``p`` (no ``-inf - -inf``). Sums and
accumulators are fp32; dot operands are in the input dtype, with ``p`` rounded to it for PV as FA2 does
(fp32 inputs use IEEE dots on GPU, not TF32).

Launches
--------
Prefill (``Nq > 16``): one program per ``(BLOCK_M query rows, batch, head)``, key tiles bounded by
causality and the window. Decode (``Nq <= 16``): one program per ``(batch, kv head)`` with the
``H/Hkv * Nq`` (head, query) rows of that kv group packed into the M dimension (``M <= 2`` uses
broadcast-multiply-sum instead of ``tl.dot``, MHA decode is bandwidth-bound), and split-K over the keys:
each split writes fp32 partial ``(o, lse)`` per set, and a second small kernel merges the splits
(``-inf``-safe). Two launches per call when split, one otherwise. The split count follows FA2's heuristic
(fill the SMs with whole waves).

On CPU the kernels run only under ``TRITON_INTERPRET=1`` set before this module is imported (tests do
that); :mod:`~mitigate.kernels.grouped_reference` is the torch fallback with the same signature.
"""

from __future__ import annotations

import math
import os
from functools import cache

import torch
import triton
import triton.language as tl

from .grouped_reference import check_call

#: at most this many query rows take the packed split-K decode path
DECODE_MAX_ROWS = 16
MAX_SPLITS = 16
LOG2E = 1.4426950408889634
_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _shift(m):
    # a set with no key yet has m = -inf; subtract 0 instead so that -inf - -inf never happens
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _round_p(p, IN_KIND: tl.constexpr):
    # FA2 rounds the probabilities to the input dtype before the PV product
    if IN_KIND == 1:
        return p.to(tl.float16)
    elif IN_KIND == 2:
        return p.to(tl.bfloat16)
    else:
        return p


@triton.jit
def _accumulate(
    m,
    m_new,
    l,
    acc,
    p,
    v,
    IN_KIND: tl.constexpr,
    USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One set's state after a tile: ``p`` [M, N] fp32 is 0 outside the set, ``exp2(z - shift(m_new))``
    inside it."""
    alpha = tl.exp2(m - _shift(m_new))
    l = l * alpha + tl.sum(p, 1)
    pr = _round_p(p, IN_KIND)
    if USE_DOT:
        if UPCAST:
            pv = _mm(pr.to(tl.float32), v, IEEE)
        else:
            pv = _mm(pr, v, IEEE)
    else:
        pv = tl.sum(pr.to(tl.float32)[:, :, None] * v.to(tl.float32)[None, :, :], 1)
    acc = acc * alpha[:, None] + pv
    return m_new, l, acc


@triton.jit
def _group_max(m, z, member):
    return tl.maximum(m, tl.max(tl.where(member[None, :], z, float("-inf")), 1))


@triton.jit
def _present(member):
    return tl.max(member.to(tl.int32), 0) > 0


@triton.jit
def _load_coef(ptr, head_r, head0, offs_n, n_ok, row_ok, s_h, s_n, ROWWISE: tl.constexpr):
    if ROWWISE:  # packed decode rows span several heads
        c = tl.load(
            ptr + head_r[:, None] * s_h + offs_n[None, :] * s_n,
            mask=row_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
    else:
        c = tl.load(ptr + head0 * s_h + offs_n * s_n, mask=n_ok, other=0.0)[None, :]
    return c


@triton.jit
def _store_set(
    O, LSE, o_row, l_row, set_index, s_os, s_ls, offs_dv, s_od, row_ok, m, l, acc, DV: tl.constexpr
):
    ok = l > 0.0
    safe = tl.where(ok, l, 1.0)
    o = acc / safe[:, None]
    lse = tl.where(ok, (m + tl.log2(safe)) * 0.6931471805599453, float("-inf"))
    o_ptrs = O + o_row[:, None] + set_index * s_os + offs_dv[None, :] * s_od
    tl.store(o_ptrs, o, mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + l_row + set_index * s_ls, lse, mask=row_ok)


@triton.jit(do_not_specialize=["nk_bucket", "nq_bucket"])
def _grouped_fwd(
    Q,
    K,
    V,
    GID,
    KVALID,
    SCALE,
    ABS,
    BIAS,
    XBIAS,
    ROWSTART,
    KVLEN,
    O,
    LSE,
    s_qb,
    s_qh,
    s_qm,
    s_qd,
    s_kb,
    s_kh,
    s_kn,
    s_kd,
    s_vb,
    s_vh,
    s_vn,
    s_vd,
    s_gb,
    s_gn,
    s_mb,
    s_mn,
    s_sb,
    s_sh,
    s_sn,
    s_ab,
    s_ah,
    s_an,
    s_bb,
    s_bh,
    s_bn,
    s_xb,
    s_xn,
    s_ob,
    s_om,
    s_oh,
    s_os,
    s_op,
    s_od,
    s_lb,
    s_lm,
    s_lh,
    s_ls,
    s_lp,
    num_queries,
    num_keys,
    heads,
    kv_ratio,
    qk_scale,
    window,
    nk_bucket,
    nq_bucket,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    EXTRA_GROUP: tl.constexpr,
    HAS_GID: tl.constexpr,
    HAS_KVALID: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_ABS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_EDIT: tl.constexpr,
    COEF_ROWWISE: tl.constexpr,
    HAS_ROWSTART: tl.constexpr,
    HAS_KVLEN: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    PACK: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    IN_KIND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    kv_heads = heads // kv_ratio
    if PACK:  # rows are (head in the kv group, query row) pairs
        b = pid_bh // kv_heads
        hk = pid_bh % kv_heads
        head_r = hk * kv_ratio + offs_r // num_queries
        row_i = offs_r % num_queries
        row_ok = offs_r < kv_ratio * num_queries
        head0 = hk * kv_ratio
    else:
        b = pid_bh // heads
        head0 = pid_bh % heads
        hk = head0 // kv_ratio
        head_r = tl.zeros([BLOCK_M], dtype=tl.int32) + head0
        row_i = offs_r
        row_ok = offs_r < num_queries
    b64 = b.to(tl.int64)

    if HAS_KVLEN:
        kv_len = tl.load(KVLEN + b64).to(tl.int32)
    else:
        kv_len = num_keys
    offset = kv_len - num_queries
    pos = row_i + offset  # absolute position of each row

    # key range of this program: [lo, hi), then its split's share, in whole tiles
    hi = kv_len
    lo = 0
    if not PACK:
        if CAUSAL:
            last_row = tl.minimum(pid_m * BLOCK_M + BLOCK_M, num_queries) - 1
            hi = tl.maximum(tl.minimum(hi, last_row + offset + 1), 0)
        if HAS_WINDOW:
            lo = tl.maximum(pid_m * BLOCK_M + offset - window + 1, 0)
    else:
        if HAS_WINDOW:
            lo = tl.maximum(offset - window + 1, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    if NUM_SPLITS > 1:
        total = tl.maximum(hi - lo, 0)
        chunk = tl.cdiv(tl.cdiv(total, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = lo + pid_s * chunk
        hi = tl.minimum(hi, lo + chunk)

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + b64 * s_qb + head_r[:, None] * s_qh + row_i[:, None] * s_qm + offs_d[None, :] * s_qd,
        mask=row_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    if UPCAST or not USE_DOT:
        q = q.to(tl.float32)
    k_base = K + b64 * s_kb + hk.to(tl.int64) * s_kh
    v_base = V + b64 * s_vb + hk.to(tl.int64) * s_vh
    if HAS_ROWSTART:
        edit_row = pos.to(tl.int64) >= tl.load(ROWSTART + b64)

    m0 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    m1 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    m2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    m3 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    mx = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l0 = tl.zeros([BLOCK_M], tl.float32)
    l1 = tl.zeros([BLOCK_M], tl.float32)
    l2 = tl.zeros([BLOCK_M], tl.float32)
    l3 = tl.zeros([BLOCK_M], tl.float32)
    lx = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    accx = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        if USE_DOT:
            kt = tl.load(
                k_base + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd,
                mask=n_ok[None, :] & (offs_d[:, None] < D),
                other=0.0,
            )
            if UPCAST:
                kt = kt.to(tl.float32)
            qk = _mm(q, kt, IEEE)
        else:
            k = tl.load(
                k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd,
                mask=n_ok[:, None] & (offs_d[None, :] < D),
                other=0.0,
            ).to(tl.float32)
            qk = tl.sum(q[:, None, :] * k[None, :, :], 2)
        t = qk * qk_scale  # scaling * q.k in log2 units

        if HAS_GID:
            gid = tl.load(GID + b64 * s_gb + offs_n * s_gn, mask=n_ok, other=-1).to(tl.int32)
        else:
            gid = tl.where(n_ok, 0, -1)
        if HAS_KVALID:
            valid = tl.load(KVALID + b64 * s_mb + offs_n * s_mn, mask=n_ok, other=0)
            gid = tl.where(valid != 0, gid, -1)

        if HAS_EDIT:  # one flag, not `A or B or C`: triton 3.0-3.1 reject chained booleans
            edited = t
            if HAS_SCALE:
                edited = (
                    _load_coef(
                        SCALE + b64 * s_sb, head_r, head0, offs_n, n_ok, row_ok, s_sh, s_sn, COEF_ROWWISE
                    )
                    * t
                )
            if HAS_ABS:
                edited += _load_coef(
                    ABS + b64 * s_ab, head_r, head0, offs_n, n_ok, row_ok, s_ah, s_an, COEF_ROWWISE
                ) * tl.abs(t)
            if HAS_BIAS:
                edited += (
                    _load_coef(
                        BIAS + b64 * s_bb, head_r, head0, offs_n, n_ok, row_ok, s_bh, s_bn, COEF_ROWWISE
                    )
                    * 1.4426950408889634
                )
            if HAS_ROWSTART:
                t = tl.where(edit_row[:, None], edited, t)
            else:
                t = edited

        # masks after the edit
        keep = (gid >= 0)[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= pos[:, None])
        if HAS_WINDOW:
            keep = keep & (offs_n[None, :] > pos[:, None] - window)
        z = tl.where(keep, t, float("-inf"))

        v = tl.load(
            v_base + offs_n[:, None] * s_vn + offs_dv[None, :] * s_vd,
            mask=n_ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
        if UPCAST:
            v = v.to(tl.float32)

        if NUM_GROUPS == 1:  # gid is 0 or -1, and z is already -inf off the group
            m0n = tl.maximum(m0, tl.max(z, 1))
            p = tl.exp2(z - _shift(m0n)[:, None])
            m0, l0, acc0 = _accumulate(m0, m0n, l0, acc0, p, v, IN_KIND, USE_DOT, UPCAST, IEEE)
        else:
            in0 = gid == 0
            in1 = gid == 1
            present0 = _present(in0)
            present1 = _present(in1)
            m0n = m0
            m1n = m1
            if present0:
                m0n = _group_max(m0, z, in0)
            if present1:
                m1n = _group_max(m1, z, in1)
            msel = tl.where(in1[None, :], _shift(m1n)[:, None], _shift(m0n)[:, None])
            if NUM_GROUPS > 2:
                in2 = gid == 2
                present2 = _present(in2)
                m2n = m2
                if present2:
                    m2n = _group_max(m2, z, in2)
                msel = tl.where(in2[None, :], _shift(m2n)[:, None], msel)
            if NUM_GROUPS > 3:
                in3 = gid == 3
                present3 = _present(in3)
                m3n = m3
                if present3:
                    m3n = _group_max(m3, z, in3)
                msel = tl.where(in3[None, :], _shift(m3n)[:, None], msel)
            p = tl.exp2(z - msel)  # one exp per element, each against its own set's max
            if present0:
                m0, l0, acc0 = _accumulate(
                    m0, m0n, l0, acc0, tl.where(in0[None, :], p, 0.0), v, IN_KIND, USE_DOT, UPCAST, IEEE
                )
            if present1:
                m1, l1, acc1 = _accumulate(
                    m1, m1n, l1, acc1, tl.where(in1[None, :], p, 0.0), v, IN_KIND, USE_DOT, UPCAST, IEEE
                )
            if NUM_GROUPS > 2:
                if present2:
                    m2, l2, acc2 = _accumulate(
                        m2, m2n, l2, acc2, tl.where(in2[None, :], p, 0.0), v, IN_KIND, USE_DOT, UPCAST, IEEE
                    )
            if NUM_GROUPS > 3:
                if present3:
                    m3, l3, acc3 = _accumulate(
                        m3, m3n, l3, acc3, tl.where(in3[None, :], p, 0.0), v, IN_KIND, USE_DOT, UPCAST, IEEE
                    )

        if HAS_EXTRA:  # the extra set has its own logits, so its own exp
            inx = gid == EXTRA_GROUP
            if _present(inx):
                xb = tl.load(XBIAS + b64 * s_xb + offs_n * s_xn, mask=n_ok, other=0.0)
                zx = tl.where(inx[None, :], z + xb[None, :] * 1.4426950408889634, float("-inf"))
                mxn = tl.maximum(mx, tl.max(zx, 1))
                px = tl.exp2(zx - _shift(mxn)[:, None])
                mx, lx, accx = _accumulate(mx, mxn, lx, accx, px, v, IN_KIND, USE_DOT, UPCAST, IEEE)

    o_row = b64 * s_ob + row_i * s_om + head_r * s_oh + pid_s * s_op
    l_row = b64 * s_lb + row_i * s_lm + head_r * s_lh + pid_s * s_lp
    _store_set(O, LSE, o_row, l_row, 0, s_os, s_ls, offs_dv, s_od, row_ok, m0, l0, acc0, DV)
    if NUM_GROUPS > 1:
        _store_set(O, LSE, o_row, l_row, 1, s_os, s_ls, offs_dv, s_od, row_ok, m1, l1, acc1, DV)
    if NUM_GROUPS > 2:
        _store_set(O, LSE, o_row, l_row, 2, s_os, s_ls, offs_dv, s_od, row_ok, m2, l2, acc2, DV)
    if NUM_GROUPS > 3:
        _store_set(O, LSE, o_row, l_row, 3, s_os, s_ls, offs_dv, s_od, row_ok, m3, l3, acc3, DV)
    if HAS_EXTRA:
        _store_set(O, LSE, o_row, l_row, NUM_GROUPS, s_os, s_ls, offs_dv, s_od, row_ok, mx, lx, accx, DV)


@triton.jit
def _merge_splits(
    OP,
    LP,
    O,
    LSE,
    num_rows,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """BLOCK_R (batch, row, head, set) states per program: merge the splits' normalised partials
    (contiguous ``[..., NUM_SPLITS, DV]`` and ``[..., NUM_SPLITS]``); empty splits (``lse = -inf``)
    weigh 0."""
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_DV)
    r_ok = offs_r < num_rows
    rs_ok = r_ok[:, None] & (offs_s[None, :] < NUM_SPLITS)
    lse = tl.load(LP + offs_r[:, None] * NUM_SPLITS + offs_s[None, :], mask=rs_ok, other=float("-inf"))
    m = _shift(tl.max(lse, 1))
    w = tl.exp(lse - m[:, None])
    total = tl.sum(w, 1)
    o = tl.load(
        OP + (offs_r[:, None, None] * NUM_SPLITS + offs_s[None, :, None]) * DV + offs_d[None, None, :],
        mask=rs_ok[:, :, None] & (offs_d[None, None, :] < DV),
        other=0.0,
    )
    safe = tl.where(total > 0.0, total, 1.0)
    out = tl.sum(w[:, :, None] * o, 1) / safe[:, None]
    tl.store(O + offs_r[:, None] * DV + offs_d[None, :], out, mask=r_ok[:, None] & (offs_d[None, :] < DV))
    tl.store(LSE + offs_r, tl.where(total > 0.0, m + tl.log(safe), float("-inf")), mask=r_ok)


#: whether the kernels above run in Triton's CPU interpreter: ``@triton.jit`` read TRITON_INTERPRET when
#: they were defined (at import)
INTERPRET = type(_grouped_fwd).__name__ == "InterpretedFunction"
#: triton.language's own jit helpers (tl.zeros, tl.max, ...) were defined when triton was first imported;
#: if that was before TRITON_INTERPRET=1, interpreted kernels cannot call them (KERNELS.md lesson 2)
_LANGUAGE_COMPILED = INTERPRET and any(type(f).__name__ == "JITFunction" for f in (tl.zeros, tl.max, tl.cdiv))


# GPU configs. Registers: each set's accumulator costs BLOCK_M*BLOCK_DV/(32*warps) per thread (KERNELS.md).
_PREFILL_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 4, 2)]
]
_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bn, w, s in [(32, 4, 2), (64, 4, 2), (64, 4, 3), (128, 4, 2), (64, 8, 2)]
]


def _sets(args: dict) -> int:
    return args["NUM_GROUPS"] + int(args["HAS_EXTRA"])


def _prune_prefill(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    fits = [
        c
        for c in configs
        if _sets(args) * c.kwargs["BLOCK_M"] * args["BLOCK_DV"] <= 128 * 32 * c.num_warps
        and (args["IN_KIND"] != 0 or c.kwargs["BLOCK_M"] <= 64)  # fp32 tiles: shared memory
    ]
    return fits or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]))]


def _prune_decode(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    if args["USE_DOT"]:
        return configs
    # broadcast-multiply-sum holds a [M, BLOCK_N, BLOCK_D] product in registers
    fits = [
        c for c in configs if args["BLOCK_M"] * c.kwargs["BLOCK_N"] * args["BLOCK_D"] <= 64 * 32 * c.num_warps
    ]
    return fits or [min(configs, key=lambda c: c.kwargs["BLOCK_N"])]


_TUNE_KEY = [
    *("nq_bucket", "nk_bucket", "D", "DV", "NUM_GROUPS", "HAS_EXTRA", "CAUSAL", "HAS_WINDOW", "IN_KIND")
]
_prefill_tuned = triton.autotune(
    configs=_PREFILL_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune_prefill}
)(_grouped_fwd)
_decode_tuned = triton.autotune(
    configs=_DECODE_CONFIGS,
    key=[*_TUNE_KEY, "BLOCK_M", "NUM_SPLITS"],
    prune_configs_by={"early_config_prune": _prune_decode},
)(_grouped_fwd)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def autotune_enabled() -> bool:
    """GPU launches autotune unless ``MITIGATE_TRITON_AUTOTUNE=0`` (then fixed configs: quicker to compile,
    and nothing is benchmarked on a first call, e.g. one inside a CUDA-graph capture)."""
    return os.environ.get("MITIGATE_TRITON_AUTOTUNE", "1") != "0"


@cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_heuristic(programs: int, num_keys: int, sms: int, block_n: int = 64) -> int:
    """FA2's choice: the fewest splits within 85% of the best wave efficiency, each split >= 2 tiles."""
    if programs >= 0.8 * sms:
        return 1
    most = max(1, min(MAX_SPLITS, num_keys // (2 * block_n)))
    efficiency = []
    for splits in range(1, most + 1):
        waves = programs * splits / sms
        efficiency.append(waves / math.ceil(waves))
    best = max(efficiency)
    return next(i + 1 for i, e in enumerate(efficiency) if e >= 0.85 * best)


def _fixed_config(prefill: bool, sets: int, block_dv: int, in_kind: int, interpret: bool) -> dict:
    if interpret:  # the interpreter's cost is per (program x key tile): large tiles
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
    if not prefill:
        return {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    if sets <= 2 and block_dv <= 128 and in_kind != 0:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    if block_dv <= 128 and in_kind != 0:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}


def _strides(t: torch.Tensor | None, n: int) -> list[int]:
    return list(t.stride()) if t is not None else [0] * n


def _coef_strides(t: torch.Tensor | None) -> list[int]:
    if t is None:
        return [0, 0, 0]
    sb, sh, sn = t.stride()
    return [sb, 0 if t.shape[1] == 1 else sh, sn]  # Hc = 1 broadcasts over heads


def grouped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scaling: float,
    groups: torch.Tensor | None = None,
    num_groups: int = 1,
    extra_group: int | None = None,
    extra_bias: torch.Tensor | None = None,
    logit_scale: torch.Tensor | None = None,
    logit_abs: torch.Tensor | None = None,
    logit_bias: torch.Tensor | None = None,
    edit_row_start: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    kv_len: torch.Tensor | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    validate: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o [B, Nq, H, S, Dv], lse [B, Nq, H, S])``, fp32, per state set; the contract is in the module
    docstring. ``kv_len [B]`` (optional) is the number of filled key slots (static caches): keys
    ``>= kv_len[b]`` are dropped and row ``i`` sits at position ``i + kv_len[b] - Nq``. ``num_splits``
    forces the split-K count (1..16); ``validate`` forces the value checks on or off."""
    call = check_call(
        query,
        key,
        value,
        scaling=scaling,
        groups=groups,
        num_groups=num_groups,
        extra_group=extra_group,
        extra_bias=extra_bias,
        logit_scale=logit_scale,
        logit_abs=logit_abs,
        logit_bias=logit_bias,
        edit_row_start=edit_row_start,
        key_valid=key_valid,
        kv_len=kv_len,
        causal=causal,
        sliding_window=sliding_window,
        validate=validate,
    )
    if num_splits is not None and (
        isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS
    ):
        raise ValueError(
            f"grouped_attention: num_splits must be an int in 1..{MAX_SPLITS}, got {num_splits!r}"
        )
    if not query.is_cuda and not INTERPRET:
        raise RuntimeError(
            "grouped_attention: the Triton kernel needs CUDA tensors; on CPU set TRITON_INTERPRET=1 before "
            "importing mitigate.kernels.triton_grouped (slow, for tests), or call "
            "mitigate.kernels.grouped_reference.grouped_reference (same signature)"
        )
    if _LANGUAGE_COMPILED:
        raise RuntimeError(
            "grouped_attention: TRITON_INTERPRET=1 was set after triton was first imported (transformers "
            "imports it), so triton.language is compiled but this module is interpreted; set it before "
            "importing transformers or triton"
        )
    batch, heads, num_queries, dim = query.shape
    kv_heads, num_keys, dim_v = key.shape[1], key.shape[2], value.shape[3]
    sets = call.num_sets
    device = query.device
    o = torch.empty((batch, num_queries, heads, sets, dim_v), dtype=torch.float32, device=device)
    lse = torch.empty((batch, num_queries, heads, sets), dtype=torch.float32, device=device)
    if o.numel() == 0 and lse.numel() == 0:
        return o, lse
    if num_keys == 0:
        return o.zero_(), lse.fill_(-math.inf)

    ratio = heads // kv_heads
    pack = num_queries <= DECODE_MAX_ROWS
    rows = ratio * num_queries if pack else num_queries
    in_kind = _KIND[query.dtype]
    block_d, block_dv = max(16, _pow2(dim)), max(16, _pow2(dim_v))
    tuned = query.is_cuda and not INTERPRET and autotune_enabled()
    config = _fixed_config(not pack, sets, block_dv, in_kind, INTERPRET)
    if pack:
        block_m = _pow2(rows) if rows <= 2 else min(64, max(16, _pow2(rows)))
        config["BLOCK_M"] = block_m
    elif INTERPRET:
        config["BLOCK_M"] = min(64, max(16, _pow2(num_queries)))
    if INTERPRET:
        config["BLOCK_N"] = min(64, max(16, _pow2(num_keys)))
    use_dot = config["BLOCK_M"] >= 16
    programs = (batch * kv_heads * triton.cdiv(rows, config["BLOCK_M"])) if pack else None
    if num_splits is None:
        num_splits = 1
        if pack and query.is_cuda and not INTERPRET:
            num_splits = split_heuristic(programs, num_keys, _num_sms(device.index or 0))

    if num_splits > 1:
        o_out = torch.empty((*o.shape[:4], num_splits, dim_v), dtype=torch.float32, device=device)
        lse_out = torch.empty((*lse.shape, num_splits), dtype=torch.float32, device=device)
        o_strides, lse_strides = list(o_out.stride()), list(lse_out.stride())
    else:
        o_out, lse_out = o, lse
        o_strides = [*o.stride()[:4], 0, o.stride(4)]
        lse_strides = [*lse.stride(), 0]

    dummy = query
    coefs = (call.logit_scale, call.logit_abs, call.logit_bias)
    key_valid_bytes = call.key_valid.view(torch.uint8) if call.key_valid is not None else None
    args = [
        query,
        key,
        value,
        call.groups if call.groups is not None else dummy,
        key_valid_bytes if key_valid_bytes is not None else dummy,
        *(c if c is not None else dummy for c in coefs),
        call.extra_bias if call.extra_bias is not None else dummy,
        call.edit_row_start if call.edit_row_start is not None else dummy,
        call.kv_len if call.kv_len is not None else dummy,
        o_out,
        lse_out,
        *query.stride(),
        *key.stride(),
        *value.stride(),
        *_strides(call.groups, 2),
        *_strides(key_valid_bytes, 2),
        *(s for c in coefs for s in _coef_strides(c)),
        *_strides(call.extra_bias, 2),
        *o_strides,
        *lse_strides,
        num_queries,
        num_keys,
        heads,
        ratio,
        call.scaling * LOG2E,
        call.sliding_window or 0,
        min(_pow2(num_keys), 1 << 16),
        min(_pow2(num_queries), 1 << 16),
    ]
    meta = dict(
        D=dim,
        DV=dim_v,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        NUM_GROUPS=call.num_groups,
        HAS_EXTRA=call.extra_group is not None,
        EXTRA_GROUP=call.extra_group if call.extra_group is not None else -2,
        HAS_GID=call.groups is not None,
        HAS_KVALID=call.key_valid is not None,
        HAS_SCALE=call.logit_scale is not None,
        HAS_ABS=call.logit_abs is not None,
        HAS_BIAS=call.logit_bias is not None,
        HAS_EDIT=any(c is not None for c in coefs),
        COEF_ROWWISE=pack and ratio > 1 and any(c is not None and c.shape[1] > 1 for c in coefs),
        HAS_ROWSTART=call.edit_row_start is not None,
        HAS_KVLEN=call.kv_len is not None,
        CAUSAL=call.causal,
        HAS_WINDOW=call.sliding_window is not None,
        PACK=pack,
        NUM_SPLITS=num_splits,
        USE_DOT=use_dot,
        UPCAST=INTERPRET,  # the interpreter's bf16 tl.dot is broken (KERNELS.md lesson 3)
        IEEE=query.dtype == torch.float32,
        IN_KIND=in_kind,
    )
    grid_rows = rows
    grid_heads = batch * (kv_heads if pack else heads)

    def grid(m):
        return (triton.cdiv(grid_rows, m["BLOCK_M"]), grid_heads, num_splits)

    if tuned and pack:
        _decode_tuned[grid](*args, **meta, BLOCK_M=config["BLOCK_M"])
    elif tuned:
        _prefill_tuned[grid](*args, **meta)
    else:
        _grouped_fwd[grid](*args, **meta, **config)

    if num_splits > 1:
        block_s = max(2, _pow2(num_splits))
        # a few thousand partial elements per program on a GPU; as many rows as fit in the interpreter
        block_r = 64 if INTERPRET else max(1, min(16, 4096 // (block_s * block_dv)))
        num_states = batch * num_queries * heads * sets
        _merge_splits[(triton.cdiv(num_states, block_r),)](
            o_out,
            lse_out,
            o,
            lse,
            num_states,
            DV=dim_v,
            BLOCK_DV=block_dv,
            NUM_SPLITS=num_splits,
            BLOCK_S=block_s,
            BLOCK_R=block_r,
        )
    return o, lse
