"""What every layer may know about the model and the prompt: the neutral types below api, session, methods,
plans and kernels alike (nothing here imports any of them).

* :class:`ModelInfo`: sizes and facts about the model that methods need, filled in by the family's adapter.
* :class:`TokenLayout`: per row of a prompt batch, where the image, prefix and user query sit. Built once
  per prefill by the family's adapter from ``input_ids`` (or placeholder embeddings) and the padding mask.
  Positions are indices into the key sequence, so left padding is part of them. Decode steps only append
  keys, which are neither image, prefix nor query tokens.
* :func:`extend_keys`: a per-key prompt tensor seen over the keys of one attention call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelInfo:
    """What methods may know about the model they edit."""

    family: str
    name_or_path: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    rms_norm_eps: float
    image_token_id: int
    vision_layers: int = 0
    vision_feature_layer: int | None = None  # 0-based layer whose output becomes the image tokens
    vision_has_cls: bool = False
    features_drop_cls: bool = True
    #: image tokens are the tower's per-image features, in order (LLaVA-1.5, InternVL's tiles); not with a
    #: base view plus tiles and row-end tokens (LLaVA-NeXT)
    flat_image_features: bool = True
    #: the layers whose attention mitigate edits, in the model's own numbering (``module.layer_idx``);
    #: ``None``: every layer. Qwen3.5's linear-attention layers are not among them.
    attention_layers: tuple[int, ...] | None = None
    #: layers whose prefill attention sees only the prompt's last row (Gemma 4's key/value-sharing
    #: layers under ``generate``): methods that read every prompt row of a layer cannot use them
    last_row_layers: tuple[int, ...] = ()

    def editable(self, every_row: bool = False) -> tuple[int, ...]:
        """The layers a method may edit; with ``every_row``, only those whose prefill sees every row."""
        layers = range(self.num_layers) if self.attention_layers is None else self.attention_layers
        return tuple(i for i in layers if not (every_row and i in self.last_row_layers))

    def onto_editable(self, layers: list[int], every_row: bool = False) -> list[int]:
        """A default layer list kept to the editable layers; when none of it is editable, the editable layer
        nearest to its middle (so a default range never comes out empty)."""
        valid = self.editable(every_row)
        kept = [i for i in layers if i in valid]
        if kept or not layers or not valid:
            return kept
        middle = sum(layers) / len(layers)
        return [min(valid, key=lambda i: (abs(i - middle), i))]


def extend_keys(prompt: torch.Tensor, fill: float | bool, num_keys: int, offset: int = 0) -> torch.Tensor:
    """A per-key prompt tensor ``[..., T]`` over the keys at positions ``offset .. offset + num_keys - 1``:
    generated keys (positions ``>= T``) get ``fill``; a sliding-window cache that dropped the first
    ``offset`` positions sees only the rest."""
    end = offset + num_keys
    length = prompt.shape[-1]
    if end > length:
        prompt = torch.nn.functional.pad(prompt, (0, end - length), value=fill)
    return prompt[..., offset:end]


@dataclass
class TokenLayout:
    """Masks over the prompt's ``T`` positions, bool ``[B, T]``, plus per-row indices ``[B]`` (-1: none).

    ``image``: the tokens that carry image features. ``span``: those plus the markers the family writes
    around or between them (begin/end-of-image, row breaks, tile labels), which are neither prefix, query
    nor image; an image-free twin of the prompt drops the whole span. ``first_image``/``last_image`` are
    image tokens (rows "after the image" follow the last feature token)."""

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
    span: torch.Tensor | None = None  # image tokens and their markers; None: the image tokens alone

    @property
    def image_span(self) -> torch.Tensor:
        return self.image if self.span is None else self.span

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def has_image(self) -> torch.Tensor:
        return self.last_image >= 0

    def keys(self, name: str, num_keys: int, offset: int = 0) -> torch.Tensor:
        """Mask ``name`` over ``num_keys`` keys from position ``offset``; generated keys are False."""
        return extend_keys(getattr(self, name), False, num_keys, offset)

    def rows_after_image(self, positions: torch.Tensor) -> torch.Tensor:
        """bool ``[B, Nq]``: positions strictly after the row's last image token (False without image)."""
        return (positions[None, :] > self.last_image[:, None]) & self.has_image[:, None]


def build_layout(
    image_mask: torch.Tensor,
    attention_mask: torch.Tensor | None,
    ids: torch.Tensor | None = None,
    span_mask: torch.Tensor | None = None,
) -> TokenLayout:
    """Layout from the image-token mask ``[B, T]``, the 2-D padding mask (1 = real token) and, where the
    family writes markers around its images, the span mask (image tokens and markers).

    * prefix: real tokens before the row's first span token;
    * query: real tokens after the row's last span token (the whole prompt when the row has no image).
    """
    bsz, seq = image_mask.shape
    device = image_mask.device
    valid = torch.ones_like(image_mask) if attention_mask is None else attention_mask[:, -seq:].bool()
    image = image_mask & valid
    span = image if span_mask is None else (span_mask | image_mask) & valid
    pos = torch.arange(seq, device=device)[None, :].expand(bsz, seq)
    has = image.any(dim=1)
    first = torch.where(has, torch.where(image, pos, seq).min(dim=1).values, -1)
    last = torch.where(has, torch.where(image, pos, -1).max(dim=1).values, -1)
    span_first = torch.where(has, torch.where(span, pos, seq).min(dim=1).values, -1)
    span_last = torch.where(has, torch.where(span, pos, -1).max(dim=1).values, -1)
    prefix = valid & (pos < span_first[:, None]) & has[:, None]
    query = valid & (pos > span_last[:, None])
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
        span=None if span_mask is None else span,
    )
