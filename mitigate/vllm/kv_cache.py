"""Reading one request's keys and values back from vLLM's paged KV cache (CPU attention backend).

The CPU cache is ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` per layer, but the order of the
elements inside one (block, head) region depends on the instruction set the kernel was built for (keys are
stored transposed for some). Rather than assume one, :func:`layout` learns it from the backend's own writer
(``do_kv_cache_update``) on a scratch block, with small integer codes that every supported dtype stores
exactly, and refuses anything that is not a plain permutation (a quantised cache, for one).
"""

from __future__ import annotations

from functools import cache

import torch

from ..errors import MitigationError


@cache
def layout(
    impl, layer, block_size: int, head_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where token ``t``'s key and value element ``d`` sit inside one (block, kv-head) region of
    ``2 * block_size * head_size`` elements: index tensors ``[block_size, head_size]`` for keys and values."""
    heads = impl.num_kv_heads
    slots = torch.arange(block_size)
    found = []
    # two probes: token index, then element index (each < 2**8, exact in bf16 and fp16)
    for code in (torch.arange(1, block_size + 1)[:, None].expand(block_size, head_size),
                 torch.arange(1, head_size + 1)[None, :].expand(block_size, head_size)):  # fmt: skip
        keys = code[:, None, :].expand(block_size, heads, head_size).to(dtype).contiguous()
        scratch = torch.zeros(1, heads, block_size, 2 * head_size, dtype=dtype)
        impl.do_kv_cache_update(layer, keys, -keys, scratch, slots)
        regions = scratch.view(heads, -1).float()
        if not bool((regions == regions[:1]).all()):
            raise MitigationError("mitigate: the CPU KV cache does not keep each kv head in its own region")
        found.append(regions[0])
    by_token, by_element = found
    position = torch.arange(by_token.numel())
    key_at = torch.full((block_size, head_size), -1, dtype=torch.long)
    value_at = torch.full((block_size, head_size), -1, dtype=torch.long)
    for sign, table in ((1, key_at), (-1, value_at)):
        where = (by_token * sign) > 0
        table[(by_token[where].abs().long() - 1), (by_element[where].abs().long() - 1)] = position[where]
    if bool((key_at < 0).any() or (value_at < 0).any()) or bool((by_token == 0).any()):
        raise MitigationError(
            "mitigate: the CPU KV cache layout is not a plain permutation of keys and values (a quantised "
            "cache?); attention edits need to read the cache back exactly"
        )
    return key_at, value_at


def gather(
    kv_cache: torch.Tensor, where: tuple[torch.Tensor, torch.Tensor], blocks: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values at positions ``0 .. length-1`` of one request, each ``[num_kv_heads, length, D]``,
    from its row of the block table."""
    num_blocks, heads, block_size, _ = kv_cache.shape
    key_at, value_at = where
    regions = kv_cache.view(num_blocks, heads, -1)
    position = torch.arange(length)
    block = blocks[position // block_size].long()[:, None, None]
    offset = position % block_size
    head = torch.arange(heads)[None, :, None]
    keys = regions[block, head, key_at[offset][:, None, :]]  # [length, heads, D]
    values = regions[block, head, value_at[offset][:, None, :]]
    return keys.transpose(0, 1), values.transpose(0, 1)
