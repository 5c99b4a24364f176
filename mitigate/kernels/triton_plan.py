"""``kernel="triton"``: a plan run by the fused grouped-state kernel (:mod:`.triton_grouped`) in one pass
over the keys, plus a small torch epilogue that applies the plan's rule to the per-set states.

The plan maps onto the kernel's contract directly:

* the logit stages (folded into one ``s*z + a*|z| + b``) are the kernel's per-key edit, on the rows at
  positions ``>= rows.start[b]`` (``edit_row_start``);
* a rule's key groups are the kernel's state sets: VAR's four groups; GIFT's other / query / image
  groups plus an extra set that holds the image keys again, weighted by the saliency (``log S`` as the
  extra set's bias);
* the epilogue turns each row's sets into masses ``m_g = exp(lse_g - logsumexp lse)``, asks the rule
  for its group factors (:func:`~mitigate.plan.var_coefficients`, :func:`~mitigate.plan.gift_heads`,
  the same group-space forms the torch kernel uses), and combines ``out = sum_g w_g o_g / sum_g w_g``;
* head scales multiply the output.

Prefill needs masks the kernel can rebuild (causality, padding, window: ``KernelCall.plain_mask``);
decode rows read their key mask from the row itself, so every family decodes here. An eager fp32 decode step
takes the torch kernel's folded step by default (:data:`EAGER_DECODE`): there, kernel launches decide,
and the fused kernel's epilogue is a dozen small torch ops until it is fused too. In half precision
the torch step computes in fp32 (casting the keys and values), so the fused kernel takes it. What the
kernel cannot express (two rules, logit stages on different rows that do not fold, per-head edits it
does not take, head dims above 256) runs on the torch kernel, which gives the same numbers.

Under ``torch.compile`` the kernel is one custom op (``mitigate::grouped_attention``), so a compiled
decode step keeps it whole and a CUDA graph captures it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..context import extend_keys
from ..plan import GiftRule, LayerPlan, VarRule, fold_logits, gift_heads, var_coefficients
from .call import KernelCall
from .torch_decode import DecodePlan
from .torch_decode import decode as torch_decode
from .torch_decode import prepare as torch_prepare
from .torch_sdpa import torch_attention

MAX_HEAD_DIM = 256
#: eager decode steps: "torch" (the torch kernel's folded step, fewer launches), "fused" (this kernel
#: and its torch epilogue), or "auto": torch's step for fp32 models, the fused kernel for half precision,
#: where torch's step computes in fp32 and so reads the keys and values again to cast them. Compiled
#: steps always take the fused kernel. Measure with gpu_check.sh.
EAGER_DECODE = os.environ.get("MITIGATE_TRITON_EAGER_DECODE", "auto")


def available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernel can run here: CUDA with triton, or the CPU interpreter (tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


# -- the kernel as one custom op (opaque to dynamo, capturable) --------------------------------------
@torch.library.custom_op("mitigate::grouped_attention", mutates_args=())
def _grouped_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    groups: torch.Tensor | None,
    num_groups: int,
    extra_group: int,
    extra_bias: torch.Tensor | None,
    logit_scale: torch.Tensor | None,
    logit_abs: torch.Tensor | None,
    logit_bias: torch.Tensor | None,
    edit_row_start: torch.Tensor | None,
    key_valid: torch.Tensor | None,
    causal: bool,
    sliding_window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton_grouped import grouped_attention

    return grouped_attention(
        query, key, value, scaling=scaling, groups=groups, num_groups=num_groups,
        extra_group=None if extra_group < 0 else extra_group, extra_bias=extra_bias,
        logit_scale=logit_scale, logit_abs=logit_abs, logit_bias=logit_bias, edit_row_start=edit_row_start,
        key_valid=key_valid, causal=causal, sliding_window=None if sliding_window <= 0 else sliding_window,
    )  # fmt: skip


@_grouped_op.register_fake
def _(query, key, value, scaling, groups, num_groups, extra_group, extra_bias, *rest):
    sets = num_groups + (1 if extra_group >= 0 else 0)
    batch, heads, rows, _ = query.shape
    o = query.new_empty((batch, rows, heads, sets, value.shape[-1]), dtype=torch.float32)
    return o, query.new_empty((batch, rows, heads, sets), dtype=torch.float32)


def grouped(query, key, value, *, scaling, groups=None, num_groups=1, extra_group=None, extra_bias=None,
            logit_scale=None, logit_abs=None, logit_bias=None, edit_row_start=None, key_valid=None,
            causal=True, sliding_window=None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`~mitigate.kernels.triton_grouped.grouped_attention` through the custom op."""
    extra = -1 if extra_group is None else extra_group
    window = 0 if sliding_window is None else int(sliding_window)
    return _grouped_op(
        query, key, value, float(scaling), groups, int(num_groups), extra, extra_bias, logit_scale,
        logit_abs, logit_bias, edit_row_start, key_valid, bool(causal), window,
    )  # fmt: skip


