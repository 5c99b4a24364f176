"""Grouped-state attention in plain torch: the ground truth of :mod:`mitigate.kernels.triton_grouped`.

Same signature and outputs as :func:`mitigate.kernels.triton_grouped.grouped_attention` (see its module
docstring for the contract). Probabilities are materialised in fp32, ``B*H*Nq*Nk`` floats per state set,
so this is for checking the fused kernel and for small inputs (a CPU fallback), not for speed.

The input checks live here too, so the reference and the kernel accept and refuse exactly the same calls
(and this module does not need triton).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: at most this many state sets (groups plus the optional extra set) per call
MAX_SETS = 4
MAX_HEAD_DIM = 256
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class GroupedCall:
    """A checked call: tensors in the dtypes the kernels read, optional ones ``None``."""

    query: torch.Tensor  # [B, H, Nq, D]
    key: torch.Tensor  # [B, Hkv, Nk, D]
    value: torch.Tensor  # [B, Hkv, Nk, Dv]
    scaling: float
    groups: torch.Tensor | None  # [B, Nk] integer
    num_groups: int
    extra_group: int | None
    extra_bias: torch.Tensor | None  # fp32 [B, Nk]
    logit_scale: torch.Tensor | None  # fp32 [B, Hc, Nk]
    logit_abs: torch.Tensor | None
    logit_bias: torch.Tensor | None
    edit_row_start: torch.Tensor | None  # int64 [B]
    key_valid: torch.Tensor | None  # bool [B, Nk]
    kv_len: torch.Tensor | None  # int64 [B]
    causal: bool
    sliding_window: int | None

    @property
    def num_sets(self) -> int:
        return self.num_groups + (self.extra_group is not None)


def _fail(message: str) -> None:
    raise ValueError(f"grouped_attention: {message}")


def _shape(t: torch.Tensor, name: str, shape: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != shape:
        _fail(f"{name} must have shape {what} = {list(shape)}, got {list(t.shape)}")


def _device(t: torch.Tensor, name: str, device: torch.device) -> None:
    if t.device != device:
        _fail(f"{name} is on {t.device} but query is on {device}")


def _is_int(t: torch.Tensor) -> bool:
    return not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool


def should_validate(validate: bool | None) -> bool:
    """``None``: check tensor values unless capturing a CUDA graph or tracing with torch.compile
    (the checks read values back to the host, which neither allows)."""
    if validate is not None:
        return validate
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_call(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scaling: float,
    groups: torch.Tensor | None,
    num_groups: int,
    extra_group: int | None,
    extra_bias: torch.Tensor | None,
    logit_scale: torch.Tensor | None,
    logit_abs: torch.Tensor | None,
    logit_bias: torch.Tensor | None,
    edit_row_start: torch.Tensor | None,
    key_valid: torch.Tensor | None,
    kv_len: torch.Tensor | None,
    causal: bool,
    sliding_window: int | None,
    validate: bool | None,
) -> GroupedCall:
    """Check shapes, dtypes and devices always; tensor values (NaN, ranges) when :func:`should_validate`."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not torch.is_tensor(t) or t.dim() != 4:
            _fail(f"{name} must be a 4-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in _FLOATS:
            _fail(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        _fail(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    device = query.device
    _device(key, "key", device)
    _device(value, "value", device)
    batch, heads, _, dim = query.shape
    kv_heads, num_keys = key.shape[1], key.shape[2]
    if key.shape[0] != batch or value.shape[0] != batch:
        _fail(f"batch sizes differ: query {batch}, key {key.shape[0]}, value {value.shape[0]}")
    if key.shape[3] != dim:
        _fail(f"key head dim {key.shape[3]} differs from query head dim {dim}")
    if value.shape[1] != kv_heads or value.shape[2] != num_keys:
        _fail(f"value {list(value.shape)} must be [B, Hkv, Nk, Dv] with key's Hkv={kv_heads}, Nk={num_keys}")
    if kv_heads == 0 or heads % kv_heads:
        _fail(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    if not 1 <= dim <= MAX_HEAD_DIM or not 1 <= value.shape[3] <= MAX_HEAD_DIM:
        _fail(f"head dims must be in 1..{MAX_HEAD_DIM}, got D={dim}, Dv={value.shape[3]}")
    if not math.isfinite(float(scaling)):
        _fail(f"scaling must be finite, got {scaling}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or not 1 <= num_groups <= MAX_SETS:
        _fail(f"num_groups must be an int in 1..{MAX_SETS}, got {num_groups!r}")
    if extra_group is not None:
        if not isinstance(extra_group, int) or not 0 <= extra_group < num_groups:
            _fail(f"extra_group must be a group id in 0..{num_groups - 1}, got {extra_group!r}")
        if num_groups + 1 > MAX_SETS:
            _fail(f"num_groups ({num_groups}) plus the extra set exceeds {MAX_SETS} state sets")
        if extra_bias is None:
            _fail("extra_group needs extra_bias (use zeros for an unbiased copy of the group)")
    elif extra_bias is not None:
        _fail("extra_bias is given without extra_group")
    if sliding_window is not None and (
        isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1
    ):
        _fail(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    check = should_validate(validate)

    if groups is not None:
        _device(groups, "groups", device)
        _shape(groups, "groups", (batch, num_keys), "[B, Nk]")
        if not _is_int(groups):
            _fail(f"groups must be an integer tensor, got {groups.dtype}")
        if check and groups.numel() and (groups.min() < -1 or groups.max() >= num_groups):
            _fail(
                f"groups values must lie in [-1, {num_groups}) (num_groups={num_groups}), "
                f"got min {int(groups.min())}, max {int(groups.max())}"
            )
    if extra_bias is not None:
        _device(extra_bias, "extra_bias", device)
        _shape(extra_bias, "extra_bias", (batch, num_keys), "[B, Nk]")
        if not extra_bias.dtype.is_floating_point:
            _fail(f"extra_bias must be floating point, got {extra_bias.dtype}")
        extra_bias = extra_bias.float()
        if check and (extra_bias.isnan() | (extra_bias == math.inf)).any():
            _fail("extra_bias holds NaN or +inf (only -inf is allowed: it drops the key from the extra set)")
    coefs = {}
    for name, t, allow_neg_inf in (
        ("logit_scale", logit_scale, False),
        ("logit_abs", logit_abs, False),
        ("logit_bias", logit_bias, True),
    ):
        if t is None:
            coefs[name] = None
            continue
        _device(t, name, device)
        if t.dim() != 3 or t.shape[0] != batch or t.shape[1] not in (1, heads) or t.shape[2] != num_keys:
            _fail(f"{name} must have shape [B, Hc, Nk] with Hc in (1, {heads}), got {list(t.shape)}")
        if not t.dtype.is_floating_point:
            _fail(f"{name} must be floating point, got {t.dtype}")
        t = t.float()
        if check:
            bad = t.isnan() | (t == math.inf) if allow_neg_inf else ~t.isfinite()
            if bad.any():
                allowed = "NaN and +inf are rejected; -inf drops a key" if allow_neg_inf else "must be finite"
                _fail(f"{name} holds non-finite values ({allowed})")
        coefs[name] = t
    if edit_row_start is not None:
        _device(edit_row_start, "edit_row_start", device)
        _shape(edit_row_start, "edit_row_start", (batch,), "[B]")
        if not _is_int(edit_row_start):
            _fail(f"edit_row_start must be an integer tensor, got {edit_row_start.dtype}")
        edit_row_start = edit_row_start.long()
    if key_valid is not None:
        _device(key_valid, "key_valid", device)
        _shape(key_valid, "key_valid", (batch, num_keys), "[B, Nk]")
        if key_valid.dtype != torch.bool:
            _fail(f"key_valid must be a bool tensor, got {key_valid.dtype}")
    if kv_len is not None:
        _device(kv_len, "kv_len", device)
        _shape(kv_len, "kv_len", (batch,), "[B]")
        if not _is_int(kv_len):
            _fail(f"kv_len must be an integer tensor, got {kv_len.dtype}")
        if check and kv_len.numel() and (kv_len.min() < 0 or kv_len.max() > num_keys):
            _fail(f"kv_len values must lie in [0, Nk={num_keys}]")
        kv_len = kv_len.long()
    return GroupedCall(
        query=query,
        key=key,
        value=value,
        scaling=float(scaling),
        groups=groups,
        num_groups=num_groups,
        extra_group=extra_group,
        extra_bias=extra_bias,
        logit_scale=coefs["logit_scale"],
        logit_abs=coefs["logit_abs"],
        logit_bias=coefs["logit_bias"],
        edit_row_start=edit_row_start,
        key_valid=key_valid,
        kv_len=kv_len,
        causal=bool(causal),
        sliding_window=sliding_window,
    )


def query_positions(call: GroupedCall) -> torch.Tensor:
    """Absolute position ``[B, Nq]`` of each query row: ``i + L - Nq`` with ``L = kv_len[b]`` or ``Nk``."""
    batch, _, num_queries, _ = call.query.shape
    rows = torch.arange(num_queries, device=call.query.device)
    length = (
        call.kv_len
        if call.kv_len is not None
        else torch.full((batch,), call.key.shape[2], device=rows.device, dtype=torch.long)
    )
    return rows[None, :] + (length[:, None] - num_queries)


def key_keep(call: GroupedCall) -> torch.Tensor:
    """bool ``[B, Nq, Nk]``: the (row, key) pairs that survive every mask (applied after the edit)."""
    batch, num_keys = call.query.shape[0], call.key.shape[2]
    device = call.query.device
    cols = torch.arange(num_keys, device=device)
    pos = query_positions(call)[:, :, None]  # [B, Nq, 1]
    keep = torch.ones(batch, 1, num_keys, dtype=torch.bool, device=device)
    if call.groups is not None:
        keep = keep & (call.groups >= 0)[:, None, :]
    if call.key_valid is not None:
        keep = keep & call.key_valid[:, None, :]
    if call.kv_len is not None:
        keep = keep & (cols[None, None, :] < call.kv_len[:, None, None])
    if call.causal:
        keep = keep & (cols[None, None, :] <= pos)
    if call.sliding_window is not None:
        keep = keep & (cols[None, None, :] > pos - call.sliding_window)
    return keep.expand(batch, pos.shape[1], num_keys)


def edited_logits(call: GroupedCall) -> torch.Tensor:
    """fp32 ``[B, H, Nq, Nk]``: ``z = scaling*q.k``, edited to ``s*z + a*|z| + b`` on the edited rows;
    no mask applied."""
    heads = call.query.shape[1]
    ratio = heads // call.key.shape[1]
    q = call.query.float()
    k = call.key.float().repeat_interleave(ratio, dim=1)
    z = call.scaling * (q @ k.transpose(-1, -2))
    new = z
    if call.logit_scale is not None:
        new = new * call.logit_scale[:, :, None, :]
    if call.logit_abs is not None:
        new = new + call.logit_abs[:, :, None, :] * z.abs()
    if call.logit_bias is not None:
        new = new + call.logit_bias[:, :, None, :]
    if call.edit_row_start is None:
        return new
    rows = query_positions(call) >= call.edit_row_start[:, None]  # [B, Nq]
    return torch.where(rows[:, None, :, None], new, z)


def set_members(call: GroupedCall) -> list[torch.Tensor]:
    """One bool ``[B, Nk]`` per state set: the keys of groups ``0..G-1``, then the extra set's."""
    batch, num_keys = call.query.shape[0], call.key.shape[2]
    groups = call.groups
    if groups is None:
        groups = torch.zeros(batch, num_keys, dtype=torch.long, device=call.query.device)
    members = [groups == g for g in range(call.num_groups)]
    if call.extra_group is not None:
        members.append(groups == call.extra_group)
    return members


def grouped_reference(
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
    """``(o [B, Nq, H, S, Dv], lse [B, Nq, H, S])`` in fp32, as the fused kernel; ``num_splits`` is
    accepted for signature compatibility and ignored."""
    del num_splits
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
    heads = query.shape[1]
    ratio = heads // key.shape[1]
    z = edited_logits(call)  # [B, H, Nq, Nk]
    keep = key_keep(call)[:, None]  # [B, 1, Nq, Nk]
    v = value.float().repeat_interleave(ratio, dim=1)  # [B, H, Nk, Dv]
    outs, lses = [], []
    for index, member in enumerate(set_members(call)):
        zs = z
        if index == call.num_groups:  # the extra set: the same keys, re-weighted by exp(extra_bias)
            zs = z + call.extra_bias[:, None, None, :]
        zs = zs.masked_fill(~(keep & member[:, None, None, :]), -math.inf)
        lse = torch.logsumexp(zs, dim=-1)  # -inf for an empty set
        p = torch.exp(zs - torch.where(lse.isfinite(), lse, 0.0)[..., None])
        outs.append(p @ v)  # [B, H, Nq, Dv], zero for an empty set
        lses.append(lse)
    o = torch.stack(outs, dim=2).permute(0, 3, 1, 2, 4)  # [B, H, S, Nq, Dv] -> [B, Nq, H, S, Dv]
    lse = torch.stack(lses, dim=-1).transpose(1, 2)  # [B, H, Nq, S] -> [B, Nq, H, S]
    return o.contiguous(), lse.contiguous()


def merge_sets(o: torch.Tensor, lse: torch.Tensor, sets: int | None = None) -> torch.Tensor:
    """Plain attention over the union of the first ``sets`` state sets (all by default): ``[B, Nq, H, Dv]``.

    ``mass_g = exp(lse_g - logsumexp_g lse)``, ``out = sum_g mass_g * o_g``; rows where every set is empty
    give 0. With the partition (the groups, without the extra set) this is the unedited softmax's output.
    """
    if sets is not None:
        o, lse = o[..., :sets, :], lse[..., :sets]
    total = torch.logsumexp(lse, dim=-1, keepdim=True)
    mass = torch.exp(lse - torch.where(total.isfinite(), total, 0.0)).nan_to_num(0.0)
    return (mass[..., None] * o).sum(dim=-2)
