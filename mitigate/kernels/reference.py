"""The eager ground truth: materialise the probabilities in fp32 and apply each op literally.

Memory is ``B*H*Nq*Nk`` floats per call. Use it for checking the fast kernels and for small inputs.
"""

from __future__ import annotations

import torch

from .edit import AttentionEdit, LogitEdit, MassTransfer, Observe, RowEdit, apply_mass_fn
from .masks import keep_mask


def edit_logits(z: torch.Tensor, op: LogitEdit) -> torch.Tensor:
    """``z' = s*z + a*|z| + b`` on ``op.rows``; ``z`` is ``[B, H, Nq, Nk]``, edits broadcast over rows."""
    new = z
    if op.scale is not None:
        new = new * op.scale[:, :, None, :]
    if op.abs is not None:
        new = new + op.abs[:, :, None, :] * z.abs()
    if op.bias is not None:
        new = new + op.bias[:, :, None, :]
    return torch.where(op.rows[:, None, :, None], new, z)


def group_masses(p: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[B, H, Nq, G]``: the probability mass of each key group."""
    onehot = torch.nn.functional.one_hot(groups, num_groups).to(p.dtype)  # [B, Nk, G]
    return torch.einsum("bhqk,bkg->bhqg", p, onehot)


def transfer_mass(p: torch.Tensor, op: MassTransfer) -> torch.Tensor:
    """Rescale each group of keys to its new mass from ``op.fn`` and renormalise, on ``op.rows`` only."""
    masses = group_masses(p, op.groups, op.num_groups)
    new = apply_mass_fn(op, masses, op.rows)
    ratio = torch.where(masses > 0, new / masses.clamp_min(torch.finfo(p.dtype).tiny), torch.zeros_like(new))
    index = op.groups[:, None, None, :].expand(p.shape)
    edited = p * ratio.gather(-1, index)
    total = edited.sum(-1, keepdim=True)
    edited = torch.where(total > 0, edited / total.clamp_min(torch.finfo(p.dtype).tiny), p)
    return torch.where(op.rows[:, None, :, None], edited, p)


def probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    causal: bool,
    edit: AttentionEdit | None = None,
) -> torch.Tensor:
    """Edited attention probabilities ``[B, H, Nq, Nk]`` in fp32 (before head scaling).

    ``query`` is ``[B, H, Nq, D]``; ``key`` is ``[B, Hkv, Nk, D]`` (expanded here for GQA).
    Fully masked rows (left-padding queries) get all-zero probabilities.
    """
    q = query.float()
    k = key.float().repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    z = scaling * (q @ k.transpose(-1, -2))
    for op in edit.logit_ops if edit is not None else ():
        z = edit_logits(z, op)
    keep = keep_mask(attention_mask, q.shape[0], q.shape[2], k.shape[2], causal, q.device)
    if keep is not None:
        z = z.masked_fill(~keep, float("-inf"))
    p = torch.softmax(z, dim=-1).nan_to_num(0.0)
    index = torch.arange(p.shape[2], device=p.device)
    for op in edit.probability_ops if edit is not None else ():
        p = apply_probability_op(p, op, index)
    return p


def apply_probability_op(p: torch.Tensor, op, index: torch.Tensor) -> torch.Tensor:
    """One post-softmax op on probabilities ``[B, H, R, Nk]`` of the call's rows ``index``, whose row
    mask (restricted to those rows) is ``op.rows [B, R]``."""
    if isinstance(op, MassTransfer):
        return transfer_mass(p, op)
    if isinstance(op, RowEdit):
        return torch.where(op.rows[:, None, :, None], op.fn(p, op.rows, index), p)
    if isinstance(op, Observe):
        op.fn(p, op.rows, index)
        return p
    raise TypeError(f"not a probability op: {op!r}")


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    edit: AttentionEdit | None,
    scaling: float,
    causal: bool,
) -> torch.Tensor:
    """Edited attention output ``[B, Nq, H, D]`` in the input dtype."""
    p = probabilities(query, key, attention_mask, scaling, causal, edit)
    v = value.float().repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    out = p @ v  # [B, H, Nq, D]
    for op in edit.head_ops if edit is not None else ():
        factor = torch.where(op.rows[:, None, :], op.scale[:, :, None].float(), 1.0)  # [B, H, Nq]
        out = out * factor[..., None]
    return out.transpose(1, 2).to(query.dtype)