# -- mapping a plan onto the kernel --------------------------------------------------------------------
@dataclass
class Fused:
    """A plan in the kernel's terms (tensors over ``length`` keys)."""

    length: int
    scale: torch.Tensor | None = None  # [B, Hc, L] fp32
    abs: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    edit_start: torch.Tensor | None = None  # [B] int64, None: every row the tensors touch
    groups: torch.Tensor | None = None  # [B, L] int32
    num_groups: int = 1
    extra_bias: torch.Tensor | None = None  # [B, L] fp32 (GIFT's log S)
    rule: VarRule | GiftRule | None = None
    rule_on: torch.Tensor | None = None  # [B] bool, decode rows the rule edits
    head: torch.Tensor | None = None  # [B, 1, H, 1], model dtype (decode)


def _fuse(plan: LayerPlan, length: int, decode: bool) -> Fused | None:
    """The plan in the kernel's terms, or None when it cannot be expressed."""
    if len(plan.rules) > 1:
        return None
    out = Fused(length=length)
    if plan.logits:
        stages = plan.logits
        if not decode and any(not torch.equal(s.rows.start, stages[0].rows.start) for s in stages[1:]):
            return None  # different rows at prefill: one edit_row_start cannot say it
        folded = fold_logits(stages)
        if folded is None:
            return None
        out.scale, out.abs, out.bias = (
            None if t is None else extend_keys(t.float(), fill, length)
            for t, fill in zip(folded, (1.0, 0.0, 0.0), strict=True)
        )
        if not decode:
            out.edit_start = stages[0].rows.start
    if plan.rules:
        rule = plan.rules[0]
        out.rule, out.num_groups = rule, rule.num_groups
        out.groups = extend_keys(rule.groups, 0, length).to(torch.int32)
        out.rule_on = rule.rows.decode_on()
        if isinstance(rule, GiftRule):
            image = extend_keys(rule.groups, 0, length) == GiftRule.IMAGE
            out.extra_bias = torch.where(image, extend_keys(rule.weights.float(), 1.0, length).log(), 0.0)
    return out


def _epilogue(o, lse, fused: Fused, rows: torch.Tensor) -> torch.Tensor:
    """``[B, Nq, H, Dv]`` fp32 from the per-set states; ``rows [B, Nq]``: where the rule applies."""
    rule = fused.rule
    if rule is None:
        return o[..., 0, :]
    groups = fused.num_groups
    total = torch.logsumexp(lse[..., :groups], dim=-1, keepdim=True)
    total = torch.where(total.isfinite(), total, 0.0)
    mass = torch.exp(lse - total)  # [B, Nq, H, S]; the extra set's is its weighted mass
    weights = mass[..., :groups]
    if isinstance(rule, VarRule):
        coef, gate = var_coefficients(weights, rule)
        weights = torch.where((gate & rows[..., None])[..., None], weights * coef, weights)
        sets = o[..., :groups, :]
    else:  # GIFT, on [B, H, Nq] masses as its rule is written
        image, query = weights[..., GiftRule.IMAGE], weights[..., GiftRule.QUERY]
        weighted = mass[..., groups]
        vision, query_heads, g = gift_heads(
            image.transpose(1, 2), weighted.transpose(1, 2), query.transpose(1, 2), rule.top_heads(o.shape[2])
        )
        vision, query_heads = (
            vision.transpose(1, 2) & rows[..., None],
            query_heads.transpose(1, 2) & rows[..., None],
        )
        g = g.transpose(1, 2)  # [B, Nq, 1]
        other = weights[..., GiftRule.OTHER]
        query_w = torch.where(query_heads, query * g, query)
        image_w = torch.where(vision, weighted, image)
        weights = torch.stack((other, query_w, image_w), dim=-1)
        image_o = torch.where(vision[..., None], o[..., groups, :], o[..., GiftRule.IMAGE, :])
        sets = torch.stack((o[..., GiftRule.OTHER, :], o[..., GiftRule.QUERY, :], image_o), dim=-2)
    norm = weights.sum(-1, keepdim=True)
    out = (weights[..., None] * sets).sum(-2) / torch.where(norm > 0, norm, 1.0)
    return out


