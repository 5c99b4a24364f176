"""``kernel="torch"``: the reference's numbers without the full probability matrix, from PyTorch SDPA.

This module runs any call of any plan (prefill, chunks, decode); decode steps usually take the prepared
fast path of :mod:`.torch_decode` instead. Rows no stage touches come from one plain SDPA call (flash on
GPU and CPU). Edited rows take one of:

* **key scaling** -- plans whose only change is scaling logits (``z' = s*z``, per key) on the same rows:
  ``s_j * (q . k_j) = q . (s_j k_j)``, so SDPA on scaled keys is exact;
* **grouped** -- a VAR rule (plus key scaling on the same rows) on many rows: per slice of heads, one SDPA
  call whose values are the one-hot key groups gives every row's group masses; the rule turns them into
  per-group factors ``r_g``; then one SDPA call per group, on values zeroed outside the group, gives the
  group's partial output ``O_g`` and ``out = sum_g r_g O_g``. Memory stays O(T) like SDPA;
* **materialised rows** -- anything else (``|z|`` and bias edits, GIFT), or few edited rows (decode, the
  last prompt row): the eager math on just those rows, in chunks bounded by a memory budget.

Head scaling is applied to the output at the end. All arithmetic on edited rows is fp32.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..plan import LayerPlan, VarRule, edit_logits, var_coefficients
from .call import KernelCall
from .masks import causal_keep, keep_rows
from .reference import query_rows

#: bytes of fp32 temporaries the materialised path may hold at once (per chunk of rows)
CHUNK_BYTES = int(os.environ.get("MITIGATE_CHUNK_BYTES", 32 * 2**20))
#: the materialised path's share of the inputs' size it may use; keeps peak memory near SDPA's
CHUNK_SHARE = 0.25
#: ... but never less than this (tiny inputs would otherwise be cut into one-row chunks)
MIN_CHUNK_BYTES = 2**20
#: on a GPU each chunk costs tens of kernel launches: fewer, larger chunks (still O(T) memory)
MIN_CHUNK_BYTES_GPU = 16 * 2**20
#: the materialised path is taken for up to this many chunks of rows (a Python loop, launch-bound on GPU)
MAX_CHUNKS = 64


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float, causal: bool
) -> torch.Tensor:
    """Plain SDPA ``[B, H, Nq, Dv]`` with GQA and bottom-right causality, as transformers calls it."""
    nq, nk = q.shape[2], k.shape[2]
    is_causal = False
    if mask is None and causal and nq > 1:
        if nq == nk:
            is_causal = True
        else:  # SDPA's is_causal is top-left aligned; decode chunks need bottom-right
            mask = causal_keep(nq, nk, q.device)[None, None]
    kwargs = {}
    if q.shape[1] != k.shape[1]:
        if mask is None and k.shape[-1] == v.shape[-1] <= 256:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scaling, **kwargs
    )


def torch_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    plan: LayerPlan | None,
    call: KernelCall,
) -> torch.Tensor:
    """Edited attention output ``[B, Nq, H, D]`` (see module docstring)."""
    core = plan.core if plan is not None else []
    scaling, causal = call.scaling, call.causal
    if not core:
        out = sdpa(query, key, value, attention_mask, scaling, causal)
    elif _key_scaling_only(plan):
        out = _key_scaled(query, key, value, attention_mask, plan, call)
    else:
        out = _edited_rows(query, key, value, attention_mask, plan, call)
    index = torch.arange(query.shape[2], device=query.device)
    for stage in plan.heads if plan is not None else ():
        rows = query_rows(stage.rows, call, index)
        factor = torch.where(rows[:, None, :], stage.scale[:, :, None].to(torch.float32), 1.0)
        out = (out.float() * factor[..., None]).to(out.dtype)
    return out.transpose(1, 2).to(query.dtype)


# -- key scaling --------------------------------------------------------------------------------
def _key_scaling_only(plan: LayerPlan) -> bool:
    return (
        not plan.rules
        and all(stage.scale_only for stage in plan.logits)
        and all(stage.rows is plan.logits[0].rows for stage in plan.logits)
    )


def _key_scale(plan: LayerPlan, num_keys: int, offset: int) -> torch.Tensor:
    """The product of the plan's per-key logit scales over a call's keys, ``[B, Hc, Nk]``."""
    scale = None
    for stage in plan.logits:
        s = stage.keys(num_keys, offset)[0]
        scale = s if scale is None else scale * s
    return scale


def _scaled_keys(key: torch.Tensor, scale: torch.Tensor, heads: int) -> torch.Tensor:
    """Keys with a per-key scale ``[B, Hc, Nk]`` folded in (expanded to ``heads`` if per head)."""
    if scale.shape[1] != 1 and key.shape[1] != heads:
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
    return key * scale[..., None].to(key.dtype)


def _key_scaled(query, key, value, mask, plan: LayerPlan, call: KernelCall) -> torch.Tensor:
    heads = query.shape[1]
    q = query.float()
    k = _scaled_keys(key.float(), _key_scale(plan, key.shape[2], call.key_offset), heads)
    v = value.float()
    if k.shape[1] != v.shape[1]:
        v = v.repeat_interleave(k.shape[1] // v.shape[1], dim=1)
    edited = sdpa(q, k, v, mask, call.scaling, call.causal)
    # a second SDPA call for the unedited rows is cheaper than a host sync to find out there are none
    plain = sdpa(query, key, value, mask, call.scaling, call.causal).float()
    rows = query_rows(plan.logits[0].rows, call, torch.arange(query.shape[2], device=query.device))
    return torch.where(rows[:, None, :, None], edited, plain)


# -- edited rows --------------------------------------------------------------------------------
def _chunk_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> int:
    """Rows per chunk: about four fp32 ``[B, H, rows, Nk]`` temporaries within the budget."""
    bsz, heads, _, _ = query.shape
    inputs = sum(t.numel() * t.element_size() for t in (query, key, value))
    floor = MIN_CHUNK_BYTES_GPU if query.is_cuda and MIN_CHUNK_BYTES else MIN_CHUNK_BYTES
    budget = min(CHUNK_BYTES, max(int(CHUNK_SHARE * inputs), floor))
    return max(1, budget // (4 * 4 * bsz * heads * key.shape[2]))


def _union_rows(plan: LayerPlan, call: KernelCall, index: torch.Tensor) -> torch.Tensor:
    rows = None
    for stage in plan.core:
        mask = query_rows(stage.rows, call, index)
        rows = mask if rows is None else rows | mask
    return rows


def _edited_rows(query, key, value, mask, plan: LayerPlan, call: KernelCall) -> torch.Tensor:
    nq = query.shape[2]
    chunk = _chunk_rows(query, key, value)
    if nq <= chunk:  # decode and short prompts: every row at once, no plain pass, no host sync
        return _materialised(query, key, value, mask, plan, call, None)
    first = plan.first_row(core_only=True)
    start = 0 if call.past is None else min(nq, max(0, first - call.past))
    selected = torch.arange(start, nq, device=query.device)  # host-side bounds: no read-back from the GPU
    out = sdpa(query, key, value, mask, call.scaling, call.causal)
    if selected.numel() == 0:
        return out
    rows = _union_rows(plan, call, torch.arange(nq, device=query.device))
    if _grouped_ok(plan) and _grouped_cheaper(selected.numel(), chunk, nq, plan):
        out = out.float()
        _grouped(query, key, value, mask, plan, call, rows, out)
        return out
    edited = _materialised(query, key, value, mask, plan, call, selected)
    plain = out[:, :, selected]
    out[:, :, selected] = torch.where(rows[:, None, selected, None], edited.to(out.dtype), plain)
    return out


_BMM_OUT_DTYPE: dict[str, bool] = {}


def _matmul_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 4-D operands of one dtype, accumulated and returned in fp32 without upcast copies
    where the backend can (``bmm(..., out_dtype=float32)`` on CUDA)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _BMM_OUT_DTYPE.get(a.device.type, True):
        lead = a.shape[:-2]
        try:
            a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
            return torch.bmm(a3, b3, out_dtype=torch.float32).view(*lead, a.shape[-2], b.shape[-1])
        except (TypeError, RuntimeError):
            _BMM_OUT_DTYPE[a.device.type] = False
    return a.float() @ b.float()


def _materialised(query, key, value, mask, plan: LayerPlan, call: KernelCall, selected: torch.Tensor | None):
    """The eager math on rows ``selected`` (every row if ``None``), chunk by chunk, fp32
    ``[B, H, rows, D]``. Grouped-query heads share their K/V through a reshape, never a copy."""
    bsz, heads, nq, dim = query.shape
    kv_heads, nk = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    chunk = _chunk_rows(query, key, value)
    count = nq if selected is None else selected.numel()
    keys_t = key.transpose(-1, -2)
    logit_keys = [(stage, stage.keys(nk, call.key_offset)) for stage in plan.logits]
    rule_keys = [(rule, rule.keys(nk, call.key_offset)) for rule in plan.rules]
    stats = call.rule_stats(plan)
    outs = []
    for start in range(0, count, chunk):
        index = torch.arange(start, min(count, start + chunk), device=query.device)
        if selected is not None:
            index = selected[index]
        q = query if index.numel() == nq else query[:, :, index]
        rows = q.shape[2]
        z = _matmul_f32(q.reshape(bsz, kv_heads, groups * rows, dim), keys_t).view(bsz, heads, rows, nk)
        z.mul_(call.scaling)
        for stage, terms in logit_keys:
            on = query_rows(stage.rows, call, index)
            z = torch.where(on[:, None, :, None], edit_logits(z, *terms), z)
        keep = keep_rows(mask, index, nq, nk, call.causal, query.device)
        if keep is not None:
            z = z.masked_fill(~keep, float("-inf"))
        p = torch.softmax(z, dim=-1)
        if keep is not None:
            p = p.nan_to_num_(0.0)  # fully masked (padding) rows
        for rule, terms in rule_keys:
            rows_on = query_rows(rule.rows, call, index)
            if isinstance(rule, VarRule):
                p = _var_in_place(p, rule, terms["groups"], rows_on, stats)
            else:
                p = rule.apply(p, terms, rows_on, stats)
        p = p.to(value.dtype).view(bsz, kv_heads, groups * rows, nk)
        outs.append(_matmul_f32(p, value).view(bsz, heads, rows, dim))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _var_in_place(
    p: torch.Tensor, rule: VarRule, groups: torch.Tensor, rows: torch.Tensor, stats
) -> torch.Tensor:
    """:meth:`VarRule.apply` with one full-size temporary: masses by scatter-add, each key's factor
    (renormalised in group space) gathered once and multiplied in place."""
    index = groups[:, None, None, :].expand(p.shape)
    masses = p.new_zeros(*p.shape[:-1], rule.num_groups).scatter_add_(-1, index, p)
    coef, gate = var_coefficients(masses, rule)
    gate = gate & rows[:, None, :]
    if stats is not None:
        stats.var(rule, masses, gate, rows)
    total = (coef * masses).sum(-1, keepdim=True)  # 1 up to rounding: VAR moves mass, it keeps the sum
    factor = torch.where((gate & (total[..., 0] > 0))[..., None], coef / total.clamp_min(1e-30), 1.0)
    return p.mul_(factor.gather(-1, index))


# -- grouped partial states ---------------------------------------------------------------------
def _grouped_ok(plan: LayerPlan) -> bool:
    """One VAR rule, plus key scaling on exactly the rows the rule sees."""
    if len(plan.rules) != 1 or not isinstance(plan.rules[0], VarRule):
        return False
    rule = plan.rules[0]
    return all(stage.scale_only and stage.rows is rule.rows for stage in plan.logits)


def _grouped_cheaper(num_rows: int, chunk: int, num_queries: int, plan: LayerPlan) -> bool:
    """Grouped costs about G+1 SDPA passes over every row; materialised rows cost about four times
    SDPA's work per row (eager matmuls, softmax, edits) plus a Python loop over chunks."""
    groups = plan.rules[0].num_groups
    chunks = -(-num_rows // chunk)
    return chunks > MAX_CHUNKS or 4 * num_rows > (groups + 1) * num_queries


def _grouped(query, key, value, mask, plan: LayerPlan, call: KernelCall, rows: torch.Tensor, out) -> None:
    """Write the edited output of rows ``rows`` into ``out`` (``[B, H, Nq, D]`` fp32, the plain output),
    from G+1 SDPA calls per slice of heads, so temporaries are a fraction of the inputs."""
    rule: VarRule = plan.rules[0]
    bsz, heads, nq, dim = query.shape
    count = rule.num_groups
    groups = rule.keys(key.shape[2], call.key_offset)["groups"]
    onehot = F.one_hot(groups, count).to(torch.float32)  # [B, Nk, G]
    q = query.float()
    k = key.float()
    if plan.logits:
        k = _scaled_keys(k, _key_scale(plan, key.shape[2], call.key_offset), heads)
    v = value.float()
    if k.shape[1] != v.shape[1]:
        v = v.repeat_interleave(k.shape[1] // v.shape[1], dim=1)
    kv_heads = k.shape[1]
    group = heads // kv_heads
    on = query_rows(rule.rows, call, torch.arange(nq, device=query.device))  # [B, Nq]
    stats = call.rule_stats(plan)
    slice_kv = max(1, kv_heads // 8)  # eight slices of heads: temporaries stay a fraction of the inputs
    for kv0 in range(0, kv_heads, slice_kv):
        kv1 = min(kv_heads, kv0 + slice_kv)
        h0, h1 = kv0 * group, kv1 * group
        qs, ks, vs = q[:, h0:h1], k[:, kv0:kv1], v[:, kv0:kv1]
        width = max(dim, count)  # SDPA kernels want equal q/k/v head dims
        mass_values = F.pad(onehot, (0, width - count))[:, None].expand(-1, kv1 - kv0, -1, -1)
        ks_w = F.pad(ks, (0, width - dim)) if width > dim else ks
        qs_w = F.pad(qs, (0, width - dim)) if width > dim else qs
        m = sdpa(qs_w, ks_w, mass_values, mask, call.scaling, call.causal)[..., :count]  # [B, h, Nq, G]
        coef, gate = var_coefficients(m, rule)
        gate = gate & on[:, None, :]
        if stats is not None:
            stats.var(rule, m, gate, on)
        factor = torch.where(gate[..., None], coef, 1.0)
        acc = torch.zeros(bsz, h1 - h0, nq, dim, dtype=torch.float32, device=query.device)
        for g in range(count):
            part = sdpa(qs, ks, vs * onehot[:, None, :, g : g + 1], mask, call.scaling, call.causal)
            acc += factor[..., g : g + 1] * part
        out[:, h0:h1] = torch.where(rows[:, None, :, None], acc, out[:, h0:h1])
