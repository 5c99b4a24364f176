"""Image-free contrast (PAI's ``cfg_gamma``): every forward also runs each prompt without its image, in the
same batch, and the next-token scores become ``gamma * (logp - logp_noimg) + logp_noimg``.

Hooks on the top-level model double the batch on the way in (prompt rows, then their image-free twins:
the family's adapter says which tokens an image span holds; left-padded to the same length, with their own
padding mask and positions, 1-D or M-RoPE) and fold it back on the way out, so ``generate`` sees ``B``
rows while the model and its cache hold ``2B``. The image-free rows have no image tokens, so the attention
edits leave them alone. With ``cutoff``, tokens whose probability is
below ``cutoff`` times the most likely one's get ``-inf`` (the released code's plausibility constraint).
Only the last position's scores are contrasted: earlier positions keep the prompt rows' logits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import MitigationError
from ..kernels.masks import padding_of
from .adapters import Adapter
from .twins import NOT_ALIGNED, double_batch, twin_positions


def contrast_scores(
    cond: torch.Tensor, uncond: torch.Tensor, gamma: float, cutoff: float | None
) -> torch.Tensor:
    """``gamma * (log p - log q) + log q`` from two logit rows ``[..., V]``, with the plausibility cutoff."""
    logp = torch.log_softmax(cond.float(), dim=-1)
    logq = torch.log_softmax(uncond.float(), dim=-1)
    out = gamma * (logp - logq) + logq
    if cutoff is not None:
        floor = logp.max(-1, keepdim=True).values + math.log(cutoff)
        out = out.masked_fill(logp < floor, float("-inf"))
    return out


class Contrast:
    """Batch-doubling hooks for one model; see the module docstring."""

    def __init__(self, model: nn.Module, adapter: Adapter, gamma: float, cutoff: float | None):
        if not hasattr(model, "lm_head"):
            raise TypeError("the image-free contrast needs the model with its language-model head")
        self.model = model
        self.adapter = adapter
        self.gamma = gamma
        self.cutoff = cutoff
        self.enabled = True
        self.rows = 0
        self.twin_mask: torch.Tensor | None = None  # [B, T] padding mask of the image-free prompts
        #: ``[..., B]``: how far the twins' positions are behind the prompt rows' (their missing images),
        #: per leading row of the positions (M-RoPE: per rotary axis)
        self.shift: torch.Tensor | None = None
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, with_kwargs=True),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not self.enabled or ids is None:
            self.rows = 0
            return None
        kwargs = dict(kwargs)
        if args:
            kwargs["input_ids"], args = args[0], args[1:]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        # a compiled forward is a decode step (the prefill runs eagerly): nothing is read from the cache
        past = 0 if cache is None or torch.compiler.is_compiling() else int(cache.get_seq_length())
        prefill = not torch.compiler.is_compiling() and past == 0
        mask = kwargs.get("attention_mask")
        bsz = ids.shape[0]
        if mask is None and not prefill:  # generate drops the mask of unpadded batches (dynamic cache)
            mask = torch.ones(bsz, past + ids.shape[1], dtype=torch.long, device=ids.device)
        if prefill and isinstance(mask, dict):
            # per-layer-type masks (a static cache on Qwen-VL, Gemma, ...): hand the model the plain padding
            # mask instead, so its own mask builders make every layer type's mask for the doubled batch
            _refuse_rolling_windows(cache)
            full = [value for value in mask.values() if value is not None and value.dim() == 4]
            mask = padding_of(max(full, key=lambda value: value.shape[-1])) if full else None
        if prefill:
            if mask is None:  # generate drops the mask of unpadded batches
                mask = torch.ones_like(ids)
            plain = mask if mask.dim() == 2 else padding_of(mask)
            pad = self.model.generation_config.pad_token_id
            span = self.adapter.span_mask(ids, self.adapter.image_mask(ids, None))
            kwargs["attention_mask"] = plain
            positions = kwargs.get("position_ids")
            kwargs, twin_mask = double_batch(kwargs, span, plain, 0 if pad is None else int(pad))
            kwargs = self.adapter.double_images(kwargs, bsz)
            self.twin_mask = twin_mask
            if positions is not None:
                positions = positions.expand(*positions.shape[:-2], bsz, positions.shape[-1])
                twins = twin_positions(positions, plain, twin_mask)
                self.shift = positions[..., -1] - twins[..., -1]
            else:
                self.shift = plain.sum(-1) - twin_mask.sum(-1)
            if mask.dim() == 4:  # a static cache: transformers built the 4-D mask outside the model
                twin_keys = torch.nn.functional.pad(twin_mask.bool(), (0, mask.shape[-1] - ids.shape[1]))
                causal = mask.new_ones(mask.shape[-2], mask.shape[-1]).tril()
                kwargs["attention_mask"] = torch.cat([mask, twin_keys[:, None, None, :] & causal])
            self._follow_beams(cache, bsz)
        else:
            if self.twin_mask is None or self.twin_mask.shape[0] != bsz:
                return None
            if isinstance(mask, dict):
                mask = {kind: self._doubled_mask(value, kind) for kind, value in mask.items()}
            else:
                mask = self._doubled_mask(mask, "")
            doubled = {
                key: torch.cat([value, value])  # the new tokens are the same in both halves
                for key, value in kwargs.items()
                if key not in NOT_ALIGNED and torch.is_tensor(value) and value.shape == ids.shape
            }
            kwargs.update(doubled, input_ids=torch.cat([ids, ids]))
            kwargs["attention_mask"] = mask
            positions = kwargs.get("position_ids")
            if positions is not None:
                positions = positions.expand(*positions.shape[:-2], bsz, positions.shape[-1])
                shift = self.shift if self.shift.dim() < positions.dim() else self.shift[0]
                twins = (positions - shift[..., None]).clamp_min(0)
                kwargs["position_ids"] = torch.cat([positions, twins], dim=-2)
        self.rows = bsz
        return args, kwargs

    def _doubled_mask(self, mask: torch.Tensor | None, kind: str) -> torch.Tensor | None:
        """A decode step's mask for the prompt rows, then their twins: the prompt's keys follow the twins'
        padding, later keys as the prompt rows'."""
        if mask is None:
            if "linear" in kind:  # recurrent layers take no mask once their state holds the prompt
                return None
            raise MitigationError(
                f"mitigate: a decode step came with no {kind or 'attention'} mask; the image-free contrast "
                "needs one to keep its twins' padding"
            )
        prompt = self.twin_mask.shape[1]
        if mask.dim() == 2:
            twin = torch.cat([self.twin_mask.to(mask.dtype), mask[:, prompt:]], dim=1)
        else:  # 4-D (a static cache): slots are positions, as no sliding window rolls (see the prefill)
            keys = torch.nn.functional.pad(self.twin_mask.bool(), (0, mask.shape[-1] - prompt))
            in_prompt = torch.arange(mask.shape[-1], device=mask.device) < prompt
            twin = torch.where(in_prompt, keys[:, None, None, :], mask)
        return torch.cat([mask, twin])

    @staticmethod
    def _follow_beams(cache: Any, rows: int) -> None:
        """Beam search reorders the cache by beam; the image-free rows follow their prompt rows."""
        if cache is None or not hasattr(cache, "reorder_cache"):
            return
        reorder = cache.reorder_cache

        def doubled(beam_idx: torch.Tensor) -> None:
            reorder(torch.cat([beam_idx, beam_idx + rows]))

        cache.reorder_cache = doubled  # this generation's cache object only

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        bsz, self.rows = self.rows, 0
        if not bsz:
            return output
        logits = output.logits
        cond, uncond = logits[:bsz], logits[bsz:]
        last = contrast_scores(cond[:, -1], uncond[:, -1], self.gamma, self.cutoff)
        output.logits = torch.cat([cond[:, :-1].float(), last[:, None]], dim=1).to(logits.dtype)
        return output


def _refuse_rolling_windows(cache: Any) -> None:
    """A static sliding-window layer shorter than the generation rolls its slots, and then its mask no
    longer says which position a slot holds: the twins' padding cannot be placed there."""
    for layer in getattr(cache, "layers", ()):
        if not getattr(layer, "is_sliding", False):
            continue
        croppable = getattr(layer, "_is_croppable", None)  # transformers: "the window never rolls"
        if croppable is None:  # without that flag: no shorter than every full layer (else assume it rolls)
            full = [other.max_cache_len for other in cache.layers if not getattr(other, "is_sliding", False)]
            croppable = bool(full) and layer.max_cache_len >= max(full)
        if not croppable:
            raise MitigationError(
                f"mitigate: the image-free contrast (cfg_gamma) cannot pair a static cache whose sliding "
                f"layers keep {layer.max_cache_len} keys and roll before the generation ends; use the "
                "default dynamic cache, or a static cache no longer than the window"
            )
