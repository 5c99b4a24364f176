"""Edits inside vLLM's CPU attention backend: subclasses registered in place of ``CPU_ATTN``.

vLLM's CPU kernel is fused (no logits, no probabilities), so the edited rows are computed again after it:
for each mitigated request of the step and each layer it edits, its keys and values are read back from the
paged cache (:mod:`.kv_cache`), mitigate's reference executor runs the layer's plan on the rows the plan
edits (every decode row, and the prompt rows at the first prefill), and those rows of the output are
overwritten, before ``o_proj``. Rows and requests without edits keep the kernel's output. The cost is
``O(edited rows x keys)`` per edited layer, in plain torch.

**Tensor parallelism.** Plans hold global head indices: each rank slices the per-head terms to its heads.
What mixes heads is gathered over the tensor-parallel group: GIFT's choice of heads (per-head masses),
GIFT's saliency rows and PAINT's CLS rows (whole probabilities). VAR's gate and every logit edit are per
head, so they need nothing. (Tested with two ranks on vLLM's CPU build.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
from vllm.v1.attention.backends import cpu_attn

from ..errors import MitigationError
from ..kernels.call import KernelCall
from ..kernels.masks import keep_rows
from ..kernels.reference import probabilities, query_rows, reference_attention
from ..plan import GiftRule, HeadStage, LayerPlan, LogitStage, edit_logits, gift_heads
from . import kv_cache
from .worker import Slot, Step

log = logging.getLogger("mitigate.vllm")

#: set by the plugin in each worker process: the :class:`~mitigate.vllm.worker.Worker`, or what makes it
WORKER: Any = None


@dataclass(frozen=True)
class Heads:
    """This rank's query heads ``start .. stop-1`` of ``total``, and the group to gather over (None: all)."""

    start: int
    stop: int
    total: int
    group: Any = None

    @classmethod
    def of(cls, local_heads: int) -> Heads:
        from vllm.distributed import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
            get_tp_group,
        )

        size = get_tensor_model_parallel_world_size()
        if size == 1:
            return cls(0, local_heads, local_heads)
        rank = get_tensor_model_parallel_rank()
        return cls(rank * local_heads, (rank + 1) * local_heads, size * local_heads, get_tp_group())

    def gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        return tensor if self.group is None else self.group.all_gather(tensor.contiguous(), dim)

    def local(self, plan: LayerPlan) -> LayerPlan:
        """The plan with its per-head terms cut to this rank's heads."""
        if self.group is None:
            return plan

        def cut(term: torch.Tensor | None, dim: int) -> torch.Tensor | None:
            if term is None or term.shape[dim] != self.total:
                return term
            return term.narrow(dim, self.start, self.stop - self.start)

        stages = []
        for stage in plan.stages:
            if isinstance(stage, LogitStage):
                stage = replace(
                    stage, scale=cut(stage.scale, 1), abs=cut(stage.abs, 1), bias=cut(stage.bias, 1)
                )
            elif isinstance(stage, HeadStage):
                stage = replace(stage, scale=cut(stage.scale, 1))
            stages.append(stage)
        return LayerPlan.of(plan.layer, plan.prompt_len, stages)


# -- the backend -----------------------------------------------------------------------------------
def _worker():
    global WORKER
    if callable(WORKER):
        WORKER = WORKER()
    return WORKER


