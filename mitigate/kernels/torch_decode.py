"""Decode steps of the torch kernel: a plan folded once per generation into a few tensors, so that a step
is a handful of tensor ops, with no Python that reads tensor values and no allocation that depends on the
step (it compiles with ``fullgraph=True`` and runs inside a CUDA graph).

At prefill, :func:`prepare` turns a layer's :class:`~mitigate.plan.LayerPlan` into a :class:`DecodePlan`
covering ``length`` keys (the static cache's length, or the prompt plus room for a dynamic cache). Every
decode row lies past the prompt, so each stage is on or off per batch row, and that is folded in:

* logit stages fold into one ``z' = s*z + a*|z| + b`` (:func:`~mitigate.plan.fold_logits`): ``s`` scales
  the keys before SDPA, ``a`` and ``b`` become an additive bias ``a'*|q.k'| + b`` with ``a' = a*scaling/s``;
* a VAR rule becomes one SDPA call on one-hot group values (the row's group masses), a fixed matrix that
  maps masses to each group's factor and its gate, and a per-key bias ``log factor[group]``: SDPA with that
  bias gives ``p_j * factor_g / sum``, which is VAR's edit (the factors conserve mass, so the sum is 1);
* a GIFT rule becomes one SDPA call for the per-head image, query and weighted-image masses (each shifted
  by a tiny ``eps`` so that the logs below never see 0; the shift changes no head choice and ``g`` by
  ``eps/mass``), a stable sort and a scatter that mark the chosen heads, one einsum that sums their masses,
  and a per-key bias ``V_h*log S_j + Q_h*log g*[j in query]``;
* head scales multiply the output.

Plans this folding cannot express exactly (logit compositions outside the family, two rules in one
layer, per-head key scales with grouped-query heads, a VAR gate threshold of 0) keep their plan and run
through the materialised path of :mod:`.torch_sdpa`, which is just as exact and compilable, only slower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..context import extend_keys
from ..plan import NEVER, GiftRule, LayerPlan, VarRule, fold_logits
from .call import KernelCall


@dataclass
class VarDecode:
    values: torch.Tensor  # [B, Hkv, L, 4] one-hot groups, fp32 (SDPA values)
    weights: torch.Tensor  # [B, 1, 4, 8 + 2] fp32: masses -> (numerators, denominators, gate columns)
    groups_t: torch.Tensor  # [B, 1, 4, L] fp32: per-group log factors -> per-key bias


@dataclass
class GiftDecode:
    values: torch.Tensor  # [B, Hkv, L, 3]: (image + eps, query + eps, image * S + eps)
    keep: int  # heads chosen per selection
    base: torch.Tensor  # [B, H, 1, 3] zeros, scattered into
    combine: torch.Tensor  # [3, 3, 3]: log of the chosen heads' summed masses -> (0, log g, 0)
    offset: torch.Tensor  # [3]: (1, 0, 0)
    keys_t: torch.Tensor  # [B, 1, 3, L] fp32: (log S on image keys, query keys, 0), zero where off


@dataclass
class DecodePlan:
    """A layer's plan folded for decode steps (see the module docstring)."""

    length: int
    key_scale: torch.Tensor | None = None  # [B, Hc, L, 1] fp32, or the model dtype if wider
    abs: torch.Tensor | None = None  # [B, 1 or Hkv, 1 or G, L] as key_scale, scaling folded in
    bias: torch.Tensor | None = None  # same layout
    var: VarDecode | None = None
    gift: GiftDecode | None = None
    head: torch.Tensor | None = None  # [B, 1, H, 1] model dtype
    general: LayerPlan | None = None  # not foldable: the plan itself, for the materialised path
    work: torch.dtype | None = None  # the dtype edited logits are computed in (None: no logit edit)
    #: grouped-query heads attend as extra rows of their key head (as transformers packs them); GIFT
    #: picks heads across the whole layer, so it keeps one row per head and lets SDPA share the keys
    packed: bool = True

    def refill(self, new: DecodePlan) -> bool:
        """Copy ``new``'s values into this plan's tensors when both have the same structure (so that a
        compiled decode step keeps seeing the same storage); ``False`` when they differ."""
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.general is not None or new.general is not None or not _pairs(self, new, pairs):
            return False
        for old, value in pairs:
            old.copy_(value)
        return True


