"""Independent implementations of the methods' formulas, for checking mitigate against.

They share no code with ``mitigate``: their own attention function (eager, materialised probabilities,
explicit loops over rows and heads), their own prefill tracking and their own hidden-state hooks. Each
oracle edits the probabilities exactly as DESIGN.md words the method.

They run on any family through transformers' own interfaces: the language model from
``model.get_decoder()``, the family's own masks (with ``mask="eager"``, the additive float masks that the
family's eager attention gets: prefix-LM, bidirectional image blocks, windows), and ``module.is_causal``
when a call has no mask (PaliGemma's prefix-LM modules are not causal). Rows are the last ones of the
current forward (Gemma 4's key/value-sharing layers get one row at prefill); keys are the call's own, on a
sliding-window layer the last ones (:meth:`EagerOracle.key_mask`). Where a family writes markers around its
image tokens (:func:`marker_ids`: Qwen's vision start/end, Gemma's begin/end-of-image), VAF's prefix, GIFT's
query and VHR's text-only twin leave them out.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

ORACLE = "oracle-eager"


class EagerOracle:
    """Base: eager attention in fp32 with a per-layer probability edit; the model's own layout tracking."""

    def __init__(self, model, image_token_id: int, mask: str = "sdpa"):
        self.model = model
        self.image_token_id = image_token_id
        self.mask_function = {"sdpa": sdpa_mask, "eager": eager_mask}[mask]
        self.handles = []
        self.prompt_len = 0
        self.past = 0
        self.present = 0  # tokens in the cache after the current forward
        self.image = None  # [B, T] bool
        self.valid = None  # [B, T] bool
        self.ids = None  # [B, T] the prompt's token ids
        self.pixel_values = None  # the prompt's images, when it has any
        self.tower_input = None  # the images the vision tower was last given (see PAINTOracle)
        self.positions: list[int] = []  # absolute positions of the current call's query rows

    # -- plumbing ------------------------------------------------------------------------------
    def __enter__(self):
        AttentionInterface.register(ORACLE, self._attention)
        AttentionMaskInterface.register(ORACLE, self.mask_function)
        self.previous = self.model.config.text_config._attn_implementation
        self.model.set_attn_implementation({"text_config": ORACLE})
        base = self.model.model
        self.handles.append(base.register_forward_pre_hook(self._before, with_kwargs=True))
        for idx, layer in enumerate(self.model.get_decoder().layers):
            self.handles.append(layer.register_forward_pre_hook(self._layer_hook(idx), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.model.set_attn_implementation({"text_config": self.previous})
        AttentionInterface._global_mapping.pop(ORACLE, None)
        AttentionMaskInterface._global_mapping.pop(ORACLE, None)

    def _before(self, module, args, kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]  # LLaVA-NeXT passes it positionally
        cache = kwargs.get("cache")
        self.past = cache.get_seq_length() if cache is not None else 0
        self.present = self.past + ids.shape[1]
        if self.past == 0:
            mask = kwargs.get("attention_mask")
            self.valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            self.image = (ids == self.image_token_id) & self.valid
            self.prompt_len = ids.shape[1]
            self.ids = ids
            pixel_values = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
            # generate() runs the vision tower before this forward (it passes the encoder's outputs)
            self.pixel_values = pixel_values if pixel_values is not None else self.tower_input
            self.tower_input = None
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
        self.key_offset = max(0, self.present - nk)
        groups = heads // key.shape[1]
        k = key.float().repeat_interleave(groups, dim=1)
        v = value.float().repeat_interleave(groups, dim=1)
        z = (query.float() @ k.transpose(-1, -2)) * scaling
        # absolute positions of the query rows: the last nq of this forward
        self.positions = list(range(self.present - nq, self.present))
        z = self.edit_logits(module.layer_idx, z)
        if attention_mask is None:
            causal = getattr(module, "is_causal", True)
            keep = torch.ones(nq, nk, dtype=torch.bool)
            keep = (keep.tril(nk - nq) if causal else keep)[None, None]
        elif attention_mask.dtype == torch.bool:
            keep = attention_mask[..., -nq:, :nk]
        else:  # an eager additive mask: 0 where kept, the dtype's minimum where masked
            keep = attention_mask[..., -nq:, :nk] > torch.finfo(attention_mask.dtype).min / 2
        z = z.masked_fill(~keep, float("-inf"))
        p = torch.softmax(z, dim=-1).nan_to_num(0.0)
        positions = list(self.positions)
        p = self.edit_probs(module.layer_idx, p, positions)
        out = p @ v
        out = self.edit_output(module.layer_idx, out)
        return out.transpose(1, 2).to(query.dtype), None

    def key_mask(self, mask: torch.Tensor, nk: int) -> torch.Tensor:
        """A prompt mask (or any per-position values) over the call's keys; a sliding-window cache keeps
        only the latest positions."""
        offset = getattr(self, "key_offset", 0)
        pad = torch.zeros(mask.shape[0], max(0, offset + nk - mask.shape[1]), dtype=mask.dtype)
        return torch.cat([mask, pad], dim=1)[:, offset : offset + nk]

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
        mask="sdpa",
    ):
        super().__init__(model, image_token_id, mask)
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
            # whether the layer has an image sink, and where the image ends, are facts of the prompt
            # (a sliding-window cache may no longer hold them)
            if not (self.sinks[layer][b] & self.image[b]).any():
                continue  # a layer with no image sink is not edited
            last_image = int(self.image[b].nonzero().max())
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


# -- helpers shared by the oracles below ------------------------------------------------------------
def _positions(mask_row: torch.Tensor) -> list[int]:
    return mask_row.nonzero().squeeze(1).tolist()


def _top(values: list[float], count: int) -> list[int]:
    """Indices of the ``count`` largest values (ties: lower index first)."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:count]


def marker_ids(config) -> tuple[int, ...]:
    """The ids a family writes around its image tokens, as transformers' config names them (Qwen's
    ``<|vision_start|>``/``<|vision_end|>``, Gemma's begin/end-of-image); ``()`` for families without."""
    names = ("vision_start_token_id", "vision_end_token_id", "boi_token_index", "eoi_token_index",
             "boi_token_id", "eoi_token_id")  # fmt: skip
    return tuple(int(i) for i in (getattr(config, name, None) for name in names) if i is not None)


def vision_cls_attention(model, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """Per vision layer, the CLS query's attention to each patch summed over heads ``[images, patches]``,
    recomputed from the tower's weights: LayerNorm -> q/k projections (InternViT: and its q/k norms) ->
    softmax of the CLS row."""
    tower = model.model.vision_tower
    encoder = tower.vision_model.encoder if hasattr(tower, "vision_model") else tower.encoder
    intern = hasattr(encoder, "layer")  # InternViT: encoder.layer[i].layernorm_before / .attention
    with torch.no_grad():
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states  # [i] = input of layer i
        out = []
        for idx, layer in enumerate(encoder.layer if intern else encoder.layers):
            norm, attn = (
                (layer.layernorm_before, layer.attention) if intern else (layer.layer_norm1, layer.self_attn)
            )
            x = norm(hidden[idx]).float()
            images, tokens, width = x.shape
            heads = attn.num_heads
            dim = width // heads
            q, k = attn.q_proj(x), attn.k_proj(x)
            if intern:
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q.view(images, tokens, heads, dim).transpose(1, 2)
            k = k.view(images, tokens, heads, dim).transpose(1, 2)
            z = (q[:, :, :1] @ k.transpose(-1, -2))[:, :, 0] / dim**0.5  # [images, heads, tokens]
            out.append(torch.softmax(z, dim=-1).sum(1)[:, 1:])  # drop the CLS column
    return out


def fold_patches(per_patch: torch.Tensor, block: int) -> torch.Tensor:
    """``[images, side*side]`` patch values (row-major) summed over ``block x block`` squares: one value
    per image token of a projector that folds each square into one token (InternVL's pixel shuffle),
    tokens row-major ``[images, (side/block)^2]``."""
    images, count = per_patch.shape
    side = int(count**0.5)
    grid = per_patch.reshape(images, side // block, block, side // block, block)
    return grid.sum(dim=(2, 4)).reshape(images, -1)


def paint_sets(first: torch.Tensor, feature: torch.Tensor, local_ratio: float) -> tuple[list, list]:
    """PAINT's token sets per image, as Python sets of patch indices: ``local`` = the top ``local_ratio``
    share of patches in the first layer, ``summary`` = patches above Q3 + 1.5 IQR (numpy percentiles) in
    the feature layer, ``local -= summary``."""
    import numpy as np

    locals_, summaries = [], []
    for img in range(first.shape[0]):
        f = first[img].double().numpy()
        count = int(f.shape[0] * local_ratio)
        local = set(np.argsort(-f, kind="stable")[:count].tolist())
        v = feature[img].double().numpy()
        q1, q3 = np.percentile(v, 25), np.percentile(v, 75)
        summary = {j for j in range(v.shape[0]) if v[j] > q3 + 1.5 * (q3 - q1)}
        locals_.append(local - summary)
        summaries.append(summary)
    return locals_, summaries


class PAIOracle(EagerOracle):
    """PAI: in ``layers``, the last query row's logits to image keys become ``z + alpha*|z|`` in every head
    (rows of the batch that have an image)."""

    def __init__(self, model, image_token_id, *, alpha, layers, mask="sdpa"):
        super().__init__(model, image_token_id, mask)
        self.alpha = alpha
        self.layers = set(layers)

    def edit_logits(self, layer, z):
        if layer not in self.layers:
            return z
        z = z.clone()
        image = self.key_mask(self.image, z.shape[-1])
        for b in range(z.shape[0]):
            keys = _positions(image[b])
            if not keys:
                continue
            for h in range(z.shape[1]):
                row = z[b, h, -1]
                row[keys] = row[keys] + self.alpha * row[keys].abs()
        return z


class VAFOracle(EagerOracle):
    """VAF: in ``layers``, logits to image keys times ``image_scale`` and to the prefix (real tokens before
    the first image or image marker: ``markers``, see :func:`marker_ids`) times ``system_scale``; on every
    query row (``rows="all"``) or, at prefill, only on rows after the image (``rows="after_image"``; decode
    rows always). Keys are read through :meth:`key_mask` (a sliding-window layer sees the last ones)."""

    def __init__(
        self, model, image_token_id, *, image_scale, system_scale, layers, rows="all", markers=(), mask="sdpa"
    ):
        super().__init__(model, image_token_id, mask)
        self.image_scale = image_scale
        self.system_scale = system_scale
        self.layers = set(layers)
        self.rows = rows
        self.markers = tuple(markers)

    def new_prompt(self):
        self.prefix = torch.zeros_like(self.valid)
        for b in range(self.ids.shape[0]):
            if not self.image[b].any():
                continue
            first = min(j for j in range(self.ids.shape[1]) if self._in_span(b, j))
            for j in range(first):
                self.prefix[b, j] = bool(self.valid[b, j])

    def _in_span(self, b, j):
        return bool(self.image[b, j]) or int(self.ids[b, j]) in self.markers

    def edit_logits(self, layer, z):
        if layer not in self.layers:
            return z
        z = z.clone()
        image_keys = self.key_mask(self.image, z.shape[-1])
        prefix_keys = self.key_mask(self.prefix, z.shape[-1])
        for b in range(z.shape[0]):
            image = _positions(self.image[b])
            if not image:
                continue
            keys, prefix = _positions(image_keys[b]), _positions(prefix_keys[b])
            for i, pos in enumerate(self.positions):
                if self.rows == "after_image" and pos <= max(image):
                    continue
                for h in range(z.shape[1]):
                    row = z[b, h, i]
                    row[keys] = row[keys] * self.image_scale
                    row[prefix] = row[prefix] * self.system_scale
        return z


class PAINTOracle(EagerOracle):
    """PAINT: token sets from the vision tower's CLS attention (see :func:`paint_sets`), then in
    ``layers`` the last row's logits grow by ``alpha*|z|`` on local image keys, ``beta*|z|`` on summary
    keys. The r-th image token of the batch (row-major) is patch ``r % P`` of image ``r // P``; where the
    projector folds squares of patches into one token (InternVL's ``downsample_ratio``), a token's CLS
    attention is the sum over its square (:func:`fold_patches`) and P counts tokens. The images are those
    the model's forward gets, or under ``generate`` those its vision tower was last given."""

    def __init__(self, model, image_token_id, *, alpha, beta, local_ratio, layers):
        super().__init__(model, image_token_id)
        self.alpha = alpha
        self.beta = beta
        self.local_ratio = local_ratio
        self.layers = set(layers)
        self.local: list[set[int]] = []
        self.summary: list[set[int]] = []
        self.boost: dict[tuple[int, int], float] = {}

    def __enter__(self):
        super().__enter__()

        def capture(module, args, kwargs):
            self.tower_input = args[0] if args else kwargs["pixel_values"]

        self.handles.append(
            self.model.model.vision_tower.register_forward_pre_hook(capture, with_kwargs=True)
        )
        return self

    def new_prompt(self):
        self.local, self.summary, self.boost = [], [], {}
        if self.pixel_values is None:
            return
        per_layer = vision_cls_attention(self.model, self.pixel_values)
        ratio = getattr(self.model.config, "downsample_ratio", None)
        if ratio is not None:  # InternVL: one token per (1/ratio)^2 patches
            per_layer = [fold_patches(values, round(1 / ratio)) for values in per_layer]
        index = self.model.config.vision_feature_layer  # into hidden_states: [0] embeddings, [i] layer i-1
        feature = (len(per_layer) + 1 + index if index < 0 else index) - 1
        self.local, self.summary = paint_sets(per_layer[0], per_layer[feature], self.local_ratio)
        patches = per_layer[0].shape[-1]
        r = 0
        for b in range(self.image.shape[0]):
            for j in _positions(self.image[b]):
                img, patch = divmod(r, patches)
                if patch in self.local[img]:
                    self.boost[(b, j)] = self.alpha
                elif patch in self.summary[img]:
                    self.boost[(b, j)] = self.beta
                r += 1

    def edit_logits(self, layer, z):
        if layer not in self.layers:
            return z
        z = z.clone()
        for (b, j), amount in self.boost.items():
            v = z[b, :, -1, j]
            z[b, :, -1, j] = v + amount * v.abs()
        return z


class GIFTOracle(EagerOracle):
    """GIFT as DESIGN.md states it. The user query is the prompt after the last image token (or image
    marker: ``markers``) without the generation prompt (``ASSISTANT:``; token strings, ``()`` where the
    family has none) and without the ``not_query`` ids (PaliGemma's ``<bos>``); ``informative`` (words)
    filters the query tokens that give the saliency, ``None`` keeps them all. The saliency reads this pass's
    prefill probabilities of the saliency layers (they precede every enhanced layer and the enhancement
    only touches the last row). Keys are read through :meth:`key_mask` (sliding-window layers)."""

    def __init__(
        self,
        model,
        image_token_id,
        *,
        tokenizer,
        saliency_layers,
        enhance_layers,
        alpha,
        head_fraction,
        informative: set[str] | None,
        generation_prompt=("assistant", ":"),
        saliency_from: dict[int, torch.Tensor] | None = None,
        markers=(),
        not_query=(),
        mask="sdpa",
    ):
        super().__init__(model, image_token_id, mask)
        #: the saliency layers' prefill probabilities of an earlier, separate pass (GIFT's released code
        #: reads its saliency in an extra prefill); ``None``: this pass's own
        self.saliency_from = saliency_from
        self.tokenizer = tokenizer
        self.saliency_layers = list(saliency_layers)
        self.enhance_layers = set(enhance_layers)
        self.alpha = alpha
        self.head_fraction = head_fraction
        self.informative = informative
        self.suffix = tokenizer.convert_tokens_to_ids(list(generation_prompt))
        self.markers = set(markers)
        self.not_query = set(not_query)
        self.saliency: list[torch.Tensor | None] = []
        self.kept: list[list[int]] = []

    def new_prompt(self):
        self.query, self.kept, self.seen, self.saliency = [], [], dict(self.saliency_from or {}), None
        length = self.ids.shape[1]
        for b in range(self.ids.shape[0]):
            image = _positions(self.image[b])
            if not image:
                self.query.append([])
                self.kept.append([])
                continue
            marked = [j for j in range(length) if int(self.ids[b, j]) in self.markers]
            span = list(range(max(image + marked) + 1, length))
            if self.suffix:
                assert self.ids[b, span[-len(self.suffix) :]].tolist() == self.suffix
                span = span[: -len(self.suffix)]
            span = [j for j in span if int(self.ids[b, j]) not in self.not_query]
            words = self.tokenizer.convert_ids_to_tokens(self.ids[b, span].tolist())
            self.query.append(span)
            keep = [self.informative is None or w in self.informative for w in words]
            self.kept.append([p for p, ok in zip(span, keep, strict=True) if ok])

    def edit_probs(self, layer, p, positions):
        if self.past == 0 and layer in self.saliency_layers and self.saliency_from is None:
            self.seen[layer] = p.clone()
        if layer not in self.enhance_layers:
            return p
        if self.saliency is None:
            self.saliency = [self._saliency(b) for b in range(p.shape[0])]
        return self._enhance(p)

    def _saliency(self, b):
        kept = self.kept[b]
        if not kept:
            return None
        image = _positions(self.image[b])
        heads = self.seen[self.saliency_layers[0]].shape[1]
        keep = max(1, int(heads * self.head_fraction))
        per_layer = []
        for layer in self.saliency_layers:
            a = self.seen[layer][b]  # [H, T, T]
            change = torch.stack([(a[:, t, image] - a[:, t - 1, image]).clamp(min=0) for t in kept], dim=1)
            chosen = _top([float(change[h].sum()) for h in range(heads)], keep)
            per_layer.append(change[chosen].mean(dim=(0, 1)))
        s = torch.stack(per_layer).mean(0)
        mean, std = s.mean(), s.std(correction=1)
        s = torch.minimum(torch.maximum(s, mean - 3 * std), mean + 3 * std)
        low, high = s.min(), s.max()
        if not high > low:
            return None
        return torch.exp(self.alpha * (s - low) / (high - low))

    def _enhance(self, p):
        p = p.clone()
        heads = p.shape[1]
        keep = max(1, int(heads * self.head_fraction))
        for b in range(p.shape[0]):
            weights = self.saliency[b]
            if weights is None:
                continue
            nk = p.shape[-1]
            image = _positions(self.key_mask(self.image, nk)[b])
            query = torch.zeros_like(self.valid[:1])
            query[0, self.query[b]] = True
            query = _positions(self.key_mask(query, nk)[0])
            per_key = torch.zeros(1, self.valid.shape[1], dtype=weights.dtype)
            per_key[0, _positions(self.image[b])] = weights
            weights = self.key_mask(per_key, nk)[0, image]  # the saliency of the image keys in view
            row = p[b, :, -1].clone()  # [H, Nk]
            vision = _top([float(row[h, image].sum()) for h in range(heads)], keep)
            text = _top([float(row[h, query].sum()) for h in range(heads)], keep)
            old = sum(row[h, image].sum() for h in vision)
            new = sum((row[h, image] * weights).sum() for h in vision)
            g = new / old
            for h in vision:
                row[h, image] = row[h, image] * weights
            for h in text:
                row[h, query] = row[h, query] * g
            p[b, :, -1] = row / row.sum(-1, keepdim=True)
        return p


class VHROracle(EagerOracle):
    """VHR: chosen heads' outputs (before ``o_proj``) times ``alpha`` at every position in ``layers``.

    :meth:`choose` picks the heads the slow way: per prompt (unpadded) and per listed layer in order, one
    forward of the prompt and one of the prompt without its image tokens and the ``markers`` around them
    (per-token inputs such as ``token_type_ids`` cut alike, image inputs dropped; the family builds its own
    positions and masks for it), with the heads already chosen in
    earlier layers reinforced; ``vhd = ||o_img - o_txt||``, ``ta = ||o_txt||^2`` at the last position;
    with the outlier filter, heads above mean + (sample) std in both get ``vhd = 0``; heads with ``vhd``
    above the layer's median are chosen."""

    def __init__(self, model, image_token_id, *, alpha, layers, outlier_filter, markers=(), mask="sdpa"):
        super().__init__(model, image_token_id, mask)
        self.markers = tuple(markers)
        self.alpha = alpha
        self.layers = sorted(layers)
        self.outlier_filter = outlier_filter
        self.heads: dict[int, torch.Tensor] = {}  # layer -> bool [B, H]
        self.capture: int | None = None
        self.captured: torch.Tensor | None = None

    def edit_output(self, layer, out):
        if layer == self.capture:
            self.captured = out[0, :, -1].clone()  # [H, D], before this layer's own scaling
        heads = self.heads.get(layer)
        if heads is None:
            return out
        factor = torch.where(heads, self.alpha, 1.0).to(out.dtype)  # [B, H]
        return out * factor[:, :, None, None]

    def _run(self, inputs, layer):
        self.capture, self.captured = layer, None
        with torch.no_grad():
            self.model(**inputs)
        self.capture = None
        return self.captured

    def _decide(self, o_img, o_txt) -> list[bool]:
        import statistics

        heads = o_img.shape[0]
        vhd = [float(torch.linalg.vector_norm(o_img[h].double() - o_txt[h].double())) for h in range(heads)]
        ta = [float((o_txt[h].double() ** 2).sum()) for h in range(heads)]
        if self.outlier_filter:
            v_bar, v_std = statistics.mean(vhd), statistics.stdev(vhd)
            t_bar, t_std = statistics.mean(ta), statistics.stdev(ta)
            outlier = [v > v_bar + v_std and t > t_bar + t_std for v, t in zip(vhd, ta, strict=True)]
            vhd = [0.0 if out else v for v, out in zip(vhd, outlier, strict=True)]
        median = statistics.median(vhd)
        return [v > median for v in vhd]

    def choose(self, rows: list[dict[str, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """Heads per layer ``[len(rows), H]`` for unpadded one-row inputs (call inside the context)."""
        chosen = {layer: [] for layer in self.layers}
        for inputs in rows:
            ids = inputs["input_ids"]
            keep = ~torch.isin(ids[0], torch.tensor([self.image_token_id, *self.markers]))
            text_only = {"input_ids": ids[:, keep], "attention_mask": torch.ones_like(ids[:, keep])}
            for name, value in inputs.items():  # per-token inputs (token types); not the images' own
                if name not in text_only and torch.is_tensor(value) and value.shape == ids.shape:
                    text_only[name] = value[:, keep]
            self.heads = {}
            for layer in self.layers:
                heads = self._decide(self._run(inputs, layer), self._run(text_only, layer))
                self.heads[layer] = torch.tensor([heads])
                chosen[layer].append(heads)
        self.heads = {layer: torch.tensor(v) for layer, v in chosen.items()}
        return self.heads


class ComposedOracle(EagerOracle):
    """Several oracles in one eager pass: every part's logit edit, then every part's probability edit,
    then every part's output edit, each in the given order; layer hooks see the real (edited) pass."""

    def __init__(self, model, image_token_id, parts):
        super().__init__(model, image_token_id)
        self.parts = parts

    def _sync(self):
        for part in self.parts:
            for name in ("past", "valid", "image", "prompt_len", "ids", "pixel_values", "positions"):
                setattr(part, name, getattr(self, name))

    def _before(self, module, args, kwargs):
        super()._before(module, args, kwargs)
        self._sync()

    def new_prompt(self):
        self._sync()
        for part in self.parts:
            part.new_prompt()

    def observe(self, layer, hidden):
        for part in self.parts:
            part.observe(layer, hidden)

    def edit_logits(self, layer, z):
        self._sync()
        for part in self.parts:
            z = part.edit_logits(layer, z)
        return z

    def edit_probs(self, layer, p, positions):
        for part in self.parts:
            p = part.edit_probs(layer, p, positions)
        return p

    def edit_output(self, layer, out):
        for part in self.parts:
            out = part.edit_output(layer, out)
        return out
