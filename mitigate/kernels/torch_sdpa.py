"""``kernel="torch"``: the reference's numbers without the full probability matrix, from PyTorch SDPA.

Rows no op touches come from one plain SDPA call (flash on GPU and CPU). Edited rows take one of:

* **key scaling** -- logit edits that only scale logits (``z' = s*z``, per key and head) on every edited
  row: ``s_j * (q . k_j) = q . (s_j k_j)``, so SDPA on scaled keys is exact;
* **grouped** -- mass transfers (and key scaling) on many rows: per slice of heads, one SDPA call whose
  values are the one-hot key groups gives every row's group masses; the ops turn them into per-group
  factors ``r_g``; then one SDPA call per group, on values zeroed outside the group, gives the group's
  partial output ``O_g`` and ``out = sum_g r_g O_g / sum_g r_g m_g``. Memory stays O(T) like SDPA;
* **materialised rows** -- anything else (``|z|`` and bias edits), or few edited rows (decode, the last
  prompt row): the eager math on just those rows, in chunks bounded by a memory budget.

Head scaling is applied to the output at the end. All arithmetic on edited rows is fp32.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
import torch.nn.functional as F

from .edit import ROW_KINDS, AttentionEdit, LogitEdit, MassTransfer, apply_mass_fn
from .masks import causal_keep, keep_rows
from .reference import apply_probability_op, edit_logits

#: bytes of fp32 temporaries the materialised path may hold at once (per chunk of rows)
CHUNK_BYTES = int(os.environ.get("MITIGATE_CHUNK_BYTES", 32 * 2**20))
#: the materialised path's share of the inputs' size it may use; keeps peak memory near SDPA's
CHUNK_SHARE = 0.25
#: ... but never less than this (tiny inputs would otherwise be cut into one-row chunks)
MIN_CHUNK_BYTES = 2**20
#: on a GPU each chunk costs tens of kernel launches: fewer, larger chunks (still O(T) memory)
MIN_CHUNK_BYTES_GPU = 16 * 2**20
#: at most this many combined key groups on the grouped path
MAX_GROUPS = 8
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
    edit: AttentionEdit | None,
    scaling: float,
    causal: bool,
) -> torch.Tensor:
    """Edited attention output ``[B, Nq, H, D]`` (see module docstring)."""
    core = [op for op in edit.ops if op.kind != "head"] if edit is not None else []
    if not core:
        out = sdpa(query, key, value, attention_mask, scaling, causal)
    elif _key_scaling_only(core):
        out = _key_scaled(query, key, value, attention_mask, core, scaling, causal)
    else:
        out = _edited_rows(query, key, value, attention_mask, core, scaling, causal)
    for op in edit.head_ops if edit is not None else ():
        factor = torch.where(op.rows[:, None, :], op.scale[:, :, None].to(torch.float32), 1.0)
        out = (out.float() * factor[..., None]).to(out.dtype)
    return out.transpose(1, 2).to(query.dtype)


# -- key scaling --------------------------------------------------------------------------------
def _scale_only(op) -> bool:
    return isinstance(op, LogitEdit) and op.abs is None and op.bias is None


def _key_scaling_only(core) -> bool:
    return all(_scale_only(op) for op in core) and all(op.rows is core[0].rows for op in core)


def _scaled_keys(key: torch.Tensor, ops: list[LogitEdit], heads: int) -> torch.Tensor:
    """Keys with every op's per-key scale folded in, ``[B, Hk, Nk, D]`` (expanded to H if per head)."""
    scale = None
    for op in ops:
        scale = op.scale if scale is None else scale * op.scale
    if scale.shape[1] != 1 and key.shape[1] != heads:
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
    return key * scale[..., None].to(key.dtype)