def _storage(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor an expanded view reads from (prepared values are broadcast over heads, not copied)."""
    return tensor._base if tensor._base is not None else tensor


def _pairs(old: object, new: object, out: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Collect ``(old storage, new storage)`` for every tensor field; ``False`` if the structures differ."""
    if type(old) is not type(new):
        return False
    for name in old.__dataclass_fields__:
        a, b = getattr(old, name), getattr(new, name)
        if torch.is_tensor(a) and torch.is_tensor(b):
            a, b = _storage(a), _storage(b)
            if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
                return False
            out.append((a, b))
        elif hasattr(a, "__dataclass_fields__") and hasattr(b, "__dataclass_fields__"):
            if not _pairs(a, b, out):
                return False
        elif a != b if not (torch.is_tensor(a) or torch.is_tensor(b)) else True:
            return False
    return True


def prepare(
    plan: LayerPlan, *, length: int, dtype: torch.dtype, num_heads: int, num_kv_heads: int, scaling: float
) -> DecodePlan:
    """Fold ``plan`` for decode steps over ``length`` keys (see the module docstring)."""
    out = DecodePlan(length=length)
    # edited logits in fp32 even for half-precision models: a bf16 bias (|z| up to ~16 at real head
    # sizes) is off by up to 1/16, which moves the softmax by several per cent (see decode)
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    if plan.heads:
        head = None
        for stage in plan.heads:
            factor = torch.where(stage.rows.decode_on()[:, None], stage.scale.float(), 1.0)
            head = factor if head is None else head * factor
        out.head = head[:, None, :, None].to(dtype)
    if not plan.core:
        return out
    out.work = work
    general = DecodePlan(length=length, head=out.head, general=plan)
    folded = fold_logits(plan.logits) if plan.logits else (None, None, None)
    if folded is None or len(plan.rules) > 1:
        return general
    scale, abs_, bias = folded
    groups = num_heads // num_kv_heads
    out.packed = not any(isinstance(rule, GiftRule) for rule in plan.rules)

    def packed(term: torch.Tensor, fill: float) -> torch.Tensor:  # [B, Hc, T] -> logits' layout
        term = extend_keys(term.float(), fill, length)
        if term.shape[1] == 1:
            return term[:, :, None, :].to(work)
        if not out.packed:
            return term[:, :, None, :].to(work)  # [B, H, 1, L]
        return term.reshape(term.shape[0], num_kv_heads, groups, length).to(work)

    if scale is not None:
        if scale.shape[1] != 1 and groups > 1:
            return general  # keys are shared by grouped heads: a per-head key scale would need a copy
        if abs_ is not None and not bool((scale > 0).all()):
            return general  # |z| of scaled keys is s*|z| only for s > 0
        out.key_scale = extend_keys(scale.float(), 1.0, length)[..., None].to(work)
    if abs_ is not None:
        out.abs = packed(abs_ * scaling / (scale if scale is not None else 1.0), 0.0)
    if bias is not None:
        out.bias = packed(bias, 0.0)
    if plan.rules:
        rule = plan.rules[0]
        if isinstance(rule, VarRule):
            if rule.min_image_mass <= 0 or rule.min_nonsink_ratio <= 0:
                return general  # then the gate's "image mass > 0" is not implied by the two thresholds
            out.var = _prepare_var(rule, length, dtype, num_kv_heads)
        elif isinstance(rule, GiftRule):
            out.gift = _prepare_gift(rule, length, dtype, num_heads, num_kv_heads)
        else:
            return general
    return out


def _prepare_var(rule: VarRule, length: int, dtype: torch.dtype, num_kv_heads: int) -> VarDecode:
    onehot = F.one_hot(extend_keys(rule.groups, rule.OTHER, length), 4).float()  # [B, L, 4]
    bsz = onehot.shape[0]
    f, rho, mu = rule.fraction, rule.min_nonsink_ratio, rule.min_image_mass
    ones = torch.ones(4)
    image = torch.tensor([0.0, 0.0, 0.0, 1.0])
    # columns: numerators (new masses), denominators (old masses; the row's total for groups whose factor
    # is a constant, so that other -> exactly 1), then the two gate conditions, each >= 0 when met:
    #   image_mass - mu * total  and  image - rho * image_mass
    columns = [ones, (1 - f) * ones, (1 - f) * ones, torch.tensor([0.0, f, f, 1.0]),
               ones, ones, ones, image,
               torch.tensor([-mu, -mu, 1 - mu, 1 - mu]), torch.tensor([0.0, 0.0, -rho, 1 - rho])]  # fmt: skip
    weights = torch.stack(columns, dim=1).to(onehot.device).expand(bsz, 4, 10).clone()
    off = ~rule.rows.decode_on()
    weights[off, :, 8] = -1.0  # a batch row the rule does not edit: the gate fails (-total < 0)
    return VarDecode(
        values=onehot[:, None].expand(bsz, num_kv_heads, length, 4),
        weights=weights[:, None],
        groups_t=onehot.transpose(1, 2)[:, None].contiguous(),
    )


def _prepare_gift(rule: GiftRule, length: int, dtype: torch.dtype, heads: int, kv_heads: int) -> GiftDecode:
    groups = extend_keys(rule.groups, rule.OTHER, length)
    weights = extend_keys(rule.weights.float(), 1.0, length)
    image = (groups == rule.IMAGE).float()
    query = (groups == rule.QUERY).float()
    eps = 1e-30  # masses are computed in fp32
    values = torch.stack((image + eps, query + eps, image * weights + eps), dim=-1)  # [B, L, 3]
    bsz = values.shape[0]
    on = rule.rows.decode_on()[:, None].float()
    keys_t = torch.stack((image * weights.log() * on, query * on, torch.zeros_like(query)), dim=1)
    combine = torch.zeros(3, 3, 3, device=values.device)
    combine[0, 2, 1], combine[0, 0, 1] = 1.0, -1.0  # log g = log(sum_V weighted) - log(sum_V image)
    return GiftDecode(
        values=values[:, None].expand(bsz, kv_heads, length, 3),
        keep=rule.top_heads(heads),
        base=torch.zeros(bsz, heads, 1, 3, device=values.device),
        combine=combine,
        offset=torch.tensor([1.0, 0.0, 0.0], device=values.device),
        keys_t=keys_t[:, None],
    )


def _keys(tensor: torch.Tensor, dim: int, num_keys: int, offset: int, length: int) -> torch.Tensor:
    """The call's keys of a prepared tensor (no op when they are all of them: a static cache)."""
    if offset == 0 and num_keys == length:
        return tensor
    return tensor.narrow(dim, offset, num_keys)


def _merge(mask: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    """An additive float mask: ``bias`` where ``mask`` keeps the key (bool or additive), else -inf."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, float("-inf"))
    return mask + bias


def decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    prep: DecodePlan,
    call: KernelCall,
) -> torch.Tensor:
    """One decode step (query rows past the prompt) of a prepared layer: ``[B, Nq, H, Dv]``."""
    if prep.general is not None:
        from .torch_sdpa import torch_attention

        return torch_attention(query, key, value, mask, prep.general, call)
    dtype = query.dtype
    if prep.work is not None and prep.work != dtype:  # a half-precision model: edited steps run in fp32
        query, key, value = query.float(), key.float(), value.float()
        mask = mask.float() if mask is not None and mask.dtype != torch.bool else mask
    bsz, heads, nq, dim = query.shape
    kv_heads, nk = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    offset, length = call.key_offset, prep.length
    if prep.key_scale is not None:
        key = key * _keys(prep.key_scale, 2, nk, offset, length)
    pack = groups > 1 and prep.packed
    q = query.reshape(bsz, kv_heads, groups * nq, dim) if pack else query
    share = {"enable_gqa": True} if groups > 1 and not pack else {}
    attn = mask
    bias = None
    if prep.abs is not None:
        if groups > 1 and not pack:
            rows = query.reshape(bsz, kv_heads, groups * nq, dim) @ key.mT
            logits = rows.reshape(bsz, heads, nq, nk)
        else:
            logits = torch.matmul(q, key.mT)
        bias = logits.abs_().mul_(_keys(prep.abs, -1, nk, offset, length))
    if prep.bias is not None:
        term = _keys(prep.bias, -1, nk, offset, length)
        bias = term if bias is None else bias + term
    if bias is not None:
        attn = _merge(mask, bias)
    if prep.var is not None:
        attn = _merge(attn, _var_bias(q, key, attn, prep.var, call, nk, length))
    elif prep.gift is not None:
        attn = _merge(attn, _gift_bias(q, key, attn, prep.gift, call, nk, length, share))
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=attn, scale=call.scaling, **share)
    out = out.reshape(bsz, heads, nq, value.shape[-1]).transpose(1, 2)
    if out.dtype != dtype:
        out = out.to(dtype)
    return out * prep.head if prep.head is not None else out.contiguous()


def _masses(q, key, values, attn, call: KernelCall, **share) -> torch.Tensor:
    """Per-group masses of the row, ``[..., G]`` fp32: SDPA on one-hot (or weighted) group values. In
    fp32 even for half-precision models, so that a gate or a head choice near its threshold decides as
    the fp32 reference does."""
    if q.dtype != torch.float32:
        q, key = q.float(), key.float()
        attn = attn.float() if attn is not None and attn.dtype != torch.bool else attn
    return F.scaled_dot_product_attention(q, key, values, attn_mask=attn, scale=call.scaling, **share)


def _var_bias(q, key, attn, var: VarDecode, call: KernelCall, nk: int, length: int) -> torch.Tensor:
    offset = call.key_offset
    masses = _masses(q, key, _keys(var.values, 2, nk, offset, length), attn, call)
    num, den, gate = (masses @ var.weights).split([4, 4, 2], dim=-1)
    factor = torch.where(gate.amin(-1, keepdim=True) >= 0, num / den, 1.0)
    bias = factor.log() @ _keys(var.groups_t, -1, nk, offset, length)
    return bias if bias.dtype == q.dtype else bias.to(q.dtype)


def _gift_bias(q, key, attn, gift: GiftDecode, call: KernelCall, nk: int, length: int, share: dict):
    offset = call.key_offset
    masses = _masses(q, key, _keys(gift.values, 2, nk, offset, length), attn, call, **share)  # [B, H, 1, 3]
    # columns: the heads with the most image mass (V), query mass (Q), weighted image mass (unused)
    # equal masses: the lower head index wins (a stable sort), as in mitigate.plan.top_heads
    order = masses.sort(dim=1, descending=True, stable=True).indices
    chosen = gift.base.scatter(1, order[:, : gift.keep], 1.0)
    sums = torch.einsum("bhir,bhis->birs", chosen, masses)  # [B, 1, 3, 3]: chosen heads' summed masses
    # per head (V_h, Q_h * log g, 0): log g from the sums, then V_h from the offset (1, 0, 0)
    rows = torch.einsum("bhic,birs,rsc->bhic", chosen, sums.log(), gift.combine)
    rows = torch.addcmul(rows, chosen, gift.offset)
    bias = rows @ _keys(gift.keys_t, -1, nk, offset, length)  # [B, H, 1, Nk]
    return bias if bias.dtype == q.dtype else bias.to(q.dtype)


__all__ = ["NEVER", "DecodePlan", "decode", "prepare"]
