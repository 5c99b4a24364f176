"""Edit plans: the data every kernel executes, and the closed set of rules a kernel must implement.

At prefill each method turns what it found (sinks, saliency, token sets, chosen heads) into *stages* of a
:class:`LayerPlan` for every layer it edits. A plan holds tensors and a few constants, nothing callable:
it is built once per generation, and a decode step only slices it by key position. That is what lets the
decode step be compiled, captured in a CUDA graph, fused into one kernel, or run inside a serving engine.

**Rows.** A stage edits the query rows whose absolute position is ``>= start[b]`` in batch row ``b``
(:class:`Rows`). Every method's rows have this form: all rows (``0``), the rows after the image
(``last_image + 1``), or the prompt's last row (``T - 1``); :data:`NEVER` switches a batch row off. Every
decode row sits at a position ``>= T``, so at decode a stage is either on or off for a whole batch row, and
kernels fold that into their per-row tensors once per prefill.

**Keys.** Per-key tensors cover the prompt's ``T`` positions; keys generated later take the stage's
identity value (``s = 1``, ``a = b = 0``, group ``0``, weight ``1``). :func:`mitigate.context.extend_keys`
maps them onto the keys of any call (including a sliding-window cache that dropped early keys).

**Stages**, applied in this order (DESIGN.md: logit edits, then redistributions, then head scaling; in
method order within a kind):

* :class:`LogitStage` -- before the softmax, per key and optionally per head: ``z' = s*z + a*|z| + b``
  (``z = scaling * q.k``); masked keys stay masked.
* a rule, after the softmax; the closed set is :class:`VarRule` (VAR's sink-to-image mass transfer) and
  :class:`GiftRule` (GIFT's saliency boost with head selection). Each rule's ``apply`` defines its numbers
  on materialised probabilities (the reference); fast kernels compute the same from per-group masses
  (:func:`var_coefficients`, :func:`gift_heads`), which is why every rule is written in terms of key
  groups: within a group the distribution changes only by fixed per-key weights.
* :class:`HeadStage` -- after ``p @ v``: each head's output multiplied by a factor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .context import extend_keys

#: ``Rows.start`` for a batch row a stage does not edit at all
NEVER = 2**62


@dataclass(frozen=True)
class Rows:
    """Query rows at absolute position ``>= start[b]`` (int64 ``[B]``). ``first`` is a host-side lower
    bound of ``min(start)`` (``NEVER`` only when no row is edited), so that kernels bound the edited rows
    without a device sync."""

    start: torch.Tensor
    first: int

    @classmethod
    def where(cls, on: torch.Tensor, start: torch.Tensor | int, first: int | None = None) -> Rows:
        """``start`` (a tensor ``[B]`` or one int) where ``on [B]``, else NEVER. Without ``first`` (a known
        lower bound, or the int ``start``) it is read from the device once."""
        if first is None and isinstance(start, int):
            first = start
        start = torch.where(on, torch.as_tensor(start, device=on.device), NEVER).to(torch.long)
        if first is None:
            first = int(start.min()) if start.numel() else NEVER
        return cls(start=start, first=first)

    def mask(self, positions: torch.Tensor) -> torch.Tensor:
        """bool ``[B, R]`` for query rows at absolute ``positions [R]``."""
        return positions[None, :] >= self.start[:, None]

    def decode_on(self) -> torch.Tensor:
        """bool ``[B]``: whether decode rows (positions past the prompt) are edited."""
        return self.start < NEVER

    def count(self, past: int, num_rows: int) -> torch.Tensor:
        """How many of the rows ``past .. past + num_rows - 1`` are edited, summed over the batch."""
        first = self.start.clamp(min=past, max=past + num_rows)
        return (past + num_rows - first).sum()


@dataclass(frozen=True)
class LogitStage:
    """``z' = scale*z + abs*|z| + bias`` on ``rows``; terms ``[B, Hc, T]`` fp32 (``Hc``: 1 or H) or None."""

    method: str
    rows: Rows
    scale: torch.Tensor | None = None
    abs: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.scale is None and self.abs is None and self.bias is None:
            raise ValueError("LogitStage needs at least one of scale, abs, bias")

    def keys(self, num_keys: int, offset: int = 0) -> tuple[torch.Tensor | None, ...]:
        """``(scale, abs, bias)`` over a call's keys (generated keys: identity)."""
        return (
            None if self.scale is None else extend_keys(self.scale, 1.0, num_keys, offset),
            None if self.abs is None else extend_keys(self.abs, 0.0, num_keys, offset),
            None if self.bias is None else extend_keys(self.bias, 0.0, num_keys, offset),
        )

    @property
    def scale_only(self) -> bool:
        return self.abs is None and self.bias is None