def _call(query, key, value, fused: Fused, key_valid, call: KernelCall, nk: int, offset: int, causal: bool):
    def cut(t):
        return (
            None if t is None else (t if offset == 0 and nk == fused.length else t[..., offset : offset + nk])
        )

    extra = GiftRule.IMAGE if fused.extra_bias is not None else None
    return grouped(
        query, key, value, scaling=call.scaling, groups=cut(fused.groups), num_groups=fused.num_groups,
        extra_group=extra, extra_bias=cut(fused.extra_bias),
        logit_scale=cut(fused.scale), logit_abs=cut(fused.abs), logit_bias=cut(fused.bias),
        edit_row_start=fused.edit_start, key_valid=key_valid, causal=causal, sliding_window=call.window,
    )  # fmt: skip


def _fits(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    return (
        available(query.device)
        and max(query.shape[-1], value.shape[-1]) <= MAX_HEAD_DIM
        and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
    )


def triton_attention(
    query, key, value, attention_mask, plan: LayerPlan | None, call: KernelCall
) -> torch.Tensor:
    """Any call of a plan (prefill, a known decode row): ``[B, Nq, H, Dv]``."""
    nq, nk = query.shape[2], key.shape[2]
    prefill_mask_ok = attention_mask is None or call.plain_mask
    if plan is None or not plan.core or not prefill_mask_ok or not _fits(query, key, value):
        return torch_attention(query, key, value, attention_mask, plan, call)
    fused = _fuse(plan, nk, decode=False)
    if fused is None or call.key_offset != 0 or (call.past is not None and call.past != nk - nq):
        return torch_attention(query, key, value, attention_mask, plan, call)
    key_valid = None
    if attention_mask is not None:
        key_valid = extend_keys(call.key_valid, True, nk) if call.key_valid is not None else None
        if key_valid is None:
            return torch_attention(query, key, value, attention_mask, plan, call)
    o, lse = _call(query, key, value, fused, key_valid, call, nk, 0, call.causal)
    positions = torch.arange(nk - nq, nk, device=query.device)
    rows = fused.rule.rows.mask(positions) if fused.rule is not None else None
    out = _epilogue(o, lse, fused, rows)
    for stage in plan.heads:
        factor = torch.where(stage.rows.mask(positions)[:, :, None], stage.scale[:, None, :].float(), 1.0)
        out = out * factor[..., None]
    return out.to(query.dtype)


# -- decode: the plan folded once per generation -------------------------------------------------------
@dataclass
class TritonDecodePlan(DecodePlan):
    """The torch kernel's folded plan (its fallback) plus the plan in the Triton kernel's terms."""

    fused: Fused | None = None


def prepare(plan: LayerPlan, *, length: int, dtype: torch.dtype, num_heads: int, num_kv_heads: int,
            scaling: float) -> TritonDecodePlan:  # fmt: skip
    base = torch_prepare(
        plan, length=length, dtype=dtype, num_heads=num_heads, num_kv_heads=num_kv_heads, scaling=scaling
    )
    out = TritonDecodePlan(**{name: getattr(base, name) for name in base.__dataclass_fields__})
    if plan.core:
        out.fused = _fuse(plan, length, decode=True)
    return out


def decode(query, key, value, mask, prep: TritonDecodePlan, call: KernelCall) -> torch.Tensor:
    fused = prep.fused
    if fused is None or not _fits(query, key, value) or query.shape[2] != 1:
        return torch_decode(query, key, value, mask, prep, call)
    torch_step = EAGER_DECODE == "torch" or (EAGER_DECODE == "auto" and query.dtype == torch.float32)
    if torch_step and prep.general is None and not torch.compiler.is_compiling():
        # an eager step is bound by kernel launches: the torch kernel's folded step launches fewer than
        # the fused kernel plus its (unfused) torch epilogue; compiled, inductor fuses the epilogue
        return torch_decode(query, key, value, mask, prep, call)
    key_valid = None
    if mask is not None:  # one query row: its mask row says which keys it sees, for any family
        key_valid = (
            mask[:, 0, -1, :]
            if mask.dtype == torch.bool
            else mask[:, 0, -1, :] > torch.finfo(mask.dtype).min / 2
        )
    nk = key.shape[2]
    o, lse = _call(query, key, value, fused, key_valid, call, nk, call.key_offset, False)
    rows = fused.rule_on[:, None] if fused.rule_on is not None else None
    out = _epilogue(o, lse, fused, rows)
    if prep.head is not None:
        out = out * prep.head
    return out.to(query.dtype)
