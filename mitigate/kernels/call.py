"""What a kernel is told about one attention call besides the tensors and the plan."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import LayerPlan, RuleStats
from ..stats import Stats


@dataclass(frozen=True)
class KernelCall:
    """``past``: absolute position of the call's first query row, or ``None`` for a decode row known only
    to lie past the prompt (a compiled step, whose Python values would otherwise be baked into the graph).
    ``key_offset``: absolute position of the first key (> 0 only when a sliding-window cache dropped keys).
    ``stats``: collect per-layer statistics (eager runs only). ``window``: the layer's sliding window
    (transformers' convention: a row at position ``p`` sees keys ``p - window < j <= p``).
    ``key_valid``: bool ``[B, Nk]`` keys that are not padding, when the caller knows them (prefill).
    ``plain_mask``: the mask is exactly causality, padding and the window (the family adds no
    bidirectional blocks or prefix-LM spans), so a kernel may rebuild it from ``key_valid`` instead of
    reading the 4-D mask."""

    scaling: float
    causal: bool = True
    past: int | None = 0
    key_offset: int = 0
    stats: Stats | None = None
    window: int | None = None
    key_valid: torch.Tensor | None = None
    plain_mask: bool = False

    def rule_stats(self, plan: LayerPlan) -> RuleStats | None:
        return None if self.stats is None else RuleStats(self.stats, plan.layer)
