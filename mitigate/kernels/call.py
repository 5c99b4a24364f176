"""What a kernel is told about one attention call besides the tensors and the plan."""

from __future__ import annotations

from dataclasses import dataclass

from ..plan import LayerPlan, RuleStats
from ..stats import Stats


@dataclass(frozen=True)
class KernelCall:
    """``past``: absolute position of the call's first query row, or ``None`` for a decode row known only
    to lie past the prompt (a compiled step, whose Python values would otherwise be baked into the graph).
    ``key_offset``: absolute position of the first key (> 0 only when a sliding-window cache dropped keys).
    ``stats``: collect per-layer statistics (eager runs only)."""

    scaling: float
    causal: bool = True
    past: int | None = 0
    key_offset: int = 0
    stats: Stats | None = None

    def rule_stats(self, plan: LayerPlan) -> RuleStats | None:
        return None if self.stats is None else RuleStats(self.stats, plan.layer)
