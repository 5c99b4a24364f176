"""Image-free twins of a prompt batch: the same rows without their image spans (image tokens and the
family's markers around them, as the adapter finds them), left-padded to the same length, for the methods
that compare the model with and without the image (VHR's probe, PAI's contrast).

Every per-token input (``[B, T]`` tensors next to ``input_ids``: ``token_type_ids``,
``mm_token_type_ids``, ...) is cut the same way, so each family's own forward builds its masks as usual.
Positions may have leading dimensions (Qwen's M-RoPE: ``[3 or 4, B, T]``): a twin is text only, so in
every leading row its positions count its own tokens from the position the prompt's first token has.
"""

from __future__ import annotations

from typing import Any

import torch

from .adapters import PER_IMAGE_INPUTS

#: inputs that are not per-token data of the prompt, even if they happen to be [B, T]
NOT_ALIGNED = ("attention_mask", "position_ids", "input_ids", "inputs_embeds", *PER_IMAGE_INPUTS)


def twin_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [B, T], valid [B, T])``: for each row, the kept positions right-aligned (left padding)."""
    length = keep.shape[1]
    counts = keep.sum(-1)
    # kept positions in order, then the dropped ones: a stable sort on "dropped" does it in one op
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
    shift = (length - counts)[:, None]
    columns = torch.arange(length, device=keep.device)[None, :]
    source = (columns - shift).clamp_min(0)
    valid = columns >= shift
    index = torch.where(valid, order.gather(-1, source), torch.zeros_like(source))
    return index, valid


def twin_tensor(
    values: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, fill: int = 0
) -> torch.Tensor:
    return torch.where(valid, values.gather(-1, index), torch.full_like(values, fill))


def twin_positions(positions: torch.Tensor, mask: torch.Tensor, twin_mask: torch.Tensor) -> torch.Tensor:
    """Positions ``[..., B, T]`` of the twins: in every leading row, ``offset + count - 1`` where ``count``
    runs over the twin's own tokens and ``offset`` is the prompt's position of its first real token (0,
    or 1 for PaliGemma); padding gets ``offset``, as the families' own position builders do."""
    if positions.shape[-2] != mask.shape[0]:  # one row of positions broadcast over the batch
        positions = positions.expand(*positions.shape[:-2], mask.shape[0], positions.shape[-1])
    first = mask.long().argmax(-1)  # [B]: the first real token (left padding)
    index = first.expand(*positions.shape[:-2], -1)[..., None]
    offset = positions.gather(-1, index)  # [..., B, 1]
    count = (twin_mask.long().cumsum(-1) - 1).clamp_min(0)
    return (count + offset).to(positions.dtype)


def double_batch(
    kwargs: dict[str, Any], drop: torch.Tensor, mask: torch.Tensor, pad_id: int
) -> tuple[dict[str, Any], torch.Tensor]:
    """Forward kwargs for ``2B`` rows (prompts, then their image-free twins) and the twins' padding mask.

    ``drop``/``mask`` are ``[B, T]`` (the image spans, real tokens). Position ids of the twins count their
    own tokens, as a prompt without the image would (:func:`twin_positions`).
    """
    ids = kwargs["input_ids"]
    index, valid = twin_index(mask.bool() & ~drop)
    twin_mask = valid.to(mask.dtype)
    out = dict(kwargs)
    out["input_ids"] = torch.cat([ids, twin_tensor(ids, index, valid, pad_id)])
    out["attention_mask"] = torch.cat([mask, twin_mask])
    for key, value in kwargs.items():
        if key not in NOT_ALIGNED and torch.is_tensor(value) and value.shape == ids.shape:
            out[key] = torch.cat([value, twin_tensor(value, index, valid)])
    positions = kwargs.get("position_ids")
    if positions is not None:
        positions = positions.expand(*positions.shape[:-2], ids.shape[0], positions.shape[-1])
        twins = twin_positions(positions, mask, twin_mask)
        out["position_ids"] = torch.cat([positions, twins], dim=-2)
    return out, twin_mask
