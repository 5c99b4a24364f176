"""The eager ground truth: materialise the probabilities in fp32 and run each stage of the plan literally.

Memory is ``B*H*Nq*Nk`` floats per call. Use it for checking the fast kernels and for small inputs. It runs
prefill and decode alike; a decode row whose position the caller does not know (a compiled step,
``call.past is None``) is edited wherever its batch row's stages are on.
"""

from __future__ import annotations

import torch

from ..plan import LayerPlan, edit_logits
from .call import KernelCall
from .masks import keep_rows


def query_rows(plan_rows, call: KernelCall, index: torch.Tensor) -> torch.Tensor:
    """bool ``[B, R]``: which of the call's query rows ``index`` a stage edits."""
    if call.past is None:
        return plan_rows.decode_on()[:, None].expand(-1, index.shape[0])
    return plan_rows.mask(index + call.past)


def probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    plan: LayerPlan | None,
    call: KernelCall,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Edited attention probabilities ``[B, H, R, Nk]`` in fp32 (before head scaling) of the query rows
    ``index`` (all of them if ``None``).

    ``query`` is ``[B, H, Nq, D]``; ``key`` is ``[B, Hkv, Nk, D]`` (expanded here for GQA). Fully masked
    rows (left-padding queries) get all-zero probabilities.
    """
    nq, nk = query.shape[2], key.shape[2]
    if index is None:
        index = torch.arange(nq, device=query.device)
    q = query[:, :, index].float()
    k = key.float().repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    z = call.scaling * (q @ k.transpose(-1, -2))
    stages = plan.logits if plan is not None else []
    for stage in stages:
        rows = query_rows(stage.rows, call, index)
        z = torch.where(rows[:, None, :, None], edit_logits(z, *stage.keys(nk, call.key_offset)), z)
    keep = keep_rows(attention_mask, index, nq, nk, call.causal, query.device)
    if keep is not None:
        z = z.masked_fill(~keep, float("-inf"))
    p = torch.softmax(z, dim=-1).nan_to_num(0.0)
    for rule in plan.rules if plan is not None else []:
        rows = query_rows(rule.rows, call, index)
        p = rule.apply(p, rule.keys(nk, call.key_offset), rows, call.rule_stats(plan))
    return p


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    plan: LayerPlan | None,
    call: KernelCall,
) -> torch.Tensor:
    """Edited attention output ``[B, Nq, H, D]`` in the input dtype."""
    p = probabilities(query, key, attention_mask, plan, call)
    v = value.float().repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    out = p @ v  # [B, H, Nq, D]
    index = torch.arange(query.shape[2], device=query.device)
    for stage in plan.heads if plan is not None else []:
        rows = query_rows(stage.rows, call, index)
        factor = torch.where(rows[:, None, :], stage.scale[:, :, None].float(), 1.0)  # [B, H, Nq]
        out = out * factor[..., None]
    return out.transpose(1, 2).to(query.dtype)