class MitigateCPUBuilder(cpu_attn.CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        worker = _worker()
        if worker is not None and not self.is_encoder_only_attention:
            common = common_attn_metadata
            metadata.mitigate_step = worker.begin_step(
                common.num_reqs, common.query_start_loc_cpu.tolist(), common.seq_lens.cpu().tolist()
            )
        return metadata


class MitigateCPUImpl(cpu_attn.CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache_, attn_metadata, output, *args, **kwargs):
        result = super().forward(layer, query, key, value, kv_cache_, attn_metadata, output, *args, **kwargs)
        step = getattr(attn_metadata, "mitigate_step", None)
        if step is not None and self.attn_type == cpu_attn.AttentionType.DECODER:
            edit_layer(self, layer, query, key, kv_cache_, attn_metadata, output, step)
        return result


class MitigateCPUBackend(cpu_attn.CPUAttentionBackend):
    """vLLM's CPU attention backend plus mitigate's edits; ``get_name`` stays ``CPU_ATTN``, which vLLM's
    attention layer looks itself up by."""

    @staticmethod
    def get_impl_cls():
        return MitigateCPUImpl

    @staticmethod
    def get_builder_cls():
        return MitigateCPUBuilder


# -- edits -----------------------------------------------------------------------------------------
def _layer_index(layer) -> int:
    index = getattr(layer, "_mitigate_layer", None)
    if index is None:
        from vllm.model_executor.models.utils import extract_layer_index

        index = layer._mitigate_layer = extract_layer_index(layer.layer_name)
    return index


def _check_layer(impl, layer_index: int) -> None:
    if getattr(impl, "_mitigate_checked", False):
        return
    problems = []
    if impl.sliding_window not in (-1, None):
        problems.append(f"a sliding window of {impl.sliding_window}")
    if impl.alibi_slopes is not None:
        problems.append("ALiBi slopes")
    if impl.logits_soft_cap:
        problems.append("a logit soft cap")
    if impl.sinks is not None:
        problems.append("attention sinks")
    if impl.kv_cache_dtype != "auto":
        problems.append(f"a {impl.kv_cache_dtype} KV cache")
    if problems:
        raise MitigationError(
            f"mitigate: layer {layer_index} has {', '.join(problems)}, which the edit executor does not model"
        )
    impl._mitigate_checked = True


def edit_layer(impl, layer, query, key, kv_cache_, metadata, output, step: Step) -> None:
    """Recompute, with their plans, the rows of this layer that mitigated requests edit in this step."""
    worker = _worker()
    index = _layer_index(layer)
    heads = getattr(impl, "_mitigate_heads", None)
    if heads is None:
        heads = impl._mitigate_heads = Heads.of(impl.num_heads)
    for slot in step.slots:
        plan = worker.plan(slot.edits, index)
        observe = slot.observing and any(
            m.observe_rows(index, s) is not None for m, s in _observers(slot, index)
        )
        if plan is None and not observe:
            continue
        _check_layer(impl, index)
        first = slot.end if plan is None else max(plan.first_row(), slot.past)
        keys_from = slot.past if observe else first  # the prompt rows an observer reads sit in this step
        if keys_from >= slot.end:
            continue
        where = kv_cache.layout(impl, layer, kv_cache_.shape[2], impl.head_size, kv_cache_.dtype)
        keys, values = kv_cache.gather(kv_cache_, where, metadata.block_table[slot.index], slot.end)
        _check_keys(keys, key, slot, index)
        call = KernelCall(scaling=impl.scale, causal=True, past=0)
        local = None if plan is None else heads.local(plan)
        if observe:
            rows = query[slot.start : slot.stop].transpose(0, 1)[None]  # the whole prompt: [1, H, T, D]
            _observe(slot, index, rows, keys[None], local, call, heads)
        if first >= slot.end:
            continue
        rows = query[slot.start + first - slot.past : slot.stop].transpose(0, 1)[None]  # [1, H, R, D]
        call = replace(call, past=first)
        out = _attend(rows, keys[None], values[None], local, call, heads)  # [1, R, H, D]
        output[slot.start + first - slot.past : slot.stop] = out[0].to(output.dtype)


def _observers(slot: Slot, layer: int):
    return [
        (m, s)
        for m, s in zip(slot.edits.methods, slot.edits.states, strict=True)
        if layer in m.edited_layers()
    ]


def _check_keys(keys: torch.Tensor, key: torch.Tensor, slot: Slot, layer: int) -> None:
    """This step's keys, as read back, must equal the ones the layer just wrote (guards the layout)."""
    written = key[slot.start : slot.stop].transpose(0, 1)
    if not torch.equal(keys[:, slot.past : slot.end].to(written.dtype), written):
        raise MitigationError(
            f"mitigate: layer {layer}: keys read back from the KV cache differ from those written"
        )


def _observe(slot: Slot, layer: int, query, keys, plan, call, heads: Heads) -> None:
    """Rows whose final probabilities a method reads in this layer (GIFT's saliency), as HF's session does."""
    for method, state in _observers(slot, layer):
        span = method.observe_rows(layer, state)
        if span is None:
            continue
        index = torch.arange(span[0], span[1])
        probs = _probabilities(query, keys, plan, call, index, heads)
        method.observe_probs(layer, heads.gather(probs, 1), index, state)


def _attend(query, keys, values, plan: LayerPlan, call: KernelCall, heads: Heads) -> torch.Tensor:
    if heads.group is None:
        return reference_attention(query, keys, values, None, plan, call)
    # tensor parallel: the reference's steps, with GIFT's head choice made over every rank's heads
    p = _probabilities(query, keys, plan, call, None, heads)
    v = values.float().repeat_interleave(query.shape[1] // values.shape[1], dim=1)
    out = p @ v
    index = torch.arange(query.shape[2])
    for stage in plan.heads:
        rows = query_rows(stage.rows, call, index)
        out = out * torch.where(rows[:, None, :], stage.scale[:, :, None].float(), 1.0)[..., None]
    return out.transpose(1, 2).to(query.dtype)


def _probabilities(query, keys, plan, call, index, heads: Heads) -> torch.Tensor:
    if heads.group is None or plan is None or not any(isinstance(r, GiftRule) for r in plan.rules):
        return probabilities(query, keys, None, plan, call, index)
    nq, nk = query.shape[2], keys.shape[2]
    index = torch.arange(nq) if index is None else index
    q = query[:, :, index].float()
    k = keys.float().repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
    z = call.scaling * (q @ k.transpose(-1, -2))
    for stage in plan.logits:
        rows = query_rows(stage.rows, call, index)
        z = torch.where(rows[:, None, :, None], edit_logits(z, *stage.keys(nk)), z)
    keep = keep_rows(None, index, nq, nk, True, query.device)
    if keep is not None:
        z = z.masked_fill(~keep, float("-inf"))
    p = torch.softmax(z, dim=-1).nan_to_num(0.0)
    for rule in plan.rules:
        rows = query_rows(rule.rows, call, index)
        if isinstance(rule, GiftRule):
            p = _gift_over_ranks(rule, p, rule.keys(nk), rows, heads)
        else:
            p = rule.apply(p, rule.keys(nk), rows, None)
    return p


def _gift_over_ranks(rule: GiftRule, p, keys: dict, rows, heads: Heads) -> torch.Tensor:
    """:func:`mitigate.plan.gift_enhance` when this rank holds only some of the heads."""
    image = (keys["groups"] == rule.IMAGE)[:, None, None, :]
    query = (keys["groups"] == rule.QUERY)[:, None, None, :]
    weights = keys["weights"][:, None, None, :]
    masses = torch.stack(((p * image).sum(-1), (p * image * weights).sum(-1), (p * query).sum(-1)))
    masses = heads.gather(masses, 2)  # [3, B, H, R] over every head
    vision, query_heads, g = gift_heads(*masses, rule.top_heads(heads.total))
    vision, query_heads = vision[:, heads.start : heads.stop], query_heads[:, heads.start : heads.stop]
    factor = torch.where(vision[..., None] & image, weights, 1.0)
    factor = factor * torch.where(query_heads[..., None] & query, g[..., None], 1.0)
    edited = p * factor
    edited = edited / edited.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    return torch.where(rows[:, None, :, None], edited, p)
