"""What every method is: a validated config, the layers it edits, per-generation state, and the ops it emits.

A method never touches the model. The session calls it at prefill only (decode steps run the plan):

* :meth:`Method.reset` at every prefill (new prompt batch): clear per-generation state;
* :meth:`Method.observe_hidden` with the input hidden state of each layer in :meth:`Method.hidden_layers`
  (before that layer runs, so later layers can use what earlier ones found);
* :meth:`Method.plan` once per edited layer, when that layer's attention first runs: the stages of the
  layer's :class:`~mitigate.plan.LayerPlan` for the whole generation (tensors only).

Optional hooks, for methods that need more than the language model's own prefill:

* :meth:`Method.observe_vision` with the CLS row of the vision tower's attention in
  :meth:`Method.vision_layers` (PAINT), captured without asking the tower for attention maps;
* :meth:`Method.probe_output` during one extra prefill that the session runs before the real one, when
  :meth:`Method.needs_probe`: on the prompt rows plus their image-free twins when
  :meth:`Method.probe_twins` (VHR), else on the prompt rows alone; :meth:`Method.probe_rows` asks for
  some rows' probabilities in that pass (GIFT's saliency when it comes after the enhanced layers). One
  probe pass serves every method that needs one;
* :meth:`Method.observe_rows` / :meth:`Method.observe_probs`: the final attention probabilities of a few
  prompt rows in a layer (GIFT's saliency), computed for those rows only.

State lives in the ``state`` dict the session passes in (one per method per session), never on modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from ..context import ModelInfo, TokenLayout
from ..errors import ConfigError, UnsupportedModelError
from ..plan import Rows, Stage


class MethodConfig(BaseModel):
    """Base of every method's parameters. Unknown parameters are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: list[int] | None = None

    @field_validator("layers")
    @classmethod
    def _layers_unique(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"layers has duplicates: {value}")
        return value


@dataclass
class PlanContext:
    """What a method sees when it plans one layer for one generation."""

    layer_idx: int
    layout: TokenLayout
    num_heads: int

    @property
    def batch_size(self) -> int:
        return self.layout.batch_size

    @property
    def prompt_len(self) -> int:
        return self.layout.prompt_len

    @property
    def device(self) -> torch.device:
        return self.layout.valid.device

    def all_rows(self, on: torch.Tensor | None = None) -> Rows:
        """Every row of the batch rows ``on [B]`` (all if ``None``), decode rows included."""
        on = torch.ones(self.batch_size, dtype=torch.bool, device=self.device) if on is None else on
        return Rows.where(on, 0)

    def rows_after_image(self, on: torch.Tensor | None = None) -> Rows:
        """The rows after the image (and every decode row) of the batch rows that have one (and ``on``)."""
        has = self.layout.has_image if on is None else self.layout.has_image & on
        return Rows.where(has, self.layout.last_image + 1, first=self.layout.after_image)

    def last_row(self, on: torch.Tensor) -> Rows:
        """The prompt's last row (and every decode row) of the batch rows ``on [B]``."""
        return Rows.where(on, self.prompt_len - 1)


