"""Masks as transformers hands them to attention functions, turned into one boolean "keep" form."""

from __future__ import annotations

import torch


def causal_keep(num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """Bottom-right aligned causal mask ``[Nq, Nk]``: row ``i`` sees key ``j <= i + Nk - Nq``."""
    rows = torch.arange(num_queries, device=device)[:, None] + (num_keys - num_queries)
    return torch.arange(num_keys, device=device)[None, :] <= rows


def keep_mask(
    attention_mask: torch.Tensor | None,
    batch: int,
    num_queries: int,
    num_keys: int,
    causal: bool,
    device: torch.device,
) -> torch.Tensor | None:
    """bool ``[B or 1, 1, Nq, Nk]`` (True = attend), or ``None`` when every key is visible.

    ``sdpa_mask`` gives ``None`` for unpadded batches (causality implicit) or a bool mask; ``eager_mask``
    gives an additive float mask whose masked entries are very negative.
    """
    if attention_mask is None:
        if causal and num_queries > 1:
            return causal_keep(num_queries, num_keys, device)[None, None]
        return None
    mask = attention_mask[..., -num_queries:, :num_keys]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    if mask.dim() == 2:  # [B, Nk] padding mask, as some callers pass
        mask = mask[:, None, None, :]
        if causal and num_queries > 1:
            mask = mask & causal_keep(num_queries, num_keys, device)[None, None]
    return mask


def keep_rows(
    attention_mask: torch.Tensor | None,
    index: torch.Tensor,
    num_queries: int,
    num_keys: int,
    causal: bool,
    device: torch.device,
) -> torch.Tensor | None:
    """:func:`keep_mask` for the query rows ``index`` only, without building the full causal mask."""
    if attention_mask is None:
        if not (causal and num_queries > 1):
            return None
        limit = index + (num_keys - num_queries)
        return (torch.arange(num_keys, device=device)[None, :] <= limit[:, None])[None, None]
    return keep_mask(attention_mask, 1, num_queries, num_keys, causal, device)[:, :, index]


def padding_of(mask: torch.Tensor) -> torch.Tensor:
    """The 2-D padding mask ``[B, T]`` (1 = real token) of a prefill's 4-D mask ``[B, 1, T, L]`` (what
    transformers builds outside the model for a static cache): the keys the prompt's last row sees among
    the first ``T`` slots."""
    keep = mask[:, 0, -1, : mask.shape[-2]]
    if keep.dtype != torch.bool:
        keep = keep > torch.finfo(keep.dtype).min / 2
    return keep.long()