def edit_logits(
    z: torch.Tensor, scale: torch.Tensor | None, abs_: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """``s*z + a*|z| + b`` for logits ``[B, H, R, Nk]`` and per-key terms ``[B, Hc, Nk]``."""
    new = z
    if scale is not None:
        new = new * scale[:, :, None, :]
    if abs_ is not None:
        new = new + abs_[:, :, None, :] * z.abs()
    if bias is not None:
        new = new + bias[:, :, None, :]
    return new


def fold_logits(stages: list[LogitStage]) -> tuple[torch.Tensor | None, ...] | None:
    """One ``(scale, abs, bias)`` (each ``[B, Hc, T]`` or None for the identity) equal to applying ``stages``
    in turn to a decode row (each only where its batch row is on), or ``None`` when the composition leaves
    the ``s*z + a*|z| + b`` family. It stays there when the later stage has no ``|z|`` term, or when the
    earlier ones have no bias and keep the sign of ``z`` (``s >= |a|``): then ``|z1| = s1*|z| + a1*z`` and
    ``z2 = (s2*s1 + a2*a1)*z + (s2*a1 + a2*s1)*|z| + b2``."""
    s = a = b = None  # None: the identity term (s = 1, a = b = 0)
    for stage in stages:
        on = stage.rows.decode_on()[:, None, None]
        s2 = None if stage.scale is None else torch.where(on, stage.scale, 1.0)
        a2 = None if stage.abs is None else torch.where(on, stage.abs, 0.0)
        b2 = None if stage.bias is None else torch.where(on, stage.bias, 0.0)
        s1 = 1.0 if s is None else s
        if a2 is not None and (s is not None or a is not None or b is not None):
            a1 = torch.zeros(()) if a is None else a.abs()
            if b is not None or bool((torch.as_tensor(s1) < a1).any()):
                return None
        new_s = s if s2 is None else (s2 if s is None else s2 * s)
        if a2 is not None and a is not None:
            new_s = (1.0 if new_s is None else new_s) + a2 * a
        new_a = None if a is None else (a if s2 is None else s2 * a)
        if a2 is not None:
            new_a = a2 * s1 if new_a is None else new_a + a2 * s1
        new_b = None if b is None else (b if s2 is None else s2 * b)
        if b2 is not None:
            new_b = b2 if new_b is None else new_b + b2
        s, a, b = new_s, new_a, new_b
    return s, a, b


# -- rules ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VarRule:
    """VAR (DESIGN.md): groups OTHER, TEXT_SINK, IMAGE_SINK, IMAGE. Where a (head, row) has image mass
    ``M = m_is + m_i >= min_image_mass`` and ``m_i / M >= min_nonsink_ratio`` (and ``m_i > 0``), sink
    probabilities are multiplied by ``1 - fraction`` and the removed mass goes to the non-sink image keys
    in proportion to their probability. The row still sums to one."""

    method: str
    rows: Rows
    groups: torch.Tensor  # int64 [B, T]
    fraction: float
    min_nonsink_ratio: float
    min_image_mass: float

    OTHER, TEXT_SINK, IMAGE_SINK, IMAGE = range(4)
    num_groups = 4
    kind = "var"

    def apply(
        self, p: torch.Tensor, keys: dict[str, torch.Tensor], rows: torch.Tensor, stats: RuleStats | None
    ) -> torch.Tensor:
        masses = group_masses(p, keys["groups"], self.num_groups)
        coef, gate = var_coefficients(masses, self)
        gate = gate & rows[:, None, :]
        if stats is not None:
            stats.var(self, masses, gate, rows)
        return reweight_groups(p, keys["groups"], torch.where(gate[..., None], coef, 1.0), rows)

    def keys(self, num_keys: int, offset: int = 0) -> dict[str, torch.Tensor]:
        return {"groups": extend_keys(self.groups, self.OTHER, num_keys, offset)}


def var_coefficients(masses: torch.Tensor, rule: VarRule) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group probability factors ``[..., 4]`` and the gate ``[...]`` from group masses ``[..., 4]``."""
    other, text_sink, image_sink, image = masses.unbind(-1)
    image_mass = image_sink + image
    tiny = torch.finfo(masses.dtype).tiny
    gate = (
        (image_mass >= rule.min_image_mass)
        & (image / image_mass.clamp_min(tiny) >= rule.min_nonsink_ratio)
        & (image > 0)
    )
    keep = torch.full_like(other, 1.0 - rule.fraction)
    boost = 1.0 + rule.fraction * (text_sink + image_sink) / image.clamp_min(tiny)
    return torch.stack((torch.ones_like(other), keep, keep, boost), dim=-1), gate


@dataclass(frozen=True)
class GiftRule:
    """GIFT (DESIGN.md): groups OTHER, QUERY, IMAGE, and saliency weights ``S`` on image keys. Per (batch
    row, query row): the ``k = max(1, floor(H * head_fraction))`` heads with the most image mass get their
    image probabilities multiplied by ``S``; ``g`` = those heads' new image mass over their old one; the
    ``k`` heads with the most query mass get their query probabilities multiplied by ``g``; each (head,
    row) is renormalised."""

    method: str
    rows: Rows
    groups: torch.Tensor  # int64 [B, T]
    weights: torch.Tensor  # fp32 [B, T]: S on image keys, 1 elsewhere
    head_fraction: float

    OTHER, QUERY, IMAGE = range(3)
    num_groups = 3
    kind = "gift"

    def top_heads(self, num_heads: int) -> int:
        return max(1, int(num_heads * self.head_fraction))

    def apply(
        self, p: torch.Tensor, keys: dict[str, torch.Tensor], rows: torch.Tensor, stats: RuleStats | None
    ) -> torch.Tensor:
        image = keys["groups"] == self.IMAGE
        query = keys["groups"] == self.QUERY
        edited = gift_enhance(p, image, query, keys["weights"], self.top_heads(p.shape[1]))
        if stats is not None:
            stats.rows(self, rows)
        return torch.where(rows[:, None, :, None], edited, p)

    def keys(self, num_keys: int, offset: int = 0) -> dict[str, torch.Tensor]:
        return {
            "groups": extend_keys(self.groups, self.OTHER, num_keys, offset),
            "weights": extend_keys(self.weights, 1.0, num_keys, offset),
        }


def top_heads(mass: torch.Tensor, keep: int) -> torch.Tensor:
    """bool, the shape of ``mass [B, H, R]``: the ``keep`` heads with the largest mass per (batch, row);
    among equal masses the lower head index wins (a stable sort), so every kernel picks the same heads."""
    index = mass.sort(dim=1, descending=True, stable=True).indices[:, :keep]
    return torch.zeros_like(mass, dtype=torch.bool).scatter_(1, index, True)


def gift_heads(
    image_mass: torch.Tensor, weighted_mass: torch.Tensor, query_mass: torch.Tensor, keep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(vision heads, query heads, g)`` from per-head masses ``[B, H, R]``: image, saliency-weighted
    image, and query; ``g [B, 1, R]`` is 1 where the vision heads have no image mass."""
    vision = top_heads(image_mass, keep)
    old = (image_mass * vision).sum(1, keepdim=True)
    new = (weighted_mass * vision).sum(1, keepdim=True)
    g = torch.where(old > 0, new / old.clamp_min(torch.finfo(old.dtype).tiny), torch.ones_like(old))
    return vision, top_heads(query_mass, keep), g


def gift_enhance(
    p: torch.Tensor, image: torch.Tensor, query: torch.Tensor, weights: torch.Tensor, keep: int
) -> torch.Tensor:
    """GIFT's enhancement of probability rows ``p [B, H, R, Nk]``; ``image``/``query`` bool ``[B, Nk]``,
    ``weights [B, Nk]`` the saliency (1 off the image)."""
    img = image[:, None, None, :]
    qry = query[:, None, None, :]
    w = weights[:, None, None, :]
    vision, query_heads, g = gift_heads((p * img).sum(-1), (p * img * w).sum(-1), (p * qry).sum(-1), keep)
    factor = torch.where(vision[..., None] & img, w, 1.0)
    factor = factor * torch.where(query_heads[..., None] & qry, g[..., None], 1.0)
    edited = p * factor
    return edited / edited.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


Rule = VarRule | GiftRule


def group_masses(p: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[B, H, R, G]``: the probability mass of each key group."""
    onehot = torch.nn.functional.one_hot(groups, num_groups).to(p.dtype)  # [B, Nk, G]
    return torch.einsum("bhqk,bkg->bhqg", p, onehot)


def reweight_groups(
    p: torch.Tensor, groups: torch.Tensor, factor: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Multiply each key's probability by its group's factor ``[B, H, R, G]`` and renormalise, on ``rows``."""
    index = groups[:, None, None, :].expand(p.shape)
    edited = p * factor.gather(-1, index)
    total = edited.sum(-1, keepdim=True)
    edited = torch.where(total > 0, edited / total.clamp_min(torch.finfo(p.dtype).tiny), p)
    return torch.where(rows[:, None, :, None], edited, p)


@dataclass(frozen=True)
class HeadStage:
    """Each head's output ``[B, H]`` (fp32 factors) multiplied on ``rows``, after ``p @ v``."""

    method: str
    rows: Rows
    scale: torch.Tensor


Stage = LogitStage | VarRule | GiftRule | HeadStage


@dataclass
class LayerPlan:
    """Everything done to one layer's attention for one generation (see the module docstring)."""

    layer: int
    prompt_len: int
    logits: list[LogitStage] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    heads: list[HeadStage] = field(default_factory=list)

    @classmethod
    def of(cls, layer: int, prompt_len: int, stages: list[Stage]) -> LayerPlan:
        plan = cls(layer, prompt_len)
        for stage in stages:
            if isinstance(stage, LogitStage):
                plan.logits.append(stage)
            elif isinstance(stage, HeadStage):
                plan.heads.append(stage)
            else:
                plan.rules.append(stage)
        return plan

    def __bool__(self) -> bool:
        return bool(self.logits or self.rules or self.heads)

    @property
    def stages(self) -> list[Stage]:
        return [*self.logits, *self.rules, *self.heads]

    @property
    def core(self) -> list[LogitStage | Rule]:
        """The stages that change probabilities (everything but head scaling)."""
        return [*self.logits, *self.rules]

    def first_row(self, core_only: bool = False) -> int:
        """Host-side: the first position any (core) stage edits."""
        stages = self.core if core_only else self.stages
        return min((s.rows.first for s in stages), default=NEVER)

    def to(self, device: torch.device) -> LayerPlan:
        """The same plan with its tensors on ``device`` (layers split over GPUs by ``device_map``)."""
        if all(s.rows.start.device == device for s in self.stages):
            return self

        def move(stage):
            values = {
                name: value.to(device)
                for name, value in vars(stage).items()
                if torch.is_tensor(value) and value.device != device
            }
            values["rows"] = Rows(stage.rows.start.to(device), stage.rows.first)
            return type(stage)(**{**vars(stage), **values})

        return LayerPlan.of(self.layer, self.prompt_len, [move(s) for s in self.stages])


@dataclass
class RuleStats:
    """Collects per-(method, layer) statistics while a plan runs (only when the user is recording)."""

    sink: object  # mitigate.stats.Stats
    layer: int

    def var(self, rule: VarRule, masses: torch.Tensor, gate: torch.Tensor, rows: torch.Tensor) -> None:
        moved = rule.fraction * (masses[..., VarRule.TEXT_SINK] + masses[..., VarRule.IMAGE_SINK]) * gate
        self.sink.add(rule.method, self.layer, moved=moved, heads=gate, rows=rows.sum() * masses.shape[1])

    def rows(self, rule: Rule, rows: torch.Tensor) -> None:
        self.sink.add(rule.method, self.layer, enhanced_rows=rows.sum())