class Method:
    """Base class. Subclasses set ``name``, ``Config`` and ``summary`` and implement :meth:`edit`."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    summary: ClassVar[str] = ""
    #: first layer edited by default; the default range runs from here to the last layer
    default_first_layer: ClassVar[int] = 2
    #: what to use instead, when :meth:`unsupported` refuses a model
    refusal_hint: ClassVar[str] = ""
    #: whether the layers this method edits must see every prompt row at prefill (their input hidden
    #: states, or their probabilities); Gemma 4's key/value-sharing layers see only the last one
    every_row: ClassVar[bool] = False

    def __init__(
        self, config: MethodConfig, info: ModelInfo, preset: str | None = None, processor: Any = None
    ):
        refusal = self.unsupported(info)
        if refusal is not None:
            message = f"{self.name} cannot run on this {info.family} model: it {refusal}. {self.refusal_hint}"
            raise UnsupportedModelError(message.strip())
        self.config = config
        self.info = info
        self.preset = preset or self.name
        self.processor = processor  # the model's processor or tokenizer, when the user passed one
        self.layers: tuple[int, ...] = self._check_layers(config.layers, "layers")
        self._edited_layers = frozenset(self.layers)

    # -- configuration ------------------------------------------------------------------------
    @classmethod
    def unsupported(cls, info: ModelInfo) -> str | None:
        """Why this method cannot run on the model at all (a fact of its family, e.g. no CLS token in the
        vision tower), as a phrase after "it", or ``None``. Checked at apply time; ``mitigate families``
        prints it."""
        return None

    def default_layers(self) -> list[int]:
        return list(range(min(self.default_first_layer, self.info.num_layers - 1), self.info.num_layers))

    def scaled_layers(self, first: int, last: int, reference_depth: int = 32) -> list[int]:
        """Layers ``first..last`` (inclusive) of a ``reference_depth``-layer model (LLaVA-1.5-7B),
        mapped proportionally onto this model's depth; exact on 32-layer models."""
        depth = self.info.num_layers
        lo = min(depth - 1, round(first * depth / reference_depth))
        hi = min(depth - 1, max(lo, round(last * depth / reference_depth)))
        return list(range(lo, hi + 1))

    def _check_layers(
        self,
        layers: list[int] | None,
        field: str,
        default: Callable[[], list[int]] | None = None,
        every_row: bool | None = None,
    ) -> tuple[int, ...]:
        """Explicit ``layers`` checked against the model (the model's own numbering); ``None`` takes the
        default (``default()`` or :meth:`default_layers`) kept to the layers this method can edit."""
        every_row = self.every_row if every_row is None else every_row
        if layers is None:
            defaults = default() if default is not None else self.default_layers()
            return tuple(sorted(self.info.onto_editable(defaults, every_row)))
        bad = [i for i in layers if not 0 <= i < self.info.num_layers]
        if bad:
            raise ConfigError(
                f"{self.name}: {field} {bad} out of range; this model has {self.info.num_layers} language "
                f"layers (0-based: 0..{self.info.num_layers - 1})"
            )
        valid = self.info.editable(every_row)
        bad = [i for i in layers if i not in valid]
        if bad:
            attention = self.info.attention_layers
            if attention is not None and any(i not in attention for i in bad):
                why = "no attention mitigate can edit (linear-attention layers of a hybrid model)"
            else:
                why = "only the prompt's last row at prefill (key/value-sharing layers); this needs every row"
            raise ConfigError(
                f"{self.name}: {field} {bad} have {why}; the {self.info.family} model's layers this can "
                f"use are {list(valid)}"
            )
        return tuple(sorted(layers))

    def resolved_params(self) -> dict[str, Any]:
        """Parameters with model-dependent defaults filled in (what actually runs)."""
        params = self.config.model_dump()
        params["layers"] = list(self.layers)
        return params

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.resolved_params().items())
        return f"{self.name}[{self.preset}]({params})"

    # -- runtime ------------------------------------------------------------------------------
    def hidden_layers(self) -> frozenset[int]:
        """Layers whose input hidden state this method needs at prefill."""
        return frozenset()

    def edited_layers(self) -> frozenset[int]:
        return self._edited_layers

    def vision_layers(self) -> frozenset[int]:
        """Vision-tower layers whose CLS-row attention this method needs at prefill."""
        return frozenset()

    def observe_vision(self, layer_idx: int, cls_attention: torch.Tensor, state: dict[str, Any]) -> None:
        """``cls_attention [images, heads, tokens]``: the CLS query's probabilities in a vision layer."""

    def needs_probe(self) -> bool:
        return False

    def probe_twins(self) -> bool:
        """Whether the probe must also run the prompt's image-free twins (VHR compares the two)."""
        return True

    def probe_rows(self, layer_idx: int, state: dict[str, Any]) -> tuple[int, int] | None:
        """During the probe: the span of prompt rows whose probabilities in this layer the method wants
        (:meth:`observe_probs`, unedited probabilities of the probe pass), or ``None``."""
        return None

    def probe_output(
        self, layer_idx: int, out: torch.Tensor, layout: TokenLayout, state: dict[str, Any]
    ) -> torch.Tensor:
        """During the probe pass: see and edit a layer's head outputs ``[2B, T, H, D]`` (rows ``B..2B-1``
        are the image-free twins of rows ``0..B-1``, both left-padded to the same length)."""
        return out

    def reset(self, state: dict[str, Any], layout: TokenLayout) -> None:
        state.clear()

    def observe_hidden(
        self, layer_idx: int, hidden: torch.Tensor, layout: TokenLayout, state: dict[str, Any]
    ) -> None:
        """Called at prefill with the layer's input hidden state ``[B, T, d]``."""

    def observe_rows(self, layer_idx: int, state: dict[str, Any]) -> tuple[int, int] | None:
        """At prefill: the span of prompt rows ``[start, stop)`` whose final probabilities in this layer
        the method wants to see (:meth:`observe_probs`), or ``None``."""
        return None

    def observe_probs(
        self, layer_idx: int, probs: torch.Tensor, positions: torch.Tensor, state: dict[str, Any]
    ) -> None:
        """``probs [B, H, R, Nk]``: the final probabilities of the rows at ``positions [R]``."""

    def plan(self, ctx: PlanContext, state: dict[str, Any]) -> list[Stage]:
        """The stages this method adds to layer ``ctx.layer_idx`` for this generation."""
        raise NotImplementedError
