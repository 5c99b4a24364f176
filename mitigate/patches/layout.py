"""Per-row token layout of a prompt: where the image, prefix and user query sit, and where generation starts.

Built once per prefill from ``input_ids`` (or placeholder embeddings) and the padding mask. Positions are
indices into the key sequence, so left padding is part of them. Decode steps only append keys, which are
neither image, prefix nor query tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class KeyBuffer:
    """A per-key prompt tensor ``[..., T]`` seen over ``Nk >= T`` keys, padded with ``fill`` for generated
    keys. Capacity grows geometrically, so decode steps get a view, not a new tensor each step."""

    def __init__(self, prompt: torch.Tensor, fill: float | bool = 0, extra: int = 64):
        self.prompt_len = prompt.shape[-1]
        self.fill = fill
        self._buffer = torch.nn.functional.pad(prompt, (0, extra), value=fill)

    def get(self, num_keys: int, offset: int = 0) -> torch.Tensor:
        """Values for the keys at positions ``offset .. offset + num_keys - 1`` (a sliding-window cache
        keeps only the latest keys: ``offset`` is how many earlier positions it dropped)."""
        end = offset + num_keys
        if end > self._buffer.shape[-1]:
            grow = max(end, 2 * self._buffer.shape[-1]) - self._buffer.shape[-1]
            self._buffer = torch.nn.functional.pad(self._buffer, (0, grow), value=self.fill)
        return self._buffer[..., offset:end]


@dataclass
class TokenLayout:
    """Masks over the prompt's ``T`` positions, bool ``[B, T]``, plus per-row indices ``[B]`` (-1: none)."""

    valid: torch.Tensor
    image: torch.Tensor
    prefix: torch.Tensor
    query: torch.Tensor
    first_image: torch.Tensor
    last_image: torch.Tensor
    prompt_len: int
    ids: torch.Tensor | None = None  # the prompt's token ids, when the model got ids (not embeddings)
    #: host-side: the first position after the image in every row that has one (prompt_len if none)
    after_image: int = 0
    _buffers: dict[str, KeyBuffer] = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def has_image(self) -> torch.Tensor:
        return self.last_image >= 0

    def keys(self, name: str, num_keys: int, offset: int = 0) -> torch.Tensor:
        """Mask ``name`` over ``num_keys`` keys from position ``offset``; generated keys are False."""
        if name not in self._buffers:
            self._buffers[name] = KeyBuffer(getattr(self, name), fill=False)
        return self._buffers[name].get(num_keys, offset)

    @staticmethod
    def keys_of(mask: torch.Tensor, num_keys: int) -> torch.Tensor:
        """A prompt mask ``[B, T]`` cut or extended (with False) to ``num_keys`` keys."""
        if num_keys <= mask.shape[1]:
            return mask[:, :num_keys]
        return torch.nn.functional.pad(mask, (0, num_keys - mask.shape[1]), value=False)

    def rows_after_image(self, positions: torch.Tensor) -> torch.Tensor:
        """bool ``[B, Nq]``: positions strictly after the row's last image token (False without image)."""
        return (positions[None, :] > self.last_image[:, None]) & self.has_image[:, None]


def build_layout(
    image_mask: torch.Tensor, attention_mask: torch.Tensor | None, ids: torch.Tensor | None = None
) -> TokenLayout:
    """Layout from the image-token mask ``[B, T]`` and the 2-D padding mask (1 = real token).

    * prefix: real tokens before the row's first image token;
    * query: real tokens after the row's last image token (the whole prompt when the row has no image).
    """
    bsz, seq = image_mask.shape
    device = image_mask.device
    valid = torch.ones_like(image_mask) if attention_mask is None else attention_mask[:, -seq:].bool()
    image = image_mask & valid
    pos = torch.arange(seq, device=device)[None, :].expand(bsz, seq)
    has = image.any(dim=1)
    first = torch.where(has, torch.where(image, pos, seq).min(dim=1).values, -1)
    last = torch.where(has, torch.where(image, pos, -1).max(dim=1).values, -1)
    prefix = valid & (pos < first[:, None]) & has[:, None]
    query = valid & (pos > last[:, None])
    return TokenLayout(
        valid=valid,
        image=image,
        prefix=prefix,
        query=query,
        first_image=first,
        last_image=last,
        prompt_len=seq,
        ids=ids,
        # one host sync per prefill, so that per-layer code never needs one
        after_image=int(torch.where(has, last + 1, seq).min()) if bsz else seq,
    )
