"""The edit contract: the single description of an attention change that methods produce and kernels execute.

An :class:`AttentionEdit` is an ordered list of operations on one attention call. Every kernel must give
the numbers of the eager reference (:mod:`mitigate.kernels.reference`) for every operation kind:

* :class:`LogitEdit` -- before the softmax, per key (and optionally per head):
  ``z' = s*z + a*|z| + b`` on the selected query rows. ``z`` is the scaled dot product ``scaling*q.k``.
  Masked keys stay masked (the mask is applied after the edit).
* :class:`MassTransfer` -- after the softmax: keys are partitioned into ``num_groups`` groups; ``fn`` maps
  each (batch, head, row) vector of group masses ``m_g = sum_{j in g} p_j`` to new group masses ``w_g``.
  It is called as ``fn(masses [B, H, R, G], rows [B, R])`` on whichever ``R`` rows a kernel computes,
  with ``rows`` telling which of them the op edits (the kernel ignores the result elsewhere).
  Inside a group the distribution is unchanged, so the edited output is ``sum_g w_g o_g / sum_g w_g`` with
  ``o_g`` the group's normalised partial output. That is what lets fast kernels run without the full
  matrix. ``fn`` must be row-local and non-negative; the result is renormalised, and groups with zero mass
  stay at zero whatever ``fn`` returns for them.
* :class:`RowEdit` -- after the softmax, any function of a few rows' probabilities ``[B, H, R, Nk]``
  (GIFT: per-key weights chosen from the row's own masses). Kernels materialise just those rows, so a
  row edit must be meant for few rows (the last one), never for every prefill row.
* :class:`Observe` -- read the final probabilities of a few rows (GIFT's saliency), edit nothing.
* :class:`HeadScale` -- after ``p @ v``: each head's output on the selected rows is multiplied by a factor.

Operations apply in list order. :func:`combine` orders ops from several methods by kind: logit edits,
then redistributions (mass transfers and row edits, in method order), then observations, then head
scaling (DESIGN.md, "Methods compose in the order given").

Shapes: ``B`` batch, ``H`` query heads, ``Nq`` query rows of this call, ``Nk`` keys.
Row masks are bool ``[B, Nq]``. Per-key tensors are ``[B, Hc, Nk]`` with ``Hc`` 1 or ``H``.
Every op may carry ``span=(start, stop)``: host-side bounds such that all its True rows lie in
``start <= row < stop``. Kernels then find the edited rows without reading the mask back from the GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch

MassFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
RowFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None]


@dataclass(frozen=True)
class LogitEdit:
    """``z' = scale*z + abs*|z| + bias`` on the rows in ``rows``; any of the three may be ``None``."""

    rows: torch.Tensor
    scale: torch.Tensor | None = None
    abs: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    span: tuple[int, int] | None = None

    kind = "logit"

    def __post_init__(self) -> None:
        if self.scale is None and self.abs is None and self.bias is None:
            raise ValueError("LogitEdit needs at least one of scale, abs, bias")


@dataclass(frozen=True)
class MassTransfer:
    """Move probability mass between key groups on the rows in ``rows``.

    ``groups`` is int64 ``[B, Nk]`` with values in ``[0, num_groups)``. ``fn(masses, rows)`` takes masses
    ``[B, H, R, G]`` (fp32) and the op's row mask for those rows ``[B, R]``, and returns the new masses.
    """

    rows: torch.Tensor
    groups: torch.Tensor
    num_groups: int
    fn: MassFn
    name: str = ""
    span: tuple[int, int] | None = None

    kind = "mass"


@dataclass(frozen=True)
class RowEdit:
    """``fn(p [B, H, R, Nk], rows [B, R], index [R]) -> p'`` on materialised rows, where ``index`` gives
    the rows' positions among this call's query rows; rows outside ``rows`` are kept whatever fn does."""

    rows: torch.Tensor
    fn: RowFn
    name: str = ""
    span: tuple[int, int] | None = None

    kind = "row"


@dataclass(frozen=True)
class Observe:
    """``fn(p [B, H, R, Nk], rows [B, R], index [R])`` sees the final probabilities of some rows; it may
    be called several times per attention call, on disjoint sets of rows (``index``: their positions)."""

    rows: torch.Tensor
    fn: RowFn
    name: str = ""
    span: tuple[int, int] | None = None

    kind = "observe"


@dataclass(frozen=True)
class HeadScale:
    """Multiply head outputs ``[B, H]`` (before ``o_proj``) on the rows in ``rows``."""

    rows: torch.Tensor
    scale: torch.Tensor
    span: tuple[int, int] | None = None

    kind = "head"


Op = LogitEdit | MassTransfer | RowEdit | Observe | HeadScale
_ORDER = {"logit": 0, "mass": 1, "row": 1, "observe": 2, "head": 3}
#: kinds that only the materialised path (few rows, or the reference) can execute
ROW_KINDS = ("row", "observe")


@dataclass
class AttentionEdit:
    """An ordered list of operations for one attention call (see module docstring)."""

    ops: list[Op] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.ops)

    @property
    def logit_ops(self) -> list[LogitEdit]:
        return [op for op in self.ops if isinstance(op, LogitEdit)]

    @property
    def mass_ops(self) -> list[MassTransfer]:
        return [op for op in self.ops if isinstance(op, MassTransfer)]

    @property
    def probability_ops(self) -> list[MassTransfer | RowEdit | Observe]:
        """Everything after the softmax and before ``p @ v``, in order."""
        return [op for op in self.ops if op.kind in ("mass", "row", "observe")]

    @property
    def head_ops(self) -> list[HeadScale]:
        return [op for op in self.ops if isinstance(op, HeadScale)]

    def to(self, device: torch.device) -> AttentionEdit:
        """The same edit with its tensors on ``device`` (layers split over GPUs by ``device_map``)."""
        if all(op.rows.device == device for op in self.ops):  # the usual case, checked cheaply
            return self

        def move(op: Op) -> Op:
            moved = {
                f.name: value.to(device)
                for f in fields(op)
                if torch.is_tensor(value := getattr(op, f.name)) and value.device != device
            }
            return replace(op, **moved) if moved else op

        return AttentionEdit([move(op) for op in self.ops])

    def edited_rows(self) -> torch.Tensor | None:
        """Union of the rows any op touches, bool ``[B, Nq]``; ``None`` when there are no ops."""
        rows = None
        for op in self.ops:
            rows = op.rows if rows is None else rows | op.rows
        return rows


def combine(per_method: list[list[Op]]) -> AttentionEdit:
    """Concatenate the ops of several methods in the fixed kind order, keeping method order within a kind."""
    flat = [op for ops in per_method for op in ops]
    flat.sort(key=lambda op: _ORDER[op.kind])  # stable: method order kept within a kind
    return AttentionEdit(flat)


def apply_mass_fn(op: MassTransfer, masses: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Run ``op.fn`` and check the contract cheaply (shape); zero-mass groups stay at zero."""
    new = op.fn(masses, rows)
    if new.shape != masses.shape:
        raise RuntimeError(
            f"mass transfer {op.name!r} returned shape {tuple(new.shape)}, expected {tuple(masses.shape)}"
        )
    return torch.where(masses > 0, new, torch.zeros_like(new))
