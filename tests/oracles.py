"""Independent implementations of the methods' formulas, for checking mitigate against.

They share no code with ``mitigate``: their own attention function (eager, materialised probabilities,
explicit loops over rows and heads), their own prefill tracking and their own hidden-state hooks. Each
oracle edits the probabilities exactly as DESIGN.md words the method.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ORACLE = "oracle-eager"


class EagerOracle:
    """Base: eager attention in fp32 with a per-layer probability edit; the model's own layout tracking."""

    def __init__(self, model, image_token_id: int):
        self.model = model
        self.image_token_id = image_token_id
        self.handles = []
        self.prompt_len = 0
        self.past = 0
        self.image = None  # [B, T] bool
        self.valid = None  # [B, T] bool

    # -- plumbing ------------------------------------------------------------------------------
    def __enter__(self):
        AttentionInterface.register(ORACLE, self._attention)
        AttentionMaskInterface.register(ORACLE, sdpa_mask)
        self.previous = self.model.config.text_config._attn_implementation
        self.model.set_attn_implementation({"text_config": ORACLE})
        base = self.model.model
        self.handles.append(base.register_forward_pre_hook(self._before, with_kwargs=True))
        for idx, layer in enumerate(base.language_model.layers):
            self.handles.append(layer.register_forward_pre_hook(self._layer_hook(idx), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.model.set_attn_implementation({"text_config": self.previous})
        AttentionInterface._global_mapping.pop(ORACLE, None)
        AttentionMaskInterface._global_mapping.pop(ORACLE, None)

    def _before(self, module, args, kwargs):
        ids = kwargs["input_ids"]
        cache = kwargs.get("cache")
        self.past = cache.get_seq_length() if cache is not None else 0
        if self.past == 0:
            mask = kwargs.get("attention_mask")
            self.valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            self.image = (ids == self.image_token_id) & self.valid
            self.prompt_len = ids.shape[1]
            self.new_prompt()

    def _layer_hook(self, idx):
        def hook(module, args, kwargs):
            if self.past == 0:
                hidden = args[0] if args else kwargs["hidden_states"]
                self.observe(idx, hidden)

        return hook

    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        _bsz, heads, nq, _ = query.shape
        nk = key.shape[2]
        groups = heads // key.shape[1]
        k = key.float().repeat_interleave(groups, dim=1)
        v = value.float().repeat_interleave(groups, dim=1)
        z = (query.float() @ k.transpose(-1, -2)) * scaling
        z = self.edit_logits(module.layer_idx, z)
        if attention_mask is None:
            keep = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)[None, None]
        else:
            keep = attention_mask.bool()
        z = z.masked_fill(~keep, float("-inf"))
        p = torch.softmax(z, dim=-1).nan_to_num(0.0)
        positions = list(range(self.past, self.past + nq))
        p = self.edit_probs(module.layer_idx, p, positions)
        out = p @ v
        out = self.edit_output(module.layer_idx, out)
        return out.transpose(1, 2).to(query.dtype), None

    def key_mask(self, mask: torch.Tensor, nk: int) -> torch.Tensor:
        pad = torch.zeros(mask.shape[0], max(0, nk - mask.shape[1]), dtype=torch.bool)
        return torch.cat([mask, pad], dim=1)[:, :nk]

    # -- hooks for subclasses --------------------------------------------------------------------
    def new_prompt(self):
        pass

    def observe(self, layer: int, hidden: torch.Tensor):
        pass

    def edit_logits(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        return z

    def edit_probs(self, layer: int, p: torch.Tensor, positions: list[int]) -> torch.Tensor:
        return p

    def edit_output(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        return out


class VAROracle(EagerOracle):
    """VAR as DESIGN.md states it, with loops over batch rows, query rows and heads."""

    def __init__(
        self,
        model,
        image_token_id,
        *,
        sink_dims,
        tau,
        moved_fraction,
        min_nonsink_ratio,
        min_image_mass,
        layers,
    ):
        super().__init__(model, image_token_id)
        self.dims = sink_dims
        self.tau = tau
        self.fraction = moved_fraction
        self.ratio = min_nonsink_ratio
        self.min_image = min_image_mass
        self.layers = set(layers)
        self.sinks: dict[int, torch.Tensor] = {}

    def new_prompt(self):
        self.sinks = {}

    def observe(self, layer, hidden):
        if layer not in self.layers:
            return
        h = hidden.float()
        normed = h / torch.sqrt((h * h).mean(dim=-1, keepdim=True) + 1e-6)
        if self.dims == "auto":
            masked = normed.abs() * self.valid[..., None]
            dims = masked.amax(dim=1).topk(2, dim=-1).indices  # per row
            score = torch.stack([masked[b][:, dims[b]].amax(-1) for b in range(h.shape[0])])
        else:
            score = normed[..., self.dims].abs().amax(-1)
        self.sinks[layer] = (score > self.tau) & self.valid

    def edit_probs(self, layer, p, positions):
        if layer not in self.layers:
            return p
        p = p.clone()
        nk = p.shape[-1]
        sinks = self.key_mask(self.sinks[layer], nk)
        image = self.key_mask(self.image, nk)
        for b in range(p.shape[0]):
            if not (sinks[b] & image[b]).any():
                continue  # a layer with no image sink is not edited
            last_image = int(image[b].nonzero().max())
            nonsink_image = image[b] & ~sinks[b]
            for i, pos in enumerate(positions):
                if pos <= last_image:
                    continue
                for h in range(p.shape[1]):
                    row = p[b, h, i]
                    image_mass = row[image[b]].sum()
                    nonsink = row[nonsink_image].sum()
                    if image_mass <= 0 or nonsink <= 0:
                        continue
                    if image_mass < self.min_image or nonsink / image_mass < self.ratio:
                        continue
                    moved = self.fraction * row[sinks[b]].sum()
                    new = row.clone()
                    new[sinks[b]] = row[sinks[b]] * (1 - self.fraction)
                    new[nonsink_image] = row[nonsink_image] + moved * row[nonsink_image] / nonsink
                    p[b, h, i] = new
        return p