def _key_scaled(query, key, value, mask, ops, scaling, causal) -> torch.Tensor:
    heads = query.shape[1]
    q = query.float()
    k = _scaled_keys(key.float(), ops, heads)
    v = value.float()
    if k.shape[1] != v.shape[1]:
        v = v.repeat_interleave(k.shape[1] // v.shape[1], dim=1)
    edited = sdpa(q, k, v, mask, scaling, causal)
    # a second SDPA call for the unedited rows is cheaper than a host sync to find out there are none
    plain = sdpa(query, key, value, mask, scaling, causal).float()
    return torch.where(ops[0].rows[:, None, :, None], edited, plain)


# -- edited rows --------------------------------------------------------------------------------
def _union_rows(core) -> torch.Tensor:
    rows = core[0].rows
    for op in core[1:]:
        rows = rows | op.rows
    return rows


def _chunk_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> int:
    """Rows per chunk: about four fp32 ``[B, H, rows, Nk]`` temporaries within the budget."""
    bsz, heads, _, _ = query.shape
    inputs = sum(t.numel() * t.element_size() for t in (query, key, value))
    floor = MIN_CHUNK_BYTES_GPU if query.is_cuda and MIN_CHUNK_BYTES else MIN_CHUNK_BYTES
    budget = min(CHUNK_BYTES, max(int(CHUNK_SHARE * inputs), floor))
    return max(1, budget // (4 * 4 * bsz * heads * key.shape[2]))


def _edited_rows(query, key, value, mask, core, scaling, causal) -> torch.Tensor:
    nq = query.shape[2]
    chunk = _chunk_rows(query, key, value)
    if nq <= chunk:  # decode and short prompts: every row at once, no plain pass, no host sync
        return _materialised(query, key, value, mask, core, scaling, causal, None)
    rows = _union_rows(core)
    spans = [op.span for op in core]
    if all(span is not None for span in spans):  # host-side bounds: no read-back from the GPU
        start, stop = min(s[0] for s in spans), max(s[1] for s in spans)
        selected = torch.arange(start, max(start, stop), device=query.device)
    else:
        selected = rows.any(dim=0).nonzero().squeeze(1)  # one host sync per edited layer at prefill
    out = sdpa(query, key, value, mask, scaling, causal)
    if selected.numel() == 0:
        return out
    if _grouped_ok(core) and _grouped_cheaper(selected.numel(), chunk, nq, core):
        out = out.float()
        _grouped(query, key, value, mask, core, scaling, causal, rows, out)
        return out
    edited = _materialised(query, key, value, mask, core, scaling, causal, selected)
    plain = out[:, :, selected]
    out[:, :, selected] = torch.where(rows[:, None, selected, None], edited.to(out.dtype), plain)
    return out


def _subset(op, index: torch.Tensor):
    return replace(op, rows=op.rows[:, index], span=None)


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


def _transfer(p: torch.Tensor, op: MassTransfer) -> torch.Tensor:
    """``transfer_mass`` of the reference with fewer passes: masses by scatter-add, one per-key gather."""
    index = op.groups[:, None, None, :].expand(p.shape)
    masses = p.new_zeros(*p.shape[:-1], op.num_groups).scatter_add_(-1, index, p)
    new = apply_mass_fn(op, masses, op.rows)
    tiny = torch.finfo(p.dtype).tiny
    total = new.sum(-1, keepdim=True)
    ratio = new / masses.clamp_min(tiny) / total.clamp_min(tiny)
    keep = op.rows[:, None, :, None] & (total > 0)
    ratio = torch.where(keep, ratio, 1.0)
    return p * ratio.gather(-1, index)


def _materialised(query, key, value, mask, core, scaling, causal, selected: torch.Tensor | None):
    """The eager math on rows ``selected`` (every row if ``None``), chunk by chunk, fp32
    ``[B, H, rows, D]``. Grouped-query heads share their K/V through a reshape, never a copy."""
    bsz, heads, nq, dim = query.shape
    kv_heads, nk = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    chunk = _chunk_rows(query, key, value)
    count = nq if selected is None else selected.numel()
    keys_t = key.transpose(-1, -2)
    outs = []
    for start in range(0, count, chunk):
        if selected is None and count <= chunk:
            index, q, ops = None, query, core
        else:
            index = torch.arange(start, min(count, start + chunk), device=query.device)
            if selected is not None:
                index = selected[index]
            q, ops = query[:, :, index], [_subset(op, index) for op in core]
        rows = q.shape[2]
        z = _matmul_f32(q.reshape(bsz, kv_heads, groups * rows, dim), keys_t).view(bsz, heads, rows, nk)
        z.mul_(scaling)
        for op in ops:
            if isinstance(op, LogitEdit):
                z = edit_logits(z, op)
        keep = None
        if mask is not None or (causal and nq > 1):
            positions = index if index is not None else torch.arange(nq, device=query.device)
            keep = keep_rows(mask, positions, nq, nk, causal, query.device)
        if keep is not None:
            z = z.masked_fill(~keep, float("-inf"))
        p = torch.softmax(z, dim=-1)
        if keep is not None:
            p = p.nan_to_num_(0.0)  # fully masked (padding) rows
        for op in ops:
            if isinstance(op, MassTransfer):
                p = _transfer(p, op)
            elif op.kind in ROW_KINDS:
                rows_index = index if index is not None else torch.arange(nq, device=query.device)
                p = apply_probability_op(p, op, rows_index)
        p = p.to(value.dtype).view(bsz, kv_heads, groups * rows, nk)
        outs.append(_matmul_f32(p, value).view(bsz, heads, rows, dim))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


# -- grouped partial states ---------------------------------------------------------------------
def _grouped_ok(core) -> bool:
    if any(op.kind in ROW_KINDS for op in core):
        return False
    logits = [op for op in core if isinstance(op, LogitEdit)]
    masses = [op for op in core if isinstance(op, MassTransfer)]
    if not masses or not all(_scale_only(op) for op in logits):
        return False
    if logits and not all(op.rows is masses[0].rows for op in (*logits, *masses)):
        return False  # key scaling must cover exactly the rows the mass ops see
    total = 1
    for op in masses:
        total *= op.num_groups
    return total <= MAX_GROUPS


def _grouped_cheaper(num_rows: int, chunk: int, num_queries: int, core) -> bool:
    """Grouped costs about G+1 SDPA passes over every row; materialised rows cost about four times
    SDPA's work per row (eager matmuls, softmax, edits) plus a Python loop over chunks."""
    groups = 1
    for op in core:
        if isinstance(op, MassTransfer):
            groups *= op.num_groups
    chunks = -(-num_rows // chunk)
    return chunks > MAX_CHUNKS or 4 * num_rows > (groups + 1) * num_queries


def _combined_groups(masses: list[MassTransfer]) -> tuple[torch.Tensor, int, list[torch.Tensor]]:
    """One partition refining every op's: ``(ids [B, Nk], count, per-op map combined -> op group)``."""
    ids = torch.zeros_like(masses[0].groups)
    count = 1
    for op in masses:
        ids = ids * op.num_groups + op.groups
        count *= op.num_groups
    maps = []
    stride = count
    for op in masses:
        stride //= op.num_groups
        maps.append((torch.arange(count, device=ids.device) // stride) % op.num_groups)
    return ids, count, maps


def _grouped(query, key, value, mask, core, scaling, causal, rows: torch.Tensor, out: torch.Tensor) -> None:
    """Write the edited output of rows ``rows`` into ``out`` (``[B, H, Nq, D]`` fp32, the plain output),
    from G+1 SDPA calls per slice of heads, so temporaries are a fraction of the inputs."""
    logits = [op for op in core if isinstance(op, LogitEdit)]
    masses = [op for op in core if isinstance(op, MassTransfer)]
    bsz, heads, nq, dim = query.shape
    ids, count, maps = _combined_groups(masses)
    onehot = F.one_hot(ids, count).to(torch.float32)  # [B, Nk, G]
    q = query.float()
    k = _scaled_keys(key.float(), logits, heads) if logits else key.float()
    v = value.float()
    if k.shape[1] != v.shape[1]:
        v = v.repeat_interleave(k.shape[1] // v.shape[1], dim=1)
    kv_heads = k.shape[1]
    group = heads // kv_heads
    slice_kv = max(1, kv_heads // 8)  # eight slices of heads: temporaries stay a fraction of the inputs
    for kv0 in range(0, kv_heads, slice_kv):
        kv1 = min(kv_heads, kv0 + slice_kv)
        h0, h1 = kv0 * group, kv1 * group
        qs, ks, vs = q[:, h0:h1], k[:, kv0:kv1], v[:, kv0:kv1]
        width = max(dim, count)  # SDPA kernels want equal q/k/v head dims
        mass_values = F.pad(onehot, (0, width - count))[:, None].expand(-1, kv1 - kv0, -1, -1)
        ks_w = F.pad(ks, (0, width - dim)) if width > dim else ks
        qs_w = F.pad(qs, (0, width - dim)) if width > dim else qs
        m = sdpa(qs_w, ks_w, mass_values, mask, scaling, causal)[..., :count]  # [B, h, Nq, G]
        factor = torch.ones_like(m)
        current = m
        for op, to_op in zip(masses, maps, strict=True):
            agg = torch.zeros(*m.shape[:-1], op.num_groups, dtype=m.dtype, device=m.device)
            agg.index_add_(-1, to_op, current)
            new = apply_mass_fn(op, agg, op.rows)
            ratio = torch.where(agg > 0, new / agg.clamp_min(torch.finfo(agg.dtype).tiny), 0.0)
            ratio = torch.where(op.rows[:, None, :, None], ratio, 1.0)[..., to_op]  # per combined group
            current = current * ratio
            # renormalise after each op, as the reference does, so the next op sees probabilities
            total = current.sum(-1, keepdim=True)
            scale = torch.where(total > 0, 1.0 / total.clamp_min(torch.finfo(total.dtype).tiny), 1.0)
            current = current * scale
            factor = factor * ratio * scale
        acc = torch.zeros(bsz, h1 - h0, nq, dim, dtype=torch.float32, device=query.device)
        for g in range(count):
            part = sdpa(qs, ks, vs * onehot[:, None, :, g : g + 1], mask, scaling, causal)
            acc += factor[..., g : g + 1] * part
        out[:, h0:h1] = torch.where(rows[:, None, :, None], acc, out[:, h0:h1])
